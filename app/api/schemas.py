"""Request and public response models. Ids are strings on the wire; embeddings appear in no response but POST
/embed's (which exists to hand them out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.matching.thresholds import MAX_THRESHOLD
from app.service import CalibrationSource, CurveSource, ThresholdSource

# Limits on what a request may carry besides photos (issue 6: huge JSON, very long names).
NAME_MAX_LENGTH = 200
ID_MAX_LENGTH = 64  # identity and face ids are 32 hex characters; longer is refused before any lookup
# Characters of /enroll's `metadata` form field; what is stored is bounded apart (store.MAX_METADATA_BYTES, 64 KiB).
METADATA_FORM_MAX_LENGTH = 16 * 1024
TOP_K_MAX = 100
THRESHOLD_MAX = MAX_THRESHOLD  # the settings' and the core's bound; real distances stay well under it (norms ~1)


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class BoxOut(Public):
    """Pixel box in the uploaded photo (after EXIF rotation), inclusive corners as dlib: width = right - left + 1."""

    left: int
    top: int
    right: int
    bottom: int


class QualityIssueOut(Public):
    issue: Literal[
        "small_face", "blurry", "too_dark", "too_bright", "cut_off", "turned", "tilted", "low_score", "indistinct"
    ]
    measured: float
    limit: float = Field(description="The configured limit (FACEGATE_QUALITY__*) the measurement is beyond.")


class QualityOut(Public):
    """Face quality measured on the face chip the embedding came from (app/vision/quality.py)."""

    inter_ocular_px: float = Field(
        description="Distance between the eye centres in pixels of the photo as the models see it (shrunk to "
        "detector.max_side for larger photos)."
    )
    sharpness: float = Field(description="Variance of the Laplacian on the chip's centre (low = blurred).")
    brightness: float = Field(description="Mean grey level 0-255 of the chip's centre.")
    outside_fraction: float = Field(description="Share of the face box outside the photo (0 = whole face inside).")
    yaw: float = Field(description="Nose offset from the eyes' midpoint / inter-ocular distance (0 = frontal).")
    roll_deg: float = Field(description="Angle of the eye line from horizontal, degrees.")
    score: float = Field(description="Detector score.")
    distinctiveness: float | None = Field(
        default=None,
        description="Squared distance of the embedding from where identity-less embeddings gather (faces of photos "
        "turned sideways without EXIF orientation; low = carries no identity). Null when not measured "
        "(FACEGATE_EMBEDDING__FLIP).",
    )
    issues: list[QualityIssueOut] = Field(
        default_factory=list,
        description="The configured quality limits this face fails (enrolment refuses such faces with 422 "
        "low_quality unless allow_low_quality=true; verify and identify only report them).",
    )


class FaceOut(Public):
    box: BoxOut
    score: float = Field(description="MMOD detector confidence (dlib keeps faces with score > 0; higher is surer).")
    quality: QualityOut | None = None
    landmarks: list[tuple[int, int]] = Field(
        default_factory=list,
        description="The 5 points (x, y) the face was aligned on, in the photo's pixels: outer and inner corner of "
        "the eye on the image's right, the same for the other eye, below the nose.",
    )


# --- errors ---------------------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. no_face, multiple_faces, unknown_identity.")
    message: str = Field(description="For people; may change between versions.")
    details: dict[str, Any] | None = Field(
        default=None,
        # Left out, not null, when there is nothing to add: a photo's error inside a many-photo reply is then the very
        # object a refused single-photo request carries (app/api/errors.py error_body).
        exclude_if=lambda value: value is None,
        description="Extra data, e.g. `boxes` for multiple_faces; absent when there is none.",
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- enrol ----------------------------------------------------------------------------------------------------------


class CandidateOut(Public):
    identity_id: str
    name: str
    face_id: str = Field(description="The identity's enrolled face nearest to this face.")
    distance: float




class EnrollResponse(Public):
    identity_id: str
    face_id: str
    name: str
    created: bool = Field(description="True when this request created the identity, false when it added a face.")
    face: FaceOut
    model_version: str
    possible_duplicate: CandidateOut | None = Field(
        default=None,
        description="The enrolled identity this new identity's face already matches (only when allow_duplicate=true "
        "let it through; without it the request is refused with 409 possible_duplicate).",
    )
    already_enrolled: bool = Field(
        default=False,
        description="True when the identity already had this face (the same photo again, e.g. a retried request): "
        "nothing was stored, `face_id` is the face it had, and the status is 200 instead of 201.",
    )


# --- verify / identify ----------------------------------------------------------------------------------------------


class Decision(Public):
    match: bool = Field(description="distance <= threshold")
    distance: float = Field(description="Squared L2 distance between the 128-d embeddings (0 = identical).")
    threshold: float = Field(description="The threshold this decision used.")
    threshold_source: ThresholdSource = Field(
        description="request: the `threshold` field; deployment: the calibrated threshold stored in the gallery; "
        "settings: FACEGATE_THRESHOLD (or, with a trained head served and FACEGATE_THRESHOLD unset, the head's own)."
    )
    far_estimate: float | None = Field(
        default=None,
        description="Estimated false-accept rate at this threshold (from the calibration table), if known.",
    )


class VerifyIdentityResponse(Decision):
    mode: Literal["identity"] = "identity"
    identity_id: str
    nearest_face_id: str = Field(description="The enrolled face of the identity nearest to the photo.")
    face: FaceOut = Field(description="The face found in the uploaded photo.")


class VerifyPhotosResponse(Decision):
    mode: Literal["photos"] = "photos"
    face_a: FaceOut
    face_b: FaceOut


class IdentifiedFaceOut(Public):
    face: FaceOut
    match: CandidateOut | None = Field(
        description="The identity named for this face, only when `reason` is accepted; null otherwise."
    )
    reason: Literal["accepted", "unknown", "ambiguous"] = Field(
        description="accepted: the nearest identity is named (distance <= threshold, and score <= score_threshold). "
        "unknown: nobody is close enough (farther than the threshold, or not better than strangers score at this "
        "gallery size). ambiguous: nobody is named because the two nearest identities are too close to tell apart: "
        "their margin is at most `ambiguity_margin` (so two identities at the same distance always are), or the "
        "score failed while the runner-up is also within the threshold."
    )
    candidates: list[CandidateOut] = Field(
        description="Nearest identities first, one entry per identity, at most top_k."
    )
    margin: float | None = Field(
        default=None,
        description="Distance of the second-nearest identity minus the nearest's (null with one identity).",
    )
    ambiguous: bool = Field(default=False, description="reason == ambiguous")
    fpir_estimate: float | None = Field(
        default=None,
        description="Share of strangers who would score at least this well against a gallery of this size (with "
        "several faces per identity, the size score_threshold is for) (lower = more confident), within the open-set "
        "model's range 0.0001-0.5.",
    )
    ratio: float | None = Field(
        default=None, description="Nearest identity's distance / second nearest's (null with one identity)."
    )
    score: float | None = Field(
        default=None,
        description="Open-set score s = log d1 - 0.75 log min(d2, 0.45), d1 and d2 the two nearest identities' "
        "distances (lower = more confident; null with an empty gallery).",
    )
    score_threshold: float | None = Field(
        default=None,
        description="t(N, target_fpir): the largest score accepted at this gallery size, so that about target_fpir "
        "of strangers are named. With several faces per identity, the strictest t over sizes from the identities to "
        "the faces (each face is one more chance for a stranger).",
    )
    accept_distance: float | None = Field(
        default=None,
        description="The score test in distance terms: the nearest identity is accepted when its distance is at most "
        "this (and at most `threshold`).",
    )


class IdentifyResponse(Public):
    faces: list[IdentifiedFaceOut] = Field(description="Every face in the photo, highest detector score first.")
    threshold: float = Field(description="Largest distance at which anyone is named (the 1:1 threshold).")
    threshold_source: ThresholdSource
    target_fpir: float = Field(description="Target share of strangers named as someone (FACEGATE_IDENTIFY_FPIR).")
    far_estimate: float | None = Field(default=None, description="1:1 false-accept rate at `threshold`, if known.")
    gallery_size: int = Field(description="Faces searched.")
    identities: int = Field(description="Identities searched.")
    faces_detected: int = Field(
        description="Faces the detector found in the photo: more than `faces` lists when it found over "
        "FACEGATE_DETECTOR__MAX_FACES (the most confident are identified)."
    )


# --- many photos (POST /embed, POST /identify/batch) ----------------------------------------------------------------


class EmbeddedFaceOut(FaceOut):
    embedding: list[float] = Field(
        min_length=128,
        max_length=128,
        description="The face's 128-d embedding as the service compares it (dlib's raw scale, or L2-normalised when "
        "a trained head is served; see model_version): compare with the squared L2 distance, only with embeddings "
        "of the same model_version. Biometric data: store and send it as such.",
    )


class PhotoResultBase(Public):
    index: int = Field(description="Position of the photo among the uploaded `images` (from 0).")
    filename: str = Field(description="The uploaded file's name (echoed, cut to 64 characters; not stored).")
    error: ErrorBody | None = Field(
        default=None,
        description="Why this photo gave no result (invalid_image, unsupported_image, image_too_large, "
        "image_too_small, no_face); null when it did. The other photos are unaffected.",
    )


class EmbedPhotoOut(PhotoResultBase):
    faces: list[EmbeddedFaceOut] | None = Field(
        default=None, description="Every face in the photo, highest detector score first; null on error."
    )
    model_version: str | None = Field(default=None, description="The model the embeddings come from; null on error.")
    faces_detected: int | None = Field(
        default=None,
        description="Faces the detector found: more than `faces` lists when it found over "
        "FACEGATE_DETECTOR__MAX_FACES (the most confident are embedded); null on error.",
    )


class EmbedResponse(Public):
    model_version: str = Field(description="Embeddings of other model versions are not comparable with these.")
    n_images: int
    n_faces: int
    n_errors: int = Field(description="Photos with an `error` instead of faces.")
    images: list[EmbedPhotoOut] = Field(description="One entry per uploaded photo, in upload order.")


class IdentifyPhotoOut(PhotoResultBase):
    result: IdentifyResponse | None = Field(
        default=None, description="What POST /identify answers for this photo alone; null on error."
    )


class IdentifyBatchResponse(Public):
    n_images: int
    n_errors: int = Field(description="Photos with an `error` instead of a result.")
    images: list[IdentifyPhotoOut] = Field(description="One entry per uploaded photo, in upload order.")


# --- identities -----------------------------------------------------------------------------------------------------


class FacePublic(Public):
    id: str
    model_version: str
    created_at: datetime | None = None
    box: BoxOut | None = None
    score: float | None = None
    stale: bool = Field(default=False, description="Made by another model version: not searched until re-enrolled.")


class IdentityPublic(Public):
    id: str
    name: str
    metadata: dict[str, Any]
    created_at: datetime | None = None
    updated_at: datetime | None = None
    face_count: int
    faces: list[FacePublic] | None = Field(default=None, description="Present on GET /identities/{id}.")


class IdentityPage(Public):
    items: list[IdentityPublic]
    total: int = Field(description="Identities matching the filter, in every page.")
    start: int = Field(
        description="Identities matching the filter before this page's first: the page holds numbers start + 1 to "
        "start + len(items) of total (with a cursor, those before it are counted now)."
    )
    offset: int
    limit: int
    next: str | None = Field(
        description="Cursor of the following page: send it as `after`. null on the last page. Opaque; it stays "
        "valid whatever is added or deleted meanwhile."
    )


class IdentityUpdate(BaseModel):
    """PATCH body: only the fields sent are changed; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX_LENGTH)
    metadata: dict[str, Any] | None = Field(default=None, description="Replaces the whole metadata object.")

    @model_validator(mode="after")
    def _no_null(self) -> IdentityUpdate:
        # A field sent as null was answered 200 and left unchanged: a client clearing the metadata never knew.
        for field in ("name", "metadata"):
            if field in self.model_fields_set and getattr(self, field) is None:
                hint = " (send {} to clear the metadata)" if field == "metadata" else ""
                raise ValueError(f"{field} may not be null: leave it out to keep it{hint}")
        return self


class DeletionResponse(Public):
    identity_id: str
    identity_deleted: bool = Field(description="True when the identity itself was removed.")
    deleted_face_ids: list[str] = Field(description="Faces whose embeddings were removed from the database and index.")


# --- calibration (admin) --------------------------------------------------------------------------------------------

MAX_CALIBRATION_DISTANCES = 2_000_000


class CalibrateRequest(BaseModel):
    """POST /calibrate body. `source`: "gallery" (the gallery's identities with >= 2 faces) or "pairs" (squared L2
    distances of labelled pairs the client computed, e.g. with `facegate eval`)."""

    model_config = ConfigDict(extra="forbid")

    source: CalibrationSource
    target_far: float = Field(
        default=1e-3,
        gt=0.0,
        allow_inf_nan=False,
        lt=1.0,
        description="Target false-accept rate (share of different-person pairs accepted). Lower: a stricter "
        "threshold (fewer strangers accepted, more genuine users refused).",
    )
    same: list[float] | None = Field(
        default=None,
        max_length=MAX_CALIBRATION_DISTANCES,
        description="source=pairs: same-person distances (squared L2, each in [0, 4]).",
    )
    different: list[float] | None = Field(
        default=None,
        max_length=MAX_CALIBRATION_DISTANCES,
        description="source=pairs: different-person distances (squared L2, each in [0, 4]).",
    )
    apply: bool = Field(
        default=False,
        description="Store the threshold as the deployment threshold (used by verify/identify requests that give "
        "none), with when and from what it was computed. Refused (409 insufficient_data) with fewer than 1/target_far "
        "different-person pairs, which cannot show the rate.",
    )


class CalibrateResponse(Public):
    threshold: float = Field(description="Largest distance whose FAR on the pairs is <= target_far.")
    target_far: float
    far: float = Field(description="FAR measured on the pairs at `threshold`.")
    far_interval: tuple[float, float] = Field(
        description="Confidence interval of the FAR (Clopper-Pearson, `confidence`) from the number of different "
        "pairs: few pairs, wide interval. Pairs sharing photos or people are not independent, so it is optimistic."
    )
    val: float = Field(description="Share of same-person pairs accepted at `threshold` (VAL, FaceNet's term).")
    val_interval: tuple[float, float]
    confidence: float
    n_pairs: int
    n_same: int
    n_different: int
    n_identities: int | None = Field(default=None, description="source=gallery: identities with >= 2 faces used.")
    source: CalibrationSource
    applied: bool = Field(description="True when stored as the deployment threshold.")
    computed_at: datetime
    model_version: str


class CalibrationRow(Public):
    threshold: float
    far: float
    val: float
    far_upper: float = Field(description="Upper 97.5 % confidence bound of the FAR.")


class DefaultTableOut(Public):
    model_version: str
    source: str
    n_same: int
    n_different: int
    n_missing: int
    rows: list[CalibrationRow]


class DeploymentCalibrationOut(Public):
    value: dict[str, Any] = Field(description="What POST /calibrate stored: threshold, target_far, source, "
                                  "computed_at, pair counts, FAR/VAL with intervals, model_version.")
    source: str | None
    updated_at: datetime


class CalibrationResponse(Public):
    threshold: float = Field(description="The threshold a request without its own uses.")
    threshold_source: ThresholdSource = Field(description="deployment (a stored calibration) or settings (FACEGATE_THRESHOLD, or a served head's own).")
    far_estimate: float | None = Field(description="FAR at `threshold` from the shipped default table, if it fits.")
    deployment: DeploymentCalibrationOut | None = Field(description="The stored calibration, if any.")
    default_table: DefaultTableOut | None = Field(
        description="The calibration table shipped with the model (dev pairs): threshold -> FAR, VAL."
    )


class CalibrationCurveResponse(Public):
    """GET /calibration/curve: what each threshold would mean, to choose one before an admin sets it."""

    source: CurveSource = Field(
        description="shipped: the table shipped with the model (dev pairs); gallery: measured now on the gallery's "
        "identities with >= 2 faces."
    )
    description: str = Field(description="Where the pairs came from, in words.")
    model_version: str
    n_same: int
    n_different: int
    n_identities: int | None = Field(default=None, description="source=gallery: identities with >= 2 faces used.")
    rows: list[CalibrationRow] = Field(description="Threshold -> FAR (with upper bound) and VAL, ascending.")
    threshold: float = Field(description="The threshold a request without its own uses now.")
    threshold_source: ThresholdSource


class CalibrationReset(Public):
    removed: bool = Field(description="True when a stored deployment threshold was removed.")
    threshold: float
    threshold_source: ThresholdSource


# --- cluster --------------------------------------------------------------------------------------------------------


class ClusterFaceOut(Public):
    photo: str = Field(description="The uploaded file's name (cut to 64 characters).")
    photo_index: int = Field(description="Position of the photo among the uploaded `images` (from 0).")
    box: BoxOut
    score: float


class ClusterOut(Public):
    size: int
    members: list[ClusterFaceOut]


class PhotoProblemOut(Public):
    photo: str
    photo_index: int
    code: str = Field(description="no_face, invalid_image, image_too_large, ..., or too_many_faces")
    message: str


class ClusterResponse(Public):
    threshold: float
    threshold_source: ThresholdSource
    n_photos: int
    n_faces: int
    clusters: list[ClusterOut] = Field(description="Groups of >= 2 faces taken for one person, largest first.")
    sizes: list[int]
    unclustered: list[ClusterFaceOut] = Field(description="Faces left alone in their cluster (singletons): most match no other face, but chinese whispers can also leave one whose only link is to a face of a larger cluster.")
    problems: list[PhotoProblemOut] = Field(
        description="Photos that gave no face, with the reason, and photos with more faces than "
        "FACEGATE_DETECTOR__MAX_FACES (too_many_faces: their most confident faces were clustered)."
    )


# --- health ---------------------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    models_loaded: bool
    providers: dict[str, str | None] = Field(description="ONNX Runtime provider each network actually runs on.")
    database: bool = Field(description="The database answered a query.")
    gallery_size: int | None = Field(description="Faces in the search index.")
    identities: int | None = None
    stale_faces: int | None = Field(description="Stored faces made by another model version (not searched).")
    model_version: str
    problems: list[str] = Field(default_factory=list, description="Why not ready, if not.")


class RouteLatencyOut(Public):
    method: str
    route: str = Field(description="Route template, e.g. /identities/{identity_id}.")
    count: int = Field(description="Requests of this route among the recent ones.")
    p50_ms: float
    p95_ms: float
    max_ms: float


class LatencySummary(Public):
    """GET /metrics/summary: latency of the most recent requests of the whole server (all its worker processes)."""

    window: int = Field(description="How many of the most recent requests are kept (of all workers together).")
    requests: int = Field(description="Requests in the window now.")
    workers: int = Field(
        description="Running worker processes whose requests are in the window (a worker stopped or killed takes "
        "its requests with it)."
    )
    routes: list[RouteLatencyOut] = Field(description="Per route, most requested first.")


class RuleDirOut(Public):
    rule: Literal["raw", "ratio", "facegate"] = Field(
        description="raw: nearest identity's distance d1; ratio: d1/d2 (second-nearest identity); facegate: the "
        "open-set score /identify uses."
    )
    dir_at_fpir: dict[str, float] = Field(
        description="FPIR ('0.01', '0.05', '0.1') -> DIR, the share of probes named correctly when the rule's "
        "threshold is set on these strangers to let that share of them in. FNIR = 1 - DIR."
    )


class IdentifyDefaultPointOut(Public):
    target_fpir: float
    gallery_size: int = Field(description="Identities in the evaluation's gallery (the even half).")
    fpir: float = Field(description="Strangers named as someone by /identify's rule at the deployment settings.")
    fpir_interval: tuple[float, float] = Field(description="95 % Clopper-Pearson interval of `fpir`.")
    dir: float
    fnir: float
    probe_reasons: dict[str, int]
    stranger_reasons: dict[str, int]


class IdentifyEvaluationResponse(Public):
    """Issue 9's open-set protocol on the live gallery: identities sorted by name; those at even positions keep
    their first-enrolled face as the gallery and their other faces are probes; every face of the others is a
    stranger. Nothing is changed."""

    model_version: str
    n_identities: int
    n_faces: int
    n_enrolled: int
    n_probes: int
    n_strangers: int
    rank1: float = Field(description="Share of probes whose nearest identity is right (the ceiling of DIR).")
    rules: list[RuleDirOut]
    default: IdentifyDefaultPointOut
    raw_threshold_point: dict[str, float] = Field(
        description="The raw rule at the 1:1 threshold (nearest identity if d1 <= threshold): fpir and dir."
    )


class IndexStateResponse(Public):
    """One worker's in-memory search index after replaying the change log (counts and a digest; no embedding)."""

    pid: int = Field(description="Process id of the worker that answered (workers share the port).")
    model_version: str
    size: int = Field(description="Searchable faces.")
    identities: int = Field(description="Identities with at least one searchable face.")
    stale: int = Field(description="Stored faces of another model version (not searchable).")
    last_change_id: int = Field(description="Last change-log entry replayed.")
    face_ids_sha256: str = Field(
        description="SHA-256 (hex) of the sorted searchable face ids joined by '\\n': equal to the same digest "
        "of the database's face ids when this worker's index agrees with it."
    )

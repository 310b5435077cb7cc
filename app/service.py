"""The use cases behind the HTTP routes and the CLI: enrol, verify, identify, manage identities, calibrate,
cluster. No HTTP here.

Every method is blocking (decode, ONNX Runtime, SQL): routes call them through a threadpool. Results are frozen
dataclasses; failures are the typed exceptions of `app.errors` (mapped to HTTP only in `app.api.errors`).

Thresholds: a request's own value wins, else the deployment threshold stored in the gallery database (set by
`calibrate(..., apply=True)`), else `Settings.threshold`. Every decision carries the distance, the threshold it
used and `far_estimate`, the false-accept rate at that threshold from the calibration table shipped with the model.

Enrolment gates (issue 5): a face failing a quality limit (`Settings.quality`, measured by `app.vision.quality` on
the chip the embedding came from) is refused with LowQuality unless `allow_low_quality`; a NEW identity whose face
already matches an enrolled identity within the threshold is refused with PossibleDuplicate unless
`allow_duplicate`. Verify and identify report the same quality measurements without refusing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from app.blas import limit_blas_threads
from app.config import Settings
from app.errors import (
    DatabaseUnavailable,
    FacegateError,
    ImageNotStored,
    InsufficientData,
    InvalidRequest,
    LowQuality,
    NoEnrolledFaces,
    PossibleDuplicate,
)
from app.gallery import (
    DeletionReport,
    DeploymentSettingRecord,
    DuplicateFace,
    DuplicateGuard,
    Gallery,
    IdentityRecord,
    store,
)
from app.gallery.db import driver_message
from app.grouping import ClusterReport, cluster_photos
from app.identify_eval import GalleryEvaluation, evaluate_gallery
from app.matching.calibration import (
    CalibrationTable,
    FarCalibration,
    calibrate_far,
    compute_default_table,
    load_default_table,
    pairs_from_gallery,
)
from app.matching.clustering import TooManyLinks
from app.matching.data_files import OPENSET_FILE, TABLE_FILE, data_dir
from app.matching.distances import pairwise_squared_l2
from app.matching.openset import OpenSetModel, Reason, decide, load_default_model
from app.matching.thresholds import DEFAULT_THRESHOLD, MAX_THRESHOLD, is_match, validate_threshold
from app.names import clean_name
from app.vision.decode import media_type
from app.vision.pipeline import Pipeline, PixelBudget, no_face
from app.vision.quality import FaceQuality, QualityFailure, QualityIssue, QualityThresholds, assess
from app.vision.types import Box, Face, PhotoFaces

log = logging.getLogger(__name__)

# deployment_settings key of the calibrated threshold: a number, or an object with a numeric "threshold".
DEPLOYMENT_THRESHOLD_KEY = "threshold"
# Links of the threshold graph one /cluster request may build (each face to each face it matches, itself included):
# 16 MB of indices, e.g. 1,400 faces that all match each other. Faces that all match make n^2 links: 10,000 (100
# photos of 100 faces) took 800 MB and minutes of chinese whispers. The CLI's `cluster DIR` has no such limit.
CLUSTER_MAX_LINKS = 2_000_000
# Squared L2 distance under which a photo's face counts as one the identity already has: the same photo embeds to
# the same numbers (distance 0 up to float rounding), while two photos of a person are ~0.01 or more apart. Adding
# such a face again stores nothing (a client retrying an enrolment whose answer it lost; `facegate enroll DIR` run
# again).
SAME_PHOTO_DISTANCE = 1e-4


class FacePolicy(StrEnum):
    """Which face of a photo to use: `single` refuses photos with several faces, `largest` takes the largest box."""

    single = "single"
    largest = "largest"


class ThresholdSource(StrEnum):
    request = "request"
    deployment = "deployment"
    settings = "settings"


@dataclass(frozen=True, slots=True)
class Threshold:
    value: float
    source: ThresholdSource


class CalibrationSource(StrEnum):
    """Where calibration pairs come from: the gallery's own identities with >= 2 faces, or distances of labelled
    pairs computed elsewhere (`facegate eval` / `facegate calibrate` on photos)."""

    gallery = "gallery"
    pairs = "pairs"


@dataclass(frozen=True, slots=True)
class FoundFace:
    """A face found in a request's photo (its embedding stays inside the service), with its quality measurements
    and the quality limits it fails (reported by verify/identify, enforced by enrolment)."""

    box: Box
    score: float
    quality: FaceQuality | None = None
    quality_issues: tuple[QualityFailure, ...] = ()
    # The 5 landmark points (x, y) in the photo's pixels, so a client can show what the alignment used.
    landmarks: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Candidate:
    identity_id: str
    name: str
    face_id: str
    distance: float


@dataclass(frozen=True, slots=True)
class EnrollResult:
    identity_id: str
    face_id: str
    name: str
    created: bool
    face: FoundFace
    model_version: str
    possible_duplicate: Candidate | None = None  # an identity this new one matches (enrolled with allow_duplicate)
    already_enrolled: bool = False  # the identity already had this face: nothing stored, face_id is that face's


@dataclass(frozen=True, slots=True)
class VerifyResult:
    match: bool
    distance: float
    threshold: Threshold
    far_estimate: float | None
    face: FoundFace  # the probe (photo A for photo-vs-photo)
    identity_id: str | None = None
    nearest_face_id: str | None = None
    other_face: FoundFace | None = None  # photo B for photo-vs-photo


@dataclass(frozen=True, slots=True)
class IdentifiedFace:
    face: FoundFace
    candidates: tuple[Candidate, ...]  # nearest first, at most top_k
    match: Candidate | None  # set only when `reason` is accepted
    reason: Reason  # accepted / unknown / ambiguous (app.matching.openset)
    margin: float | None  # second-nearest identity's distance minus the nearest's
    fpir_estimate: float | None  # how often a stranger scores this well at this gallery size
    ratio: float | None = None  # nearest identity's distance / second nearest's
    score: float | None = None  # the open-set score s (lower = more confident); None with an empty gallery
    score_threshold: float | None = None  # t(N, target FPIR): accepted needs score <= this
    accept_distance: float | None = None  # the same test in distance terms: accepted needs distance <= this

    @property
    def ambiguous(self) -> bool:
        return self.reason is Reason.AMBIGUOUS


@dataclass(frozen=True, slots=True)
class EmbeddedFace:
    """A face and its embedding (POST /embed hands embeddings to the client: biometric data, read scope)."""

    face: FoundFace
    embedding: tuple[float, ...]  # the 128 values the service compares (Face.embedding)


@dataclass(frozen=True, slots=True)
class EmbeddedPhoto:
    faces: tuple[EmbeddedFace, ...]  # highest detector score first
    model_version: str
    faces_detected: int  # more than len(faces) when the photo had over detector.max_faces


@dataclass(frozen=True, slots=True)
class IdentifyResult:
    faces: tuple[IdentifiedFace, ...]
    threshold: Threshold  # the largest distance at which anyone is named (the 1:1 threshold)
    target_fpir: float
    far_estimate: float | None
    gallery_size: int  # faces searched
    identities: int  # identities searched
    faces_detected: int  # more than len(faces) when the photo had over detector.max_faces


@dataclass(frozen=True)
class CalibrationResult:
    calibration: FarCalibration  # threshold, FAR and VAL there with confidence intervals, pair counts
    source: CalibrationSource
    n_identities: int | None  # gallery source: identities with >= 2 faces that gave pairs
    applied: bool  # stored as the deployment threshold
    computed_at: datetime
    model_version: str
    note: str | None = None  # where the pairs came from, in words (e.g. the CSV file)

    @property
    def n_pairs(self) -> int:
        return self.calibration.n_same + self.calibration.n_different

    def stored_value(self) -> dict[str, Any]:
        """The deployment setting written when applied (`resolve_threshold` reads its "threshold")."""
        c = self.calibration
        return {
            "threshold": c.threshold,
            "target_far": c.target_far,
            "source": self.source.value,
            "computed_at": self.computed_at.isoformat(),
            "n_pairs": self.n_pairs,
            "n_same": c.n_same,
            "n_different": c.n_different,
            "n_identities": self.n_identities,
            "far": c.far,
            "far_interval": list(c.far_interval),
            "val": c.val,
            "val_interval": list(c.val_interval),
            "confidence": c.confidence,
            "model_version": self.model_version,
            "note": self.note,
        }


@dataclass(frozen=True)
class CalibrationStatus:
    threshold: Threshold  # what a request without its own threshold uses
    far_estimate: float | None  # the shipped table's FAR at that threshold
    deployment: DeploymentSettingRecord | None  # the stored calibration, if any
    table: CalibrationTable | None  # the shipped default table (None when it does not fit the served model)


class CurveSource(StrEnum):
    """Which FAR/VAL curve: the table shipped with the model (dev pairs) or one measured on the gallery's own
    identities with >= 2 faces."""

    shipped = "shipped"
    gallery = "gallery"


@dataclass(frozen=True)
class CalibrationCurve:
    source: CurveSource
    table: CalibrationTable  # FAR, its upper bound and VAL at each threshold of the grid
    threshold: Threshold  # what a request without its own threshold uses now
    n_identities: int | None  # gallery source: identities with >= 2 faces that gave pairs


@dataclass(frozen=True)
class ClusterResult:
    report: ClusterReport
    threshold: Threshold


@dataclass(frozen=True, slots=True)
class IdentityPage:
    items: tuple[IdentityRecord, ...]
    total: int
    offset: int
    limit: int
    next: str | None  # the cursor of the following page (`after`); None on the last page
    start: int  # identities matching the filter before the page's first


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    models_loaded: bool
    providers: dict[str, str | None]
    database: bool
    gallery_size: int | None
    identities: int | None
    stale_faces: int | None
    model_version: str
    problems: tuple[str, ...]


class FaceService:
    """Pipeline (vision) + Gallery (storage and search) + the decision rules."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        gallery: Gallery,
        *,
        calibration: CalibrationTable | None = None,
        openset: OpenSetModel | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.gallery = gallery
        self.calibration = calibration  # 1:1 FAR estimates (none when no table fits the model)
        self.quality_limits = QualityThresholds(**settings.quality.model_dump())
        self.openset = openset if openset is not None else load_default_model()  # 1:N acceptance scores
        # The stored deployment setting as last read (None: none stored; absent: never read), used while the database
        # cannot be read: see `deployment_threshold`.
        self._deployment: tuple[DeploymentSettingRecord | None] | None = None

    @classmethod
    def open(cls, settings: Settings, *, load_models: bool | None = None) -> FaceService:
        """Verify and (if `load_models`, default `settings.preload_models`) load the models, open the gallery with
        its migrations applied and build the search index."""
        limit_blas_threads(settings.runtime.blas_threads)
        pipeline = Pipeline.from_settings(settings)
        if settings.preload_models if load_models is None else load_models:
            pipeline.load()
            log.info("models loaded: %s, providers %s", pipeline.model_version, pipeline.providers())
        # Faces made by an earlier build of the same embeddings, applied the same way (plain, mirror-averaged, through
        # the same head: the version's suffix), are this model's; those applied otherwise are another scale and stay
        # stale.
        gallery = Gallery.open(
            settings.database_url,
            pipeline.model_version,
            migrate=True,
            index=settings.index,
            adopt=pipeline.manifest.earlier_names(pipeline.model_version),
            lock_timeout=settings.database_lock_timeout,
            statement_timeout=settings.database_statement_timeout,
        )
        stats = gallery.stats()
        log.info(
            "gallery: %d faces searchable, %d identities, %d stale faces; %s search",
            stats.size,
            stats.identities,
            stats.stale,
            gallery.index.backend,
        )
        if stats.stale:
            # Not searched, so people enrolled with them are "unknown" until recomputed: an operator who switched
            # the model (a head, FACEGATE_EMBEDDING__FLIP) back and forth had only the INFO line above to go by.
            log.warning(
                "%d stored faces were made by another model version than %s and are not searched (%d are): run "
                "`facegate reindex`, or serve the model they were made with",
                stats.stale,
                pipeline.model_version,
                stats.size,
            )
        service = cls(
            settings,
            pipeline,
            gallery,
            # The shipped table is the base's: with a head (another distance scale) no FAR estimate is given.
            calibration=_default_calibration(
                pipeline.model_version,
                pipeline.embedding_name if pipeline.head is None else "",
                data_dir(pipeline.flip) / TABLE_FILE,
            ),
            openset=load_default_model(data_dir(pipeline.flip) / OPENSET_FILE),
        )
        service._deployment = (gallery.get_setting(DEPLOYMENT_THRESHOLD_KEY),)  # known should the database go away
        return service

    def close(self) -> None:
        # Writes stop first: at shutdown, the requests still running were cut and answered 503 (shutting_down), so
        # nothing their threads go on to do once the inference threads have finished the queue may be stored.
        self.gallery.stop_writes()
        # What is still queued for the inference threads belongs to requests that were cut (answered 503): running it
        # only delayed the exit past the orchestrator's grace period (40 cut /embed requests: 12.7 s), then SIGKILL.
        self.pipeline.close(discard=True)
        self.gallery.close()

    # ----------------------------------------------------------------------------------------- photos

    def face_of(self, photo: bytes, face: FacePolicy = FacePolicy.single) -> Face:
        """The one face of a photo (NoFace / MultipleFaces otherwise)."""
        return self.pipeline.embed_photo(self.pipeline.decoder(photo), face=face.value)

    def found(self, face: Face) -> FoundFace:
        """The public view of a face: box, score, quality measurements and the quality limits it fails."""
        issues = tuple(assess(face.quality, self.quality_limits)) if face.quality is not None else ()
        points = tuple((int(x), int(y)) for x, y in face.landmarks)
        return FoundFace(face.box, face.score, face.quality, issues, points)

    # ---------------------------------------------------------------------------------------- enrol

    def enroll(
        self,
        photo: bytes,
        *,
        name: str | None = None,
        identity_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        face: FacePolicy = FacePolicy.single,
        allow_low_quality: bool = False,
        allow_duplicate: bool = False,
    ) -> EnrollResult:
        """Enrol the photo's face: as a new identity called `name`, or as one more face of `identity_id`.

        Refused with LowQuality when the face fails a quality limit (`settings.quality`) unless `allow_low_quality`;
        a NEW identity is refused with PossibleDuplicate when the face already matches an enrolled identity within
        the threshold, unless `allow_duplicate` (the match is then reported in the result). A face the identity
        already has (SAME_PHOTO_DISTANCE: the same photo again) is not stored twice: the result is that face's,
        with `already_enrolled`."""
        if (name is None) == (identity_id is None):
            raise InvalidRequest("give either name (a new identity) or identity_id (add a face), not both or neither")
        if identity_id is not None and metadata is not None:
            raise InvalidRequest("metadata can only be given when creating an identity; use PATCH /identities/{id}")
        if metadata is not None:
            _check_metadata(metadata)  # before any model work
        if name is not None:
            name = clean_name(name)
        else:
            assert identity_id is not None
            name = self.gallery.get_identity(identity_id).name  # UnknownIdentity before any model work
        found = self.face_of(photo, face)
        public = self.found(found)
        if identity_id is not None:
            # Before the quality limits: a face the identity has was let in once already (checked again under the
            # write lock, against a concurrent retry, by enroll_face).
            face_ids, distances = self.gallery.identity_distances(found.embedding, identity_id)
            if face_ids and float(distances[0]) <= SAME_PHOTO_DISTANCE:
                return EnrollResult(
                    identity_id, face_ids[0], name, False, public, self.pipeline.model_version, already_enrolled=True
                )
        if public.quality_issues and not allow_low_quality:
            assert found.quality is not None
            raise LowQuality(
                "the face is not good enough to enrol: "
                + "; ".join(_describe(issue) for issue in public.quality_issues)
                + " (send a better photo, or allow_low_quality=true to enrol it anyway)",
                reasons=[issue.as_dict() for issue in public.quality_issues],
                quality=found.quality.as_dict(),
                box=public.box.as_dict(),  # so a client can show which face was judged
                landmarks=[list(p) for p in public.landmarks],
            )
        duplicate, guard = None, None
        if identity_id is None:
            threshold = self.resolve_threshold().value
            self.gallery.refresh()
            checked_upto = self.gallery.stats().last_change_id  # before the search: the search sees at least this
            duplicate = self.nearest_within_threshold(found.embedding, threshold)
            if duplicate is not None and not allow_duplicate:
                self._refuse_duplicate(duplicate, threshold)
            if not allow_duplicate:
                # Checked again under the write lock against the faces added since: two concurrent enrolments
                # of one new face cannot both pass.
                guard = DuplicateGuard(threshold=threshold, checked_upto=checked_upto)
        try:
            enrolment = self.gallery.enroll_face(
                embedding=found.embedding,
                box=found.box,
                score=found.score,
                identity_id=identity_id,
                name=name if identity_id is None else None,
                metadata=metadata,
                image=photo if self.settings.store_images else None,
                base_embedding=found.embedding if found.base_embedding is None else found.base_embedding,
                unless_near=guard,
                same_face_within=SAME_PHOTO_DISTANCE,
            )
        except DuplicateFace as near:
            assert guard is not None
            names = self._names({near.identity_id})
            name_of = names.get(near.identity_id, "")
            self._refuse_duplicate(Candidate(near.identity_id, name_of, near.face_id, near.distance), guard.threshold)
        except ValueError as error:  # the store's input checks (name/metadata); the message names the field
            raise InvalidRequest(str(error)) from None
        return EnrollResult(
            identity_id=enrolment.identity_id,
            face_id=enrolment.face.id,
            name=name,
            created=enrolment.identity_created,
            face=public,
            model_version=self.pipeline.model_version,
            possible_duplicate=duplicate,
            already_enrolled=not enrolment.face_added,
        )

    @staticmethod
    def _refuse_duplicate(duplicate: Candidate, threshold: float) -> NoReturn:
        raise PossibleDuplicate(
            f"this face already matches identity {duplicate.name!r} ({duplicate.identity_id}) at distance "
            f"{duplicate.distance:.4f}: add the face to it (identity_id), or allow_duplicate=true to create "
            "a new identity anyway",
            identity_id=duplicate.identity_id,
            name=duplicate.name,
            face_id=duplicate.face_id,
            distance=duplicate.distance,
            threshold=threshold,
        )

    def nearest_within_threshold(self, embedding: Any, threshold: float) -> Candidate | None:
        """The enrolled identity nearest to `embedding` if it is within `threshold`, else None, in the index as this
        process holds it (the caller refreshes it first, to know how far the search saw)."""
        results = self.gallery.search(np.asarray(embedding, np.float32)[None, :], top_k=1, refresh=False)
        if not results or not results[0] or results[0][0].distance > threshold:
            return None
        best = results[0][0]
        names = self._names({best.identity_id})
        if best.identity_id not in names:
            return None
        return Candidate(best.identity_id, names[best.identity_id], best.face_id, float(best.distance))

    # --------------------------------------------------------------------------------------- verify

    def verify_identity(
        self, photo: bytes, identity_id: str, *, threshold: float | None = None, face: FacePolicy = FacePolicy.single
    ) -> VerifyResult:
        """1:1: the photo's face against the identity's nearest enrolled face."""
        resolved = self.resolve_threshold(threshold)
        self.gallery.get_identity(identity_id)  # UnknownIdentity before any model work
        found = self.face_of(photo, face)
        face_ids, distances = self.gallery.identity_distances(found.embedding, identity_id)
        if not face_ids:
            raise NoEnrolledFaces(
                f"identity {identity_id!r} has no enrolled face of model {self.pipeline.model_version}",
                identity_id=identity_id,
            )
        distance = float(distances[0])
        return VerifyResult(
            match=is_match(distance, resolved.value),
            distance=distance,
            threshold=resolved,
            far_estimate=self.far_estimate(resolved.value),
            face=self.found(found),
            identity_id=identity_id,
            nearest_face_id=face_ids[0],
        )

    def verify_photos(
        self, photo_a: bytes, photo_b: bytes, *, threshold: float | None = None, face: FacePolicy = FacePolicy.single
    ) -> VerifyResult:
        """1:1: photo against photo; nothing is stored."""
        resolved = self.resolve_threshold(threshold)
        a = self._labelled(photo_a, face, "image_a")
        b = self._labelled(photo_b, face, "image_b")
        distance = float(pairwise_squared_l2(a.embedding, b.embedding)[0])
        found_a, found_b = self.found(a), self.found(b)
        _refuse_indistinct_pair(found_a, found_b)
        return VerifyResult(
            match=is_match(distance, resolved.value),
            distance=distance,
            threshold=resolved,
            far_estimate=self.far_estimate(resolved.value),
            face=found_a,
            other_face=found_b,
        )

    def _labelled(self, photo: bytes, face: FacePolicy, field: str) -> Face:
        """Like `face_of`, naming the field in the error so the client knows which photo failed."""
        try:
            return self.face_of(photo, face)
        except FacegateError as error:
            error.details.setdefault("field", field)
            raise

    # ------------------------------------------------------------------------------------- identify

    def identify(self, photo: bytes, *, top_k: int = 5, threshold: float | None = None) -> IdentifyResult:
        """Open-set 1:N for every face of the photo: candidates nearest first; a `match` only when the open-set rule
        accepts the nearest identity (within the threshold, clear of the runner-up, and scoring better than
        strangers do at this gallery size for `identify_fpir`)."""
        resolved = self._identify_threshold(top_k, threshold)
        found = self.pipeline.photo_faces(self.pipeline.decoder(photo))
        return self.identify_faces(found, top_k=top_k, resolved=resolved)

    def _identify_threshold(self, top_k: int, threshold: float | None) -> Threshold:
        """Checks an identify request's numbers before any photo is decoded; the threshold it will use."""
        if not 1 <= top_k <= 1000:
            raise InvalidRequest("top_k must be between 1 and 1000")
        return self.resolve_threshold(threshold)

    def identify_faces(self, found_faces: PhotoFaces, *, top_k: int, resolved: Threshold) -> IdentifyResult:
        """`identify` for faces already found (and embedded) in one photo."""
        faces = found_faces.faces
        if not faces:
            raise no_face(found_faces.min_face_px)
        # The rule needs the runner-up even when one candidate is asked for.
        results = self.gallery.search(np.stack([f.embedding for f in faces]), top_k=max(top_k, 2))
        stats = self.gallery.stats()
        names = self._names({c.identity_id for per_face in results for c in per_face})
        identified = []
        for found, candidates in zip(faces, results, strict=True):
            ranked = [
                Candidate(c.identity_id, names[c.identity_id], c.face_id, c.distance)
                for c in candidates
                if c.identity_id in names  # deleted between the search and the name lookup
            ]
            decision = decide(
                [c.distance for c in ranked],
                [c.identity_id for c in ranked],
                target_fpir=self.settings.identify_fpir,
                max_distance=resolved.value,
                ambiguity_margin=self.settings.ambiguity_margin,
                gallery_size=max(stats.identities, len(ranked)),
                # more faces per identity give a stranger more chances: the rule is calibrated for them too
                gallery_faces=max(stats.size, stats.identities, len(ranked)),
                model=self.openset,
            )
            match = ranked[0] if decision.match_identity is not None else None
            feature = decision.features.get
            identified.append(
                IdentifiedFace(
                    self.found(found),
                    tuple(ranked[:top_k]),
                    match,
                    decision.reason,
                    _number(feature("margin")),
                    # the open-set model was fitted on base distances: no estimate on a head's scale
                    None if self.pipeline.head is not None else _number(feature("fpir_estimate")),
                    ratio=_number(feature("ratio")),
                    score=_number(feature("score")),
                    score_threshold=_number(decision.thresholds.get("score")),
                    accept_distance=_number(decision.thresholds.get("accept_distance")),
                )
            )
        return IdentifyResult(
            faces=tuple(identified),
            threshold=resolved,
            target_fpir=self.settings.identify_fpir,
            far_estimate=self.far_estimate(resolved.value),
            gallery_size=stats.size,
            identities=stats.identities,
            faces_detected=found_faces.detected,
        )

    # ---------------------------------------------------------------------------------- many photos

    def embed_photos(self, photos: Sequence[bytes]) -> list[EmbeddedPhoto | FacegateError]:
        """Every face of each photo with its embedding (POST /embed), in the photos' order. A photo that cannot be
        used (not an image, too large or small, no face) gets its error in its place; the others are unaffected.
        The photos' faces are embedded together (app.vision.pipeline.Pipeline.find_faces_many)."""
        return [
            found
            if isinstance(found, FacegateError)
            else EmbeddedPhoto(
                tuple(EmbeddedFace(self.found(f), tuple(float(v) for v in f.embedding)) for f in found.faces),
                self.pipeline.model_version,
                found.detected,
            )
            for found in self._faces_of_photos(photos)
        ]

    def identify_photos(
        self, photos: Sequence[bytes], *, top_k: int = 5, threshold: float | None = None
    ) -> list[IdentifyResult | FacegateError]:
        """`identify` for each photo (POST /identify/batch): per photo its result, or its error in its place. One
        threshold (resolved once) for all."""
        resolved = self._identify_threshold(top_k, threshold)
        return [
            found if isinstance(found, FacegateError) else self.identify_faces(found, top_k=top_k, resolved=resolved)
            for found in self._faces_of_photos(photos)
        ]

    def _faces_of_photos(self, photos: Sequence[bytes]) -> list[PhotoFaces | FacegateError]:
        """Decode and find the faces of up to `settings.batch.max_images` photos; per photo its faces (never
        empty) or the error it alone caused (a model failure concerns them all and is raised)."""
        limit = self.settings.batch.max_images
        if not photos:
            raise InvalidRequest("send at least one photo", field="images")
        if len(photos) > limit:
            raise InvalidRequest(
                f"{len(photos)} photos sent; at most {limit} per request (FACEGATE_BATCH__MAX_IMAGES)",
                field="images",
                limit=limit,
            )
        # Decoded one at a time, inside the pipeline: only one photo is held at full size.
        budget = PixelBudget(self.settings.image.max_request_pixels)
        found = self.pipeline.photo_faces_many([self.pipeline.decoder(photo, budget) for photo in photos])
        return [
            no_face(r.min_face_px) if isinstance(r, PhotoFaces) and not r.faces else r for r in found
        ]

    def _names(self, identity_ids: set[str]) -> dict[str, str]:
        """One query; an identity deleted by another request since the search is absent."""
        return self.gallery.identity_names(identity_ids)

    # ------------------------------------------------------------------------------------ thresholds

    def resolve_threshold(self, override: float | None = None) -> Threshold:
        """The request's value, else the deployment's calibrated threshold, else `Settings.threshold`."""
        if override is not None:
            try:
                return Threshold(validate_threshold(override), ThresholdSource.request)
            except ValueError as error:
                raise InvalidRequest(str(error), field="threshold") from None
        stored = self.deployment_threshold()
        if stored is not None:
            return Threshold(stored, ThresholdSource.deployment)
        head = self.pipeline.head
        if head is not None and "threshold" not in self.settings.model_fields_set:
            # A head's distances have their own scale: its manifest's calibrated threshold, unless
            # FACEGATE_THRESHOLD is set explicitly.
            return Threshold(head.threshold, ThresholdSource.settings)
        return Threshold(self.settings.threshold, ThresholdSource.settings)

    def deployment_threshold(self) -> float | None:
        try:
            record = self.gallery.get_setting(DEPLOYMENT_THRESHOLD_KEY)
            self._deployment = (record,)
        except DatabaseUnavailable:
            # Photo against photo needs no other data: while the database is out, the threshold as this worker last
            # read it (nobody can store another meanwhile). Never read: the request gets the 503.
            if self._deployment is None:
                raise
            record = self._deployment[0]
        if record is None:
            return None
        value: Any = record.value.get("threshold") if isinstance(record.value, dict) else record.value
        made_by = record.value.get("model_version") if isinstance(record.value, dict) else None
        serving = self.pipeline.model_version
        if made_by and _distance_scale(str(made_by)) != _distance_scale(serving):
            # calibrated on another distance scale (a head's, mirror-averaged or not): meaningless here. Another build
            # of the same network and scale (an older converter) keeps it.
            log.warning("ignoring the deployment threshold calibrated for %s (serving %s)", made_by, serving)
            return None
        try:
            return validate_threshold(float(value))
        except (TypeError, ValueError):
            log.warning("ignoring unusable deployment threshold %r (source %s)", record.value, record.source)
            return None

    def far_estimate(self, threshold: float) -> float | None:
        if self.calibration is None:
            return None
        value = float(self.calibration.far_at(threshold))
        return value if math.isfinite(value) else None

    # ---------------------------------------------------------------------------------- calibration

    def calibrate(
        self,
        source: CalibrationSource,
        *,
        target_far: float = 1e-3,
        same: Sequence[float] | None = None,
        different: Sequence[float] | None = None,
        apply: bool = False,
        note: str | None = None,
    ) -> CalibrationResult:
        """The largest threshold whose FAR on the pairs is <= `target_far`, with the VAL it gives and binomial
        confidence intervals (app.matching.calibration). Pairs: the gallery's identities with >= 2 faces (every
        same pair, up to 200k different pairs), or the `same` / `different` distances given. With `apply`, it
        becomes the deployment threshold (stored in the gallery database with when and from what; `note`, e.g. the
        pairs file, is stored with it)."""
        n_identities: int | None = None
        if source is CalibrationSource.gallery:
            if same is not None or different is not None:
                raise InvalidRequest("source 'gallery' takes no distances; use source 'pairs' to send them")
            same_d, diff_d, n_identities = self._gallery_pairs()
        else:
            if not same or not different:
                raise InvalidRequest("source 'pairs' needs both `same` and `different` distances (non-empty)")
            same_d = _pair_distances("same", same)
            diff_d = _pair_distances("different", different)
        try:
            calibration = calibrate_far(same_d, diff_d, target_far)
        except ValueError as error:
            raise InvalidRequest(str(error), field="target_far") from None
        problem = calibration.unusable()
        if problem is not None:  # never stored (deployment_threshold() would ignore it) nor reported as usable
            raise InsufficientData(problem)
        # A float: 1 / 5e-324 (a valid target_far) is inf, which math.ceil cannot take, and no count reaches. The
        # 1e-9: 1 / 1e-5 is 99999.99999999999.
        needed = 1 / target_far - 1e-9
        if apply and calibration.n_different < needed:
            shown = f"{math.ceil(needed)}" if needed < 1e15 else f"{needed:.3g}"
            # Fewer pairs cannot show a single false accept at this rate: the threshold is then only "under the
            # nearest different pair", and storing it would have every verify and identify claim a FAR unmeasured.
            raise InsufficientData(
                f"applying a threshold for FAR {target_far:g} needs at least {shown} different-person pairs "
                f"(1/FAR); these are {calibration.n_different}, which cannot show a single false accept at that rate "
                f"(the threshold they give, {calibration.threshold:.4f}, is only known to keep the FAR under "
                f"{calibration.far_interval[1]:.2g}). Calibrate without apply to see it, or on more pairs",
            )
        result = CalibrationResult(
            calibration=calibration,
            source=source,
            n_identities=n_identities,
            applied=apply,
            computed_at=datetime.now(UTC),
            model_version=self.pipeline.model_version,
            note=note,
        )
        if apply:
            self.gallery.set_setting(
                DEPLOYMENT_THRESHOLD_KEY, result.stored_value(), source=f"calibration:{source.value}"
            )
            log.info(
                "deployment threshold set to %.4f (target FAR %g, %s, %d pairs)",
                calibration.threshold,
                target_far,
                source.value,
                result.n_pairs,
            )
        return result

    def _gallery_pairs(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Same and different distances among the gallery's faces of the served model (identities with >= 2)."""
        with self.gallery.session() as session:
            _, identity_ids, versions, embeddings = store.all_faces(session)
        keep = np.array([v == self.pipeline.model_version for v in versions], dtype=bool)
        if not keep.any():
            raise InsufficientData("the gallery has no face to calibrate on")
        try:
            pairs = pairs_from_gallery(np.asarray(identity_ids)[keep], embeddings[keep])
        except ValueError:
            raise InsufficientData(
                "calibrating on the gallery needs identities with at least 2 faces; none has"
            ) from None
        same_d = pairs.distances[pairs.same].astype(np.float64)
        diff_d = pairs.distances[~pairs.same].astype(np.float64)
        if diff_d.size == 0:
            raise InsufficientData(
                "calibrating on the gallery needs at least 2 identities with 2 or more faces (for different-person "
                f"pairs); {pairs.n_identities} has"
            )
        return same_d, diff_d, pairs.n_identities

    def evaluate_identification(self) -> GalleryEvaluation:
        """Issue 9's open-set protocol on the gallery's own faces of the served model (app.identify_eval)."""
        with self.gallery.session() as session:
            faces = store.faces_for_evaluation(session, model_version=self.pipeline.model_version)
        # The threshold /identify uses (a calibrated deployment threshold, a head's), not the setting alone.
        return evaluate_gallery(
            faces,
            model_version=self.pipeline.model_version,
            settings=self.settings,
            model=self.openset,
            max_distance=self.resolve_threshold().value,
        )

    def calibration_status(self) -> CalibrationStatus:
        threshold = self.resolve_threshold()
        return CalibrationStatus(
            threshold=threshold,
            far_estimate=self.far_estimate(threshold.value),
            deployment=self.gallery.get_setting(DEPLOYMENT_THRESHOLD_KEY),
            table=self.calibration,
        )

    def calibration_curve(self, source: CurveSource) -> CalibrationCurve:
        """FAR and VAL at every threshold of the grid (0..1.2), to show what a threshold means before it is set:
        the shipped table, or the same table computed on the gallery's own pairs (read-only; nothing stored)."""
        threshold = self.resolve_threshold()
        if source is CurveSource.shipped:
            if self.calibration is None:
                raise InsufficientData("no calibration table ships for this model version")
            return CalibrationCurve(source, self.calibration, threshold, None)
        same_d, diff_d, n_identities = self._gallery_pairs()
        table = compute_default_table(
            np.concatenate([same_d, diff_d]),
            np.concatenate([np.ones(same_d.size, bool), np.zeros(diff_d.size, bool)]),
            model_version=self.pipeline.model_version,
            source=f"the gallery's {n_identities} identities with 2 or more faces",
        )
        return CalibrationCurve(source, table, threshold, n_identities)

    def reset_calibration(self) -> bool:
        """Forget the deployment threshold (back to `Settings.threshold`); False when none was stored."""
        return self.gallery.delete_setting(DEPLOYMENT_THRESHOLD_KEY)

    # -------------------------------------------------------------------------------------- cluster

    def cluster(self, photos: Sequence[tuple[str, bytes]], *, threshold: float | None = None) -> ClusterResult:
        """Group every face of the photos by person (chinese whispers over distance <= threshold; by default
        `settings.cluster.threshold`, stricter than the 1:1 threshold since clusters grow along chains of links)."""
        if not photos:
            raise InvalidRequest("send at least one photo", field="images")
        limit = self.settings.cluster.max_photos
        if len(photos) > limit:
            raise InvalidRequest(
                f"{len(photos)} photos sent; at most {limit} per request (FACEGATE_CLUSTER__MAX_PHOTOS)",
                field="images",
                limit=limit,
            )
        if threshold is not None:
            resolved = self.resolve_threshold(threshold)
        else:
            resolved = Threshold(cluster_threshold(self.settings, self.pipeline), ThresholdSource.settings)
        try:
            report = cluster_photos(
                self.pipeline,
                photos,
                resolved.value,
                max_links=CLUSTER_MAX_LINKS,
                budget=PixelBudget(self.settings.image.max_request_pixels),
            )
        except TooManyLinks as error:
            raise InvalidRequest(
                f"the {error.faces} faces of these photos match each other in more than {error.max_links:,} pairs "
                "(a crowd of look-alikes, or one person in very many faces): cluster fewer photos per request, or "
                "lower the threshold",
                field="images",
                faces=error.faces,
                max_links=error.max_links,
            ) from None
        return ClusterResult(report, resolved)

    # ----------------------------------------------------------------------------------- identities

    def list_identities(
        self, *, offset: int = 0, limit: int = 50, name: str | None = None, after: str | None = None
    ) -> IdentityPage:
        """A page by offset, or after the cursor a previous page gave as `next` (not both: the cursor already says
        where the page starts)."""
        key = None
        if after is not None:
            if offset:
                raise InvalidRequest("give either offset or after (a page's `next`), not both", field="after")
            try:
                key = store.PageKey.parse(after)
            except ValueError as error:
                raise InvalidRequest(str(error), field="after") from None
        listing = self.gallery.list_identities(offset=offset, limit=limit, name_contains=name or None, after=key)
        token = listing.next.token() if listing.next is not None else None
        return IdentityPage(tuple(listing.items), listing.total, offset, limit, token, listing.start)

    def get_identity(self, identity_id: str) -> IdentityRecord:
        return self.gallery.get_identity(identity_id)

    def identities_named(self, name: str) -> dict[str, str]:
        """Id -> name of the identities named `name` up to case and Unicode form (see `store.identities_named`)."""
        return self.gallery.identities_named(name)

    def update_identity(
        self, identity_id: str, *, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> IdentityRecord:
        if name is not None:
            name = clean_name(name)
        if metadata is not None:
            _check_metadata(metadata)
        try:
            return self.gallery.update_identity(identity_id, name=name, metadata=metadata)
        except ValueError as error:  # the store's remaining check: the name's length
            raise InvalidRequest(str(error), field="name") from None

    def add_face(
        self,
        identity_id: str,
        photo: bytes,
        *,
        face: FacePolicy = FacePolicy.single,
        allow_low_quality: bool = False,
    ) -> EnrollResult:
        return self.enroll(photo, identity_id=identity_id, face=face, allow_low_quality=allow_low_quality)

    def face_photo(self, identity_id: str, face_id: str) -> tuple[bytes, str]:
        """The photo a face was enrolled from, as uploaded, and its MIME type. Raises UnknownFace, or ImageNotStored
        when photos were not kept (FACEGATE_STORE_IMAGES off at its enrolment)."""
        photo = self.gallery.face_image(identity_id, face_id)
        if photo is None:
            raise ImageNotStored(
                "this face's photo was not kept (FACEGATE_STORE_IMAGES was off when it was enrolled)",
                identity_id=identity_id,
                face_id=face_id,
            )
        return photo, media_type(photo)

    def delete_identity(self, identity_id: str) -> DeletionReport:
        return self.gallery.delete_identity(identity_id)

    def delete_face(self, identity_id: str, face_id: str) -> DeletionReport:
        return self.gallery.delete_face(identity_id, face_id)

    # ------------------------------------------------------------------------------------------ health

    def readiness(self) -> Readiness:
        """Models loaded (or loadable on first use), database reachable, index built. The index first replays the
        changes other workers and processes committed (as a search does), so the counts are the database's."""
        problems = []
        database = True
        try:
            self.gallery.ping()
            self.gallery.refresh()
        except (DatabaseUnavailable, SQLAlchemyError, OSError) as error:
            database = False
            problems.append("database unreachable")
            log.warning("readiness: database unreachable: %s", driver_message(error))
        loaded = self.pipeline.loaded
        if not loaded and self.settings.preload_models:
            problems.append("models not loaded")
        elif not loaded and self.pipeline.load_failed:  # opened on first use, which failed: see the log
            problems.append("models failed to load")
        stats = self.gallery.stats()
        return Readiness(
            ready=not problems,
            models_loaded=loaded,
            providers=self.pipeline.providers(),
            database=database,
            gallery_size=stats.size,
            identities=stats.identities,
            stale_faces=stats.stale,
            model_version=self.pipeline.model_version,
            problems=tuple(problems),
        )

    def unanswered_readiness(self) -> Readiness:
        """Not ready: the database did not answer /readyz's check in time (a stalled server holds it for the
        statement timeout and more). Nothing here waits: the index counts are left out while it is busy."""
        stats = self.gallery.peek_stats()
        return Readiness(
            ready=False,
            models_loaded=self.pipeline.loaded,
            providers=self.pipeline.providers(),
            database=False,
            gallery_size=stats.size if stats else None,
            identities=stats.identities if stats else None,
            stale_faces=stats.stale if stats else None,
            model_version=self.pipeline.model_version,
            problems=("database not answering",),
        )


# Every issue has its words (tests/api/test_quality.py checks): a new QualityIssue without them fails there.
_ISSUE_TEXT: dict[QualityIssue, tuple[str, str]] = {
    QualityIssue.SMALL_FACE: ("face too small", "inter-ocular distance {m:.1f} px < {l:g}"),
    QualityIssue.BLURRY: ("blurred", "sharpness {m:.1f} < {l:g}"),
    QualityIssue.TOO_DARK: ("too dark", "brightness {m:.0f} < {l:g}"),
    QualityIssue.TOO_BRIGHT: ("too bright", "brightness {m:.0f} > {l:g}"),
    QualityIssue.CUT_OFF: ("cut off by the border", "{m:.0%} of the face box outside the photo > {l:.0%}"),
    QualityIssue.TURNED: ("head turned", "|yaw| {m:.2f} > {l:g}"),
    QualityIssue.TILTED: ("head tilted", "|roll| {m:.1f} deg > {l:g}"),
    QualityIssue.LOW_SCORE: ("doubtful detection", "detector score {m:.2f} < {l:g}"),
    QualityIssue.INDISTINCT: (
        "no identity in the face (a photo turned sideways?)",
        "distinctiveness {m:.3f} < {l:g}",
    ),
}


def cluster_threshold(settings: Settings, pipeline: Pipeline) -> float:
    """FACEGATE_CLUSTER__THRESHOLD, fitted on the embedder's distances (0.25, under its 1:1 0.36). A head's unit
    vectors lie on another scale (its 1:1 threshold is ~0.17): unless the setting was given explicitly, the same
    ratio to the head's own threshold (0.25 on an epoch-0 head linked a tenth of the different-person pairs)."""
    configured = settings.cluster.threshold
    head = pipeline.head
    if head is None or "threshold" in settings.cluster.model_fields_set:
        return configured
    return head.threshold * configured / DEFAULT_THRESHOLD


def _refuse_indistinct_pair(a: FoundFace, b: FoundFace) -> None:
    """Two faces that carry no identity (photos turned sideways with no EXIF orientation) match each other whoever
    they show (74 % of different-person pairs on dev): a 1:1 decision on such a pair would be a guess, and one a
    KYC check can be fooled with. One such face against a real one is decided as usual (its distances are those of
    any two people)."""
    failed = [
        next((i for i in f.quality_issues if i.issue is QualityIssue.INDISTINCT), None) for f in (a, b)
    ]
    if all(failed):
        raise LowQuality(
            "neither photo's face carries an identity (both are below FACEGATE_QUALITY__MIN_DISTINCTIVENESS, as faces "
            "in photos turned sideways are): send upright photos",
            reasons=[i.as_dict() for i in failed if i is not None],
        )


def _describe(issue: QualityFailure) -> str:
    what, how = _ISSUE_TEXT[issue.issue]
    return f"{what} ({how.format(m=issue.measured, l=issue.limit)})"


def _pair_distances(field: str, values: Sequence[float]) -> np.ndarray:
    """A calibration request's `same` or `different` distances: squared L2 distances of facegate's embeddings, so
    finite and in [0, 4], the threshold range (raw dlib embeddings are at most ~1.5 apart, a head's unit-norm ones 4).
    A value outside could only give a threshold no decision can use."""
    distances = np.asarray(values, np.float64)
    bad = ~(np.isfinite(distances) & (distances >= 0.0) & (distances <= MAX_THRESHOLD))
    if bad.any():
        raise InvalidRequest(
            f"`{field}` distances must be squared L2 distances in [0, {MAX_THRESHOLD:g}] ({int(bad.sum())} outside, "
            f"the first at index {int(np.argmax(bad))}: {float(distances[bad][0])!r})",
            field=field,
        )
    return distances


def _distance_scale(model_version: str) -> str:
    """What sets a version's distances apart, whatever the ONNX build: the parts after "<network>+onnx...-<digest>"
    ("" for the embedder's own output, "+flip", "+<head>", "+flip+<head>")."""
    parts = model_version.split("+")
    return "+".join(parts[2:]) if len(parts) > 2 and parts[1].startswith("onnx") else "+".join(parts[1:])


def _default_calibration(model_version: str, model_name: str, path: Path) -> CalibrationTable | None:
    """The shipped calibration table at `path`, if it was computed for these embeddings: its `model_version` must
    be the served model's version or its embedding name (the network and how it is applied, whatever the ONNX
    build). Otherwise no FAR estimate is given."""
    try:
        table = load_default_table(path)
    except FileNotFoundError:
        log.info("no default calibration table: responses carry no far_estimate")
        return None
    if table.model_version not in (model_version, model_name):
        log.warning(
            "default calibration table is for model %r, serving %s (%s): responses carry no far_estimate",
            table.model_version,
            model_version,
            model_name,
        )
        return None
    return table


def _check_metadata(metadata: dict[str, Any]) -> None:
    """The store's metadata rules, as a request error naming the field (the store checks again as it writes)."""
    try:
        store.check_metadata(metadata)
    except ValueError as error:
        raise InvalidRequest(str(error), field="metadata") from None


def _number(value: float | int | None) -> float | None:
    return None if value is None else float(value)

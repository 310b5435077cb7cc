"""All settings in one place: environment variables with the prefix FACEGATE_ (groups joined by `__`).

Example: FACEGATE_THRESHOLD=0.3, FACEGATE_DETECTOR__UPSAMPLE=1, FACEGATE_RUNTIME__PROVIDERS='["CPUExecutionProvider"]'.
Core code never reads the environment: it receives these values as arguments.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = REPO_ROOT / "models" / "dist"
# An origin as a browser serialises it (RFC 6454): lower case, a non-ASCII host in its xn-- form, no default port.
_ORIGIN = re.compile(r"(?P<scheme>https?)://(?:[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_DATABASE_SCHEMES = frozenset({"sqlite", "sqlite+pysqlite", "postgresql+psycopg"})  # what app/gallery is tested on


class SettingsGroup(BaseModel):
    """A group of settings (its `FACEGATE_<GROUP>__` variables). NaN and infinity are refused like any value out of
    range: where no bound is set, `nan` or `inf` passed unnoticed (FACEGATE_DETECTOR__SCORE_THRESHOLD=nan: no face
    ever found), and where one is, it failed with a misleading message ("less than or equal to 4")."""

    model_config = ConfigDict(allow_inf_nan=False)


class Provider(StrEnum):
    """ONNX Runtime execution providers facegate knows how to configure."""

    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


class RuntimeSettings(SettingsGroup):
    providers: list[Provider] = Field(
        default=[Provider.CUDA, Provider.CPU],
        min_length=1,  # [] silently meant the CPU
        description="Preferred execution providers, in order; those ONNX Runtime cannot use are skipped (and reported).",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=1024,  # 100000 (a typo) never finished starting, its memory growing; 256 on 2 cores: 13x slower
        description="Threads inside one operator (0 = ONNX Runtime's default: one per core; `facegate serve --workers N` makes it cores/N).",
    )
    inter_op_threads: int = Field(default=1, ge=0, le=1024, description="Threads running independent operators in parallel (0 = default).")
    cuda_tf32: bool = Field(default=False, description="Allow TF32 on CUDA: faster, but embeddings differ from CPU by ~3e-4.")
    blas_threads: int = Field(
        default=1,
        ge=0,
        le=1024,
        description=(
            "Threads numpy's BLAS may use (the exact search's matmul) in the service (0 = its default, one per core). "
            "1 by default: BLAS threads busy-wait after each search and slowed the next photo's detector by ~40 % on 2 cores."
        ),
    )


class DetectorSettings(SettingsGroup):
    upsample: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "How many times the photo is doubled before detection. Each doubling finds faces half as large "
            "(MMOD's window is 80 px) at about 4x the cost. 'auto' doubles once when the working photo's longer "
            "side is under `auto_upsample_below`."
        ),
    )
    auto_upsample_below: int = Field(default=600, ge=0, description="'auto' upsample: double photos whose longer side (px) is below this.")
    max_side: int = Field(
        default=1024,
        ge=64,
        description="Photos larger than this (longer side, px) are shrunk before detection; boxes are reported in the original photo's pixels. A JPEG at least twice this size is decoded straight to 1/2, 1/4 or 1/8 scale (no smaller than the shrunk photo): a 12-megapixel phone photo's faces are found 1.7x faster, a 40-megapixel one's 3x, in a fraction of the memory.",
    )
    score_threshold: float = Field(
        default=0.0,
        ge=-1.0,
        le=2.0,
        description="Minimum MMOD detector score; dlib's own cut-off is 0. Raise it to drop doubtful faces. Clear "
        "faces score about 1 (dev maximum 1.10): above that nothing is found; below -1 every photo gave hundreds of "
        "false faces at seconds each, so the range is -1 to 2.",
    )
    max_faces: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description=(
            "Most faces taken from one photo: each costs landmarks, a chip and an embedding (some 20 ms of CPU on 2 "
            "cores), so a crowd photo is capped. A photo with more keeps its most confident detections, and the "
            "response says how many were found (`faces_detected`)."
        ),
    )

    @model_validator(mode="after")
    def _check_upsample(self) -> DetectorSettings:
        if isinstance(self.upsample, int) and not 0 <= self.upsample <= 2:
            raise ValueError("detector upsample must be 'auto', 0, 1 or 2")
        return self


class ImageSettings(SettingsGroup):
    max_pixels: int = Field(default=40_000_000, ge=1, description="Photos with more pixels are refused (decompression-bomb guard).")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Largest accepted request body, in bytes (the photos with their multipart framing).")
    max_request_pixels: int = Field(
        default=400_000_000,
        ge=1,
        description="Pixels the photos of one POST /embed, /identify/batch or /cluster request may decode together: "
        "once the photos decoded so far reach it, each further photo gets 413 request_too_large in its place, "
        "undecoded. A 40-megapixel PNG can be 50 kB and costs ~1 s to decode and search for faces, so without it "
        "100 of them in one /cluster request kept a worker busy ~100 s. The default (10 photos at image.max_pixels) "
        "stays far above what a body of image.max_upload_bytes of real photos decodes (a large JPEG costs the "
        "reduced scale it is decoded at); raise it with image.max_upload_bytes. At least image.max_pixels.",
    )
    max_concurrent_decodes: int = Field(
        default=2,
        ge=1,
        description="Photos one worker process decodes at full size at once; the others wait their turn. A photo "
        "is held at full size only from its decoding until it is shrunk to detector.max_side, but that can take "
        "~1 GB for a 40-megapixel one (a PNG, compressible to 100 kB: 6 such requests at once took 7 GB; a JPEG "
        "that large is decoded at 1/4 scale), so this bounds what concurrent requests make the worker hold. Raise "
        "it on a machine with many cores and memory to spare.",
    )
    max_inflight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Request-body bytes one worker process holds at once, over all its requests: a body counts "
        "as it arrives until its answer has been sent, since the photos are kept in memory, never on disk. A request "
        "whose declared Content-Length does not fit what is left, or whose streamed body goes over, is refused "
        "with 503 server_busy and Retry-After instead of the worker running out of memory (200 uploads of 20 MiB "
        "would need 4 GB). At least image.max_upload_bytes; the default holds 12 bodies of 20 MiB, or thousands of "
        "single photos, at once. Memory: a body is held about twice while its photos are read (the body and its "
        "parts), so allow about twice this per worker, plus the decoded photos.",
    )
    heic: bool = Field(
        default=False,
        description="Decode HEIC/HEIF photos (the iPhone's default) with pi-heif (libheif + libde265: the `heic` "
        "extra), under the same pixel limit as the other formats; off, they are refused with 415 "
        "unsupported_image. Off by default: every decoder is attack surface, and libde265 has had its share of "
        "CVEs.",
    )

    @model_validator(mode="after")
    def _check_inflight(self) -> ImageSettings:
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError(
                f"image.max_inflight_bytes ({self.max_inflight_bytes}) must be at least image.max_upload_bytes "
                f"({self.max_upload_bytes}): a body the size limit accepts must fit the worker's budget when it is idle"
            )
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"image.max_request_pixels ({self.max_request_pixels}) must be at least image.max_pixels "
                f"({self.max_pixels}): a request of one photo the pixel limit accepts must get through"
            )
        return self

    @field_validator("heic")
    @classmethod
    def _check_heic(cls, value: bool) -> bool:
        # Checked with the settings, so that `facegate serve` (and every command) refuses to start in one line,
        # rather than each upload failing later.
        if value:
            problem = heif_problem()
            if problem is not None:
                raise ValueError(problem)
        return value


def heif_problem() -> str | None:
    """Why HEIC/HEIF photos cannot be decoded in this environment (None: they can): pi-heif, the `heic` extra, is
    missing or does not load."""
    try:
        import pi_heif  # here, not at the top: only a process that decodes HEIC loads libheif
    except ModuleNotFoundError:
        return "HEIC decoding needs the pi-heif package: install facegate's `heic` extra (pip install 'facegate[heic]')"
    try:
        pi_heif.libheif_info()  # pi-heif defers the failure to load its C extension (libheif) to the first call
    except ImportError as error:
        return f"pi-heif is installed but its libheif does not load: {error}"
    return None


class QualitySettings(SettingsGroup):
    """Limits of the face-quality gate at enrolment (app/vision/quality.py measures; `assess` compares).

    Enrolment refuses a face outside any limit (422 low_quality, unless `allow_low_quality=true`); verify and
    identify report the same measurements and the limits they fail, without refusing. Defaults measured on the dev
    faces (see app/vision/quality.py `QualityThresholds`): they refuse about 2 % of dev faces and catch nearly all
    faces degraded by shrinking 4x, blurring, darkening or cutting in half. To switch a check off, set a limit
    nobody fails (a minimum of 0, max_brightness 255, max_outside_fraction 1); pose and detector score are
    measured but not gated unless a limit is set.
    """

    min_inter_ocular_px: float | None = Field(
        default=20.0,
        ge=0.0,
        description="Smallest distance between the eye centres, in pixels of the photo the models see (shrunk to "
        "detector.max_side). Raise it to refuse more small faces (less identity detail), lower it to accept them.",
    )
    min_sharpness: float | None = Field(
        default=10.0,
        ge=0.0,
        description="Smallest variance of the Laplacian on the face chip's centre (grey levels squared). Raise it to "
        "refuse more blurred or upscaled faces; lower it to accept them.",
    )
    min_brightness: float | None = Field(
        default=40.0, ge=0.0, le=255.0, description="Darkest accepted mean grey level (0-255) of the chip's centre."
    )
    max_brightness: float | None = Field(
        default=235.0, ge=0.0, le=255.0, description="Brightest accepted mean grey level (0-255) of the chip's centre."
    )
    max_outside_fraction: float | None = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Largest share of the face box outside the photo (a face cut by the border). Lower it to refuse "
        "faces cut less.",
    )
    max_abs_yaw: float | None = Field(
        default=None,
        ge=0.0,
        description="Largest |yaw| (nose offset from the eyes' midpoint / inter-ocular distance; dev 99th percentile "
        "0.42). Unset: not gated.",
    )
    max_abs_roll_deg: float | None = Field(
        default=None, ge=0.0, le=180.0, description="Largest |roll| of the eye line, degrees. Unset: not gated."
    )
    min_score: float | None = Field(
        default=None,
        ge=-1.0,
        le=2.0,
        description="Smallest MMOD detector score (dev 1st percentile 0.60; range -1 to 2, as detector.score_threshold). Unset: not gated. A photo turned "
        "sideways with no EXIF orientation often scores as high as an upright one: min_distinctiveness is what "
        "catches it.",
    )
    min_distinctiveness: float | None = Field(
        default=0.22,
        ge=0.0,
        le=4.0,
        description="Smallest squared distance of the face's embedding from where identity-less embeddings gather "
        "(faces of photos turned sideways with no EXIF orientation: the detector finds 6 in 10 of them, and two "
        "people's match each other 74 % of the time on dev). 0.22 catches 95 % of those on dev and refuses 1 of "
        "474 upright dev faces and 2 of 2,107 lfw-dev. Unset: not gated. Not measured with "
        "FACEGATE_EMBEDDING__FLIP.",
    )

    @model_validator(mode="after")
    def _check_brightness(self) -> QualitySettings:
        low, high = self.min_brightness, self.max_brightness
        if low is not None and high is not None and low >= high:
            raise ValueError("quality.min_brightness must be below quality.max_brightness")
        return self


class ClusterSettings(SettingsGroup):
    threshold: float = Field(
        default=0.25,
        gt=0.0,
        le=4.0,
        description="Squared L2 distance at or below which two faces are linked when clustering (0.25 = dlib's 0.5 "
        "Euclidean of its face_clustering example). Stricter than the 1:1 threshold because clusters grow along "
        "chains of links: on the dev faces 0.25 gives 99.8 % pure clusters with 92 % of faces clustered, 0.36 only "
        "89 % pure. Lower it for purer clusters and more faces left alone; raise it for the opposite.",
    )
    max_photos: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Most photos one POST /cluster request may carry (each costs a detection and embeddings; the "
        "whole body also stays under image.max_upload_bytes).",
    )


class BatchingSettings(SettingsGroup):
    """Micro-batching of ONNX Runtime work across concurrent requests (app/vision/batcher.py)."""

    enabled: bool = Field(
        default=True,
        description="Hand the network calls of concurrent requests to a few inference threads: under load each "
        "call runs on one core (`workers` side by side), a call alone gets every core, and the faces of concurrent "
        "requests are embedded in one call. Off: each request thread calls ONNX Runtime itself, every call on every "
        "core (several at once compete for them).",
    )
    max_batch: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most face chips in one embedder call. Larger batches cost less per face but hold the requests "
        "in them until the whole call ends.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description="How long a request's work may wait for other requests' to join its batch (ms, counted from "
        "when it was queued). 0: batch only what is already waiting. Raise it to batch more under light, "
        "staggered load, at that much latency per request.",
    )
    workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Network calls that may run at once under load, each on one intra-op thread (0: one per CPU "
        "core; `facegate serve --workers N` makes it cores/N). A call made while nothing else runs uses every thread "
        "instead (runtime.intra_op_threads). Set 1 on a GPU.",
    )
    detector_max_batch: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Most photos in one detector call: photos of the same working size queued while the detector "
        "was busy are stacked into its next call (it never waits for more). 1: detector calls only take turns.",
    )


class BatchRequestSettings(SettingsGroup):
    """Limits of the many-photo endpoints POST /embed and POST /identify/batch."""

    max_images: int = Field(
        default=32,
        ge=1,
        le=1000,
        description="Most photos in one POST /embed or POST /identify/batch request (the whole body also stays "
        "under image.max_upload_bytes).",
    )


class IndexBackend(StrEnum):
    """How the gallery is searched (app/gallery/index.py)."""

    EXACT = "exact"
    APPROXIMATE = "approximate"
    PGVECTOR = "pgvector"


class IndexSettings(SettingsGroup):
    """The gallery's search index (app/gallery/index.py, ann.py, pgvector.py)."""

    backend: IndexBackend = Field(
        default=IndexBackend.EXACT,
        description="`exact`: every face compared (numpy float32 matmul). `approximate`: a faiss inverted-file index "
        "(IVF) for large galleries (the `ann` extra), exact below index.min_size. `pgvector`: nearest faces found "
        "inside PostgreSQL (needs the pgvector extension on the server; start-up fails, saying so, without it).",
    )
    min_size: int = Field(
        default=50_000,
        ge=1,
        description="approximate: galleries with fewer searchable faces are searched exactly (the IVF is built once "
        "the gallery reaches this size; from 200k faces on it is built on a thread while exact search answers). "
        "Exact search of 50k faces takes a few milliseconds.",
    )
    nlist: int = Field(
        default=0,
        ge=0,
        le=65_536,
        description="approximate: number of IVF cells (0: a power of two near sqrt(faces), at most 1024). More cells "
        "make each probe cheaper but training (start-up) slower.",
    )
    nprobe: int = Field(
        default=256,
        ge=1,
        le=65_536,
        description="approximate: IVF cells probed per query (at most nlist). Raise it for top-1 answers closer to "
        "exact search, lower it for speed: at 1M faces and 1024 cells, 256 gives 99.5 % top-1 agreement.",
    )
    candidates: int = Field(
        default=64,
        ge=8,
        le=10_000,
        description="approximate and pgvector: nearest faces fetched per query before they are ranked by identity "
        "(at least 4 x top_k; pgvector's hnsw.ef_search is at least twice this, up to its maximum of 1000; "
        "pgvector 0.8's iterative scans return them all, older versions at most 1000); a query whose candidates hold "
        "too few identities is searched exactly.",
    )
    pgvector_ef_search: int = Field(
        default=1000,
        ge=10,
        le=1000,
        description="pgvector: hnsw.ef_search, the HNSW search's candidate list (raised to 2 x index.candidates when "
        "smaller, but never above 1000, pgvector's maximum). On 100k synthetic faces (pgvector's default build: m 16, ef_construction 64) the exact "
        "nearest face was among the candidates for 93 % of queries at 128, 98 % at 512, 99.5 % at 1000; each "
        "doubling costs ~1.7x the search time.",
    )
    pgvector_m: int = Field(
        default=16,
        ge=2,
        le=100,
        description="pgvector: the HNSW index's m (links per node; pgvector's default 16). More links find the "
        "nearest face more often and build more slowly: on 100k synthetic faces m 32 with ef_construction 128 found "
        "it 99.5 % of the time at ef_search 256 where 16 / 64 needed 1000, and built 3.4x slower. Changing it "
        "rebuilds the index at the next start.",
    )
    pgvector_ef_construction: int = Field(
        default=64,
        ge=4,
        le=1000,
        description="pgvector: the HNSW build's candidate list (pgvector's default 64; at least 2 x index.pgvector_m). "
        "Changing it rebuilds the index at the next start.",
    )
    pgvector_build_memory: str = Field(
        default="1GB",
        pattern=r"^[1-9][0-9]*(kB|MB|GB|TB)$",
        description="pgvector: PostgreSQL's maintenance_work_mem while the HNSW index is built over every face (first "
        "start, or after the change log was pruned past the mirror): about 1 kB per face keeps the build in memory "
        "(measured: 100k faces 51 s at the server default 64MB, 19 s at 1GB). The server must be able to spare it.",
    )

    @model_validator(mode="after")
    def _check_hnsw(self) -> IndexSettings:
        if self.pgvector_ef_construction < 2 * self.pgvector_m:
            raise ValueError("index.pgvector_ef_construction must be at least 2 x index.pgvector_m (pgvector's rule)")
        return self


class AuthSettings(SettingsGroup):
    """API keys (app/auth/): header `X-API-Key: <key>` or `Authorization: Bearer <key>`."""

    required: bool = Field(
        default=False,
        description="Require an API key on every protected route even before any key exists (every such request is "
        "then 401 until one is created). Off, auth is still on as soon as one key has been created (revoked ones "
        "count, so revoking the last key locks the API rather than opening it).",
    )
    bootstrap_key: SecretStr | None = Field(
        default=None,
        description="An admin key (`fg_<8 hex>_<secret>`, e.g. from `facegate keys generate`) stored hashed at "
        "start-up unless a key with its prefix exists: how a container gets its first key. Revoking it (by prefix) "
        "sticks across restarts.",
    )
    cache_seconds: float = Field(
        default=5.0,
        ge=0.0,
        le=300.0,
        description="How long a worker trusts a key lookup (and whether any key exists) before reading the database "
        "again: a revoked key stops working in every worker within this many seconds. 0: read on every request.",
    )

    @field_validator("bootstrap_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # `FACEGATE_AUTH__BOOTSTRAP_KEY=` (compose's empty default)

    @field_validator("bootstrap_key")
    @classmethod
    def _check_key_format(cls, value: SecretStr | None) -> SecretStr | None:
        from app.auth.keys import key_prefix  # here, not at the top: app.auth imports nothing from config

        if value is not None and key_prefix(value.get_secret_value()) is None:
            raise ValueError(
                "auth.bootstrap_key must look like fg_<8 hex>_<32+ url-safe characters> (facegate keys generate)"
            )
        return value


class CorsSettings(SettingsGroup):
    """Browser calls from pages of other origins (a face-login page on its own site): CORS headers, Starlette's
    CORSMiddleware. Keys travel in headers, never cookies, so credentials are not allowed."""

    allow_origins: list[str] = Field(
        default=[],
        description="Origins as a browser sends them (`scheme://host[:port]`, lower case, no path or trailing slash, "
        "no default port `:443`/`:80`, a non-ASCII host in its `xn--` form; anything else is refused at start) whose "
        "pages may call the API from a browser, e.g. `[\"https://login.example.com\"]`; `[\"*\"]`: any origin. Empty: no CORS headers, so only "
        "same-origin pages (the web console) can read the answers.",
    )
    max_age: int = Field(
        default=600, ge=0, le=86_400, description="Seconds a browser may cache a preflight (OPTIONS) answer."
    )

    @field_validator("allow_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        # A browser sends its Origin without a path or trailing slash; an origin written with one never matches and
        # every cross-origin call would fail silently in the browser, so refuse it at start-up instead.
        # So does one in capitals, with the scheme's default port (the browser leaves it out) or a non-ASCII host.
        for origin in value:
            match = _ORIGIN.fullmatch(origin) if origin != "*" else None
            if origin != "*" and (match is None or _DEFAULT_PORTS[match["scheme"]] == match["port"]):
                raise ValueError(
                    f"cors.allow_origins: {origin!r} is not an origin as a browser sends it; write scheme://host[:port] "
                    "in lower case, with no path or trailing slash and without the scheme's default port (e.g. "
                    "https://login.example.com; a non-ASCII host in its xn-- form), or * for any origin"
                )
        return value


class EmbeddingSettings(SettingsGroup):
    """How a face's embedding is computed from its aligned chip."""

    flip: bool = Field(
        default=False,
        description=(
            "Average each face's embedding with its mirror image's (one more embedder pass per face). Measured: 1:1 "
            "VAL at FAR 0.1 % +0.9 (lfw-dev) / +2.0 (dev) points, 1:N DIR at FPIR 1 % 75 -> 81 % on lfw-dev; distances "
            "are smaller, so FAR at 0.36 doubles (use FAR-based thresholds). Changes the model version (+flip): "
            "enrolled faces must be enrolled again, or recomputed from their stored photos (`facegate reindex "
            "--from-photos`, when FACEGATE_STORE_IMAGES kept them)."
        ),
    )


class HeadSettings(SettingsGroup):
    """An embedding head trained by `facegate train` (app/training), applied after the embedder (app/vision/head.py)."""

    name: str | None = Field(
        default=None,
        min_length=1,  # an empty FACEGATE_HEAD__NAME= silently served no head
        description=(
            "Registered head to serve (a folder under the heads folder with head.onnx and head.json, as `facegate "
            "train` writes it); unset = the base embeddings (the default). Changing it changes the model version: "
            "run `facegate reindex` so enrolled faces are searchable again. Its calibrated threshold replaces 0.36 "
            "unless FACEGATE_THRESHOLD is set or a threshold calibrated on its distances is stored (POST /calibrate)."
        ),
    )
    dir: Path | None = Field(
        default=None, description="Folder of registered heads (unset: `heads/` inside FACEGATE_MODELS_DIR)."
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _check_dir(cls, value: object) -> object:
        return _non_empty_path(value)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class LogSettings(SettingsGroup):
    """Logging of `facegate serve` (app/logs.py): one access line per request, plus the service's own messages."""

    format: LogFormat = Field(
        default=LogFormat.text,
        description="text: one readable line per record; json: one JSON object per line (for log collectors). "
        "Applies to `facegate serve`, its start-up warnings and refusals included.",
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe level logged; INFO includes the access lines, WARNING drops them."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (a bootstrap key with a stray character, a database URL with its
    # password) must not be echoed by the ValidationError that `uvicorn --factory app.main:create_app` logs.
    model_config = SettingsConfigDict(
        env_prefix="FACEGATE_",
        env_nested_delimiter="__",
        extra="ignore",
        hide_input_in_errors=True,
        allow_inf_nan=False,
    )

    models_dir: Path = Field(default=DEFAULT_MODELS_DIR, description="Folder with the built models (`make models`) and manifest.json.")
    require_gpu: bool = Field(default=False, description="Refuse to start unless the CUDA provider is in use.")
    preload_models: bool = Field(default=True, description="Load the models at start-up (otherwise on first use).")
    runtime: RuntimeSettings = RuntimeSettings()
    detector: DetectorSettings = DetectorSettings()
    image: ImageSettings = ImageSettings()
    quality: QualitySettings = QualitySettings()
    cluster: ClusterSettings = ClusterSettings()
    batching: BatchingSettings = BatchingSettings()
    batch: BatchRequestSettings = BatchRequestSettings()
    auth: AuthSettings = AuthSettings()
    cors: CorsSettings = CorsSettings()
    log: LogSettings = LogSettings()
    index: IndexSettings = IndexSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    head: HeadSettings = HeadSettings()

    threshold: float = Field(
        default=0.36,
        gt=0.0,
        le=4.0,
        description="Squared L2 distance at or below which two faces are the same person (0.36 = dlib's 0.6 Euclidean).",
    )
    ambiguity_margin: float = Field(
        default=0.02,
        ge=0.0,
        le=4.0,
        description=(
            "/identify: when the second-nearest identity is farther than the nearest by at most this (squared L2), "
            "the answer is `ambiguous` and nobody is named. Raise it to refuse more look-alike decisions, lower it to "
            "refuse fewer (0: only two identities at exactly the same distance are refused, whichever was found "
            "first; a face whose open-set score fails while the runner-up is also within the threshold is still "
            "answered `ambiguous`)."
        ),
    )
    identify_fpir: float = Field(
        default=0.01,
        ge=1e-4,  # the range the shipped open-set calibrations cover (app/matching/data/*/openset.json levels):
        le=0.5,  # outside it every /identify raised ValueError (500)
        description=(
            "/identify: target false-positive identification rate (1e-4 to 0.5, the range the shipped open-set "
            "calibration covers), the share of strangers (people not enrolled) "
            "named as someone; the open-set rule (app/matching/openset.py) turns it into an acceptance score for "
            "the gallery's size. Lower it to name fewer strangers, at the cost of more enrolled people answered "
            "`unknown`; raise it for the opposite."
        ),
    )
    database_url: str = Field(default="sqlite:///./facegate.db", description="SQLAlchemy URL of the gallery (SQLite or postgresql+psycopg://).")
    database_lock_timeout: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description=(
            "Seconds a request waits for a lock another session holds (an operator's transaction or ALTER TABLE, "
            "`facegate reindex` or `db load-synthetic` holding the gallery's write lock) before it is answered 503 "
            "database_unavailable with Retry-After, its transaction rolled back. 0: wait as long as it takes (or as "
            "the server's own lock_timeout says). Migrations and the pgvector index set-up always wait. PostgreSQL: "
            "its lock_timeout, and a `-c lock_timeout=...` in the URL's `options` wins; its statement timeout "
            "(database_statement_timeout) ends a lock wait too, so a lock timeout set above it is refused, and with 0 "
            "the statement timeout is the wait's limit. SQLite: the busy timeout, how long a write waits for another "
            "process's (another worker's, a command's)."
        ),
    )
    # 15 s: a request's statements take milliseconds (a page of identities, an enrolment's inserts, a pgvector
    # search at 1M faces), so a statement still running after a thousand times that is not going to help its client,
    # which typically gives up at 30 s; and above the lock timeout, so that a lock wait is told as such (55P03).
    # Whole-gallery work (index load, relabel, reindex, copy, bulk load, migrations) lifts it for its transaction.
    database_statement_timeout: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        description=(
            "PostgreSQL: seconds one statement of a request may run in all (PostgreSQL's `statement_timeout`: a "
            "server overloaded or stalled, a statement gone wrong, a lock wait past the lock timeout) before it is "
            "cancelled and the request answered 503 database_unavailable with Retry-After, its transaction rolled "
            "back. 0: no limit (or the server's own). Loading the gallery into the search index, migrations, "
            "`facegate reindex`, `db copy` and `db load-synthetic` are not limited; a `-c statement_timeout=...` in "
            "the URL's `options` wins. A server that answers nothing at all, not even its own timeout (stalled), "
            "has the connection closed by facegate 5 s later: the same 503."
        ),
    )
    store_images: bool = Field(default=False, description="Keep the enrolled photos in the database (off: only embeddings are stored).")
    host: str = Field(default="127.0.0.1", min_length=1, description="Address `facegate serve` listens on (127.0.0.1: this machine only).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `facegate serve` listens on.")
    shutdown_timeout: int = Field(
        default=8,
        ge=1,
        le=3600,
        description=(
            "Seconds `facegate serve` gives the requests in flight to finish after SIGTERM (new connections are "
            "refused at once); those still running then are cut, and the process exits 0. Keep it a few seconds under "
            "the orchestrator's stop timeout (`docker stop`: 10 s, compose's `stop_grace_period`, Kubernetes' "
            "`terminationGracePeriodSeconds`: 30 s), after which everything is killed."
        ),
    )

    request_timeout: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a request (headers and body) has to arrive whole after its first byte, however steadily it "
            "comes: a client sending a byte now and then would otherwise hold its connection for ever. Past it the "
            "connection is closed, after a 408 request_timeout. 120 s takes a 20 MiB upload at 1.4 Mbit/s; raise it "
            "with image.max_upload_bytes or for slow links."
        ),
    )
    request_idle_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "Seconds without a byte from the client, while a request is arriving or since its connection opened, "
            "after which the connection is closed (with a 408 request_timeout if a request had begun): a client "
            "gone without closing (a phone out of coverage) would otherwise hold it, its file descriptor and what "
            "it sent for ever. Between requests uvicorn's keep-alive timeout (5 s) applies instead."
        ),
    )

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        # Checked at start-up: an unparsable URL, another database or another driver would otherwise fail at the
        # first query, with a traceback.
        problem = database_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("models_dir", mode="before")
    @classmethod
    def _check_models_dir(cls, value: object) -> object:
        return _non_empty_path(value)

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        # PostgreSQL's statement_timeout also ends a statement waiting for a lock: a longer lock timeout was
        # silently the statement timeout (FACEGATE_DATABASE_LOCK_TIMEOUT=60 gave up after 15 s). Only one given:
        # the default lock timeout under a lowered statement timeout is the statement timeout, as documented.
        lock, statement = self.database_lock_timeout, self.database_statement_timeout
        given = "database_lock_timeout" in self.model_fields_set
        if given and self.database_url.startswith("postgresql") and 0 < statement < lock:
            raise ValueError(
                f"FACEGATE_DATABASE_LOCK_TIMEOUT ({lock:g}) must not exceed FACEGATE_DATABASE_STATEMENT_TIMEOUT "
                f"({statement:g}) on PostgreSQL, whose statement timeout also ends a lock wait: raise the statement "
                "timeout too (or set it to 0)"
            )
        return self

    @model_validator(mode="after")
    def _check_pgvector_database(self) -> Settings:
        # PgvectorIndex refused it only when the gallery was opened: a traceback in every command and worker.
        if self.index.backend is IndexBackend.PGVECTOR and not self.database_url.startswith("postgresql"):
            raise ValueError(
                "FACEGATE_INDEX__BACKEND=pgvector needs a PostgreSQL gallery (FACEGATE_DATABASE_URL="
                "postgresql+psycopg://...); on SQLite choose FACEGATE_INDEX__BACKEND=exact or approximate"
            )
        return self


def _non_empty_path(value: object) -> object:
    """An empty folder setting is refused, as any empty value: Path("") is ".", the folder the command runs in, so
    `FACEGATE_HEAD__DIR=` looked for (and `facegate train` registered) heads there, not in the default."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path is not a folder: unset the variable to take the default")
    return value


def database_url_problem(url: str) -> str | None:
    """Why facegate cannot use `url` as its gallery database (None: it can): not a URL, another database, or a
    driver that is not installed or not tested (`postgresql+psycopg2://`, `postgresql+asyncpg://`)."""
    from sqlalchemy.engine import make_url  # here, not at the top: the settings import nothing heavy
    from sqlalchemy.exc import ArgumentError

    try:
        scheme = make_url(url).drivername
    except ArgumentError:
        scheme = ""
    if scheme in _DATABASE_SCHEMES:
        return None
    shown = f"{scheme}:// is not supported" if scheme else "not a database URL"
    return (
        f"{shown}: facegate uses SQLite (sqlite:///path/to/facegate.db) or PostgreSQL through psycopg 3 "
        "(postgresql+psycopg://user:password@host/database)"
    )


def _group(annotation: object) -> type[BaseModel] | None:
    """The settings group a field holds (its `FACEGATE_<GROUP>__` variables), or None for a plain setting."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def settings_reference() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested groups included: the README's table."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            group = _group(field.annotation)
            if group is not None:
                walk(group, f"{prefix}{name.upper()}__")
                continue
            default = field.default
            if isinstance(default, list):
                shown = json.dumps([str(v) for v in default])
            elif isinstance(default, Path):
                shown = "models/dist" if default == DEFAULT_MODELS_DIR else str(default)
            else:
                shown = "unset" if default is None else str(default)
            rows.append((f"{prefix}{name.upper()}", shown, field.description or ""))

    walk(Settings, "FACEGATE_")
    return rows


class _LogSettingsAlone(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEGATE_", env_nested_delimiter="__", extra="ignore")

    log: LogSettings = LogSettings()


def log_settings_alone() -> LogSettings:
    """FACEGATE_LOG__* read on their own: `facegate serve` writes its start-up warnings and refusals in the server's
    log format even when another setting is refused. A refused log setting gives the default (text), whose refusal
    the full read then reports."""
    try:
        return _LogSettingsAlone().log
    except (ValidationError, SettingsError):
        return LogSettings()


def describe_settings_error(error: ValidationError | SettingsError) -> str:
    """One line naming each refused environment variable and the rule it breaks, for an operator.

    pydantic's own text lists the model's field paths and echoes every input value (a bootstrap key included);
    this names the FACEGATE_ variable instead and never the value.
    """
    if isinstance(error, SettingsError):  # a group or list that is not JSON: pydantic-settings stops at the first
        quoted = re.search(r'field "(\w+)"', str(error))
        name = f"FACEGATE_{quoted.group(1).upper()}" if quoted else "a FACEGATE_ variable"
        return (
            f"{name} (or one of its {name}__ variables) is not valid JSON ({error.__cause__}): lists and groups are "
            "JSON, e.g. FACEGATE_RUNTIME__PROVIDERS='[\"CPUExecutionProvider\"]'"
        )
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        parts: list[str] = []
        model: type[BaseModel] | None = Settings
        for part in item["loc"]:  # field names, then pydantic's own parts (a union member, a list index)
            field = model.model_fields.get(str(part)) if model is not None else None
            if field is None:
                break
            parts.append(str(part).upper())
            model = _group(field.annotation)
        name = "FACEGATE_" + "__".join(parts) if parts else "settings"
        message = item["msg"].removeprefix("Value error, ")
        if item.get("input") == "" and "unset the variable" not in message:
            # An empty value is refused, not read as unset: "Input should be a valid number" alone did not say that the
            # variable was empty, nor what to do (the folder settings' own message says it).
            message += " (the variable is empty: unset it to take the default)"
        problems.setdefault(name, []).append(message)
    return "; ".join(f"{name}: {' or '.join(messages)}" for name, messages in problems.items())


# FACEGATE_ variables that are not settings of the service: the tests', the benchmarks' and docker compose's own.
OTHER_VARIABLES = frozenset(
    {
        "FACEGATE_FACES_DIR",
        "FACEGATE_TEST_POSTGRES_URL",
        "FACEGATE_TEST_CHROMIUM",
        "FACEGATE_UI_SCREENSHOTS",
        "FACEGATE_BENCH_OUT",
        "FACEGATE_BENCH_POSTGRES_URL",
        "FACEGATE_BASE_IMAGE",
        "FACEGATE_API_IMAGE",  # not FACEGATE_IMAGE: that would be read as the `image` settings group
        "FACEGATE_POSTGRES_IMAGE",
        "FACEGATE_PUBLISH_PORT",
    }
)
# docker compose's variables that it passes on to the container as a setting: facegate itself reads the setting,
# so one of these set where facegate runs, without its setting, is reported (the README's compose line
# `FACEGATE_BOOTSTRAP_KEY=... docker-compose up` copied onto `facegate serve` started it without the key).
COMPOSE_VARIABLES = {
    "FACEGATE_BOOTSTRAP_KEY": "FACEGATE_AUTH__BOOTSTRAP_KEY",
    "FACEGATE_LOG_FORMAT": "FACEGATE_LOG__FORMAT",
}


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """FACEGATE_ variables that name no setting, each with the setting it most resembles (or None).

    pydantic-settings ignores them silently, so a typo (FACEGATE_TRESHOLD, FACEGATE_DETECTOR__UPSAMPL) would leave
    the default in force without a word. Names are compared in capitals, as the settings read them.
    """
    settings = [name for name, _, _ in settings_reference()]
    groups = {
        f"FACEGATE_{name.upper()}": model
        for name, field in Settings.model_fields.items()
        if (model := _group(field.annotation)) is not None
    }
    known = {*settings, *groups, *OTHER_VARIABLES}
    unknown: list[tuple[str, str | None]] = []
    given = {name.upper() for name in environ}
    for name in sorted(environ):
        upper = name.upper()
        if upper in groups:  # a whole group as JSON (FACEGATE_DETECTOR='{"upsample": 1}'): its keys, as its variables
            unknown += _unknown_keys(name, environ[name], groups[upper])
        elif upper in COMPOSE_VARIABLES:
            if COMPOSE_VARIABLES[upper] not in given:
                unknown.append((name, COMPOSE_VARIABLES[upper]))
        elif upper.startswith("FACEGATE_") and upper not in known:
            # compared without the prefix, which every name shares (FACEGATE_FOO is not "close to" FACEGATE_PORT)
            close = difflib.get_close_matches(upper[9:], [setting[9:] for setting in settings], n=1, cutoff=0.75)
            unknown.append((name, f"FACEGATE_{close[0]}" if close else None))
    return unknown


def _unknown_keys(name: str, value: str, group: type[BaseModel]) -> list[tuple[str, str | None]]:
    """The keys of a group's JSON value that name none of its settings (read in any case, as pydantic-settings reads
    them), each as `NAME key 'KEY'` with the key it most resembles. A value that is not a JSON object is left to the
    settings' own refusal."""
    try:
        keys = json.loads(value)
    except ValueError:
        return []
    if not isinstance(keys, dict):
        return []
    fields = list(group.model_fields)
    found: list[tuple[str, str | None]] = []
    for key in keys:
        if key.lower() not in fields:
            close = difflib.get_close_matches(key.lower(), fields, n=1, cutoff=0.75)
            found.append((f"{name} key {key!r}", repr(close[0]) if close else None))
    return found


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""All settings in one place: environment variables with the prefix FACEGATE_ (groups joined by `__`).

Example: FACEGATE_THRESHOLD=0.3, FACEGATE_DETECTOR__UPSAMPLE=1, FACEGATE_RUNTIME__PROVIDERS='["CPUExecutionProvider"]'.
Core code never reads the environment: it receives these values as arguments.
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = REPO_ROOT / "models" / "dist"


class Provider(StrEnum):
    """ONNX Runtime execution providers facegate knows how to configure."""

    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


class RuntimeSettings(BaseModel):
    providers: list[Provider] = Field(
        default=[Provider.CUDA, Provider.CPU],
        description="Preferred execution providers, in order; those ONNX Runtime cannot use are skipped (and reported).",
    )
    intra_op_threads: int = Field(default=0, ge=0, description="Threads inside one operator (0 = ONNX Runtime's default: one per core).")
    inter_op_threads: int = Field(default=1, ge=0, description="Threads running independent operators in parallel (0 = default).")
    cuda_tf32: bool = Field(default=False, description="Allow TF32 on CUDA: faster, but embeddings differ from CPU by ~3e-4.")


class DetectorSettings(BaseModel):
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
        description="Photos larger than this (longer side, px) are shrunk before detection; boxes are reported in the original photo's pixels.",
    )
    score_threshold: float = Field(default=0.0, description="Minimum MMOD detector score; dlib's own cut-off is 0. Raise it to drop doubtful faces.")

    @model_validator(mode="after")
    def _check_upsample(self) -> DetectorSettings:
        if isinstance(self.upsample, int) and not 0 <= self.upsample <= 2:
            raise ValueError("detector upsample must be 'auto', 0, 1 or 2")
        return self


class ImageSettings(BaseModel):
    max_pixels: int = Field(default=40_000_000, ge=1, description="Photos with more pixels are refused (decompression-bomb guard).")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Largest accepted upload, in bytes.")


class QualitySettings(BaseModel):
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
        default=None, description="Smallest MMOD detector score (dev 1st percentile 0.60). Unset: not gated."
    )

    @model_validator(mode="after")
    def _check_brightness(self) -> QualitySettings:
        low, high = self.min_brightness, self.max_brightness
        if low is not None and high is not None and low >= high:
            raise ValueError("quality.min_brightness must be below quality.max_brightness")
        return self


class ClusterSettings(BaseModel):
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEGATE_", env_nested_delimiter="__", extra="ignore")

    models_dir: Path = Field(default=DEFAULT_MODELS_DIR, description="Folder with the built models (`make models`) and manifest.json.")
    require_gpu: bool = Field(default=False, description="Refuse to start unless the CUDA provider is in use.")
    preload_models: bool = Field(default=True, description="Load the models at start-up (otherwise on first use).")
    runtime: RuntimeSettings = RuntimeSettings()
    detector: DetectorSettings = DetectorSettings()
    image: ImageSettings = ImageSettings()
    quality: QualitySettings = QualitySettings()
    cluster: ClusterSettings = ClusterSettings()

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
            "/identify: when the second-nearest identity is farther than the nearest by less than this (squared L2), "
            "the answer is `ambiguous` and nobody is named. Raise it to refuse more look-alike decisions, lower it to "
            "refuse fewer (0 = never)."
        ),
    )
    identify_fpir: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description=(
            "/identify: target false-positive identification rate, the share of strangers (people not enrolled) "
            "named as someone; the open-set rule (app/matching/openset.py) turns it into an acceptance score for "
            "the gallery's size. Lower it to name fewer strangers, at the cost of more enrolled people answered "
            "`unknown`; raise it for the opposite."
        ),
    )
    database_url: str = Field(default="sqlite:///./facegate.db", description="SQLAlchemy URL of the gallery (SQLite or postgresql+psycopg://).")
    store_images: bool = Field(default=False, description="Keep the enrolled photos in the database (off: only embeddings are stored).")
    host: str = Field(default="127.0.0.1", description="Address `facegate serve` listens on (127.0.0.1: this machine only).")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `facegate serve` listens on.")


def settings_reference() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested groups included: the README's table."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
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


@lru_cache
def get_settings() -> Settings:
    return Settings()

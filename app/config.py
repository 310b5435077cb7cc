"""All settings in one place: environment variables with the prefix FACEGATE_ (groups joined by `__`).

Example: FACEGATE_THRESHOLD=0.3, FACEGATE_DETECTOR__UPSAMPLE=1, FACEGATE_RUNTIME__PROVIDERS='["CPUExecutionProvider"]'.
Core code never reads the environment: it receives these values as arguments.
"""

from __future__ import annotations

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEGATE_", env_nested_delimiter="__", extra="ignore")

    models_dir: Path = Field(default=DEFAULT_MODELS_DIR, description="Folder with the built models (`make models`) and manifest.json.")
    require_gpu: bool = Field(default=False, description="Refuse to start unless the CUDA provider is in use.")
    preload_models: bool = Field(default=True, description="Load the models at start-up (otherwise on first use).")
    runtime: RuntimeSettings = RuntimeSettings()
    detector: DetectorSettings = DetectorSettings()
    image: ImageSettings = ImageSettings()

    threshold: float = Field(
        default=0.36,
        gt=0.0,
        le=4.0,
        description="Squared L2 distance at or below which two faces are the same person (0.36 = dlib's 0.6 Euclidean).",
    )
    database_url: str = Field(default="sqlite:///./facegate.db", description="SQLAlchemy URL of the gallery (SQLite or postgresql+psycopg://).")
    store_images: bool = Field(default=False, description="Keep the enrolled photos in the database (off: only embeddings are stored).")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_json: bool = Field(default=False, description="Write logs as one JSON object per line.")


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""The built model files: read manifest.json and verify every file's sha256 before it is used."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelUnavailable

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    directory: Path
    model_name: str
    model_version: str
    opset: int
    models: dict[str, dict[str, Any]]
    # Versions earlier builds gave the same embeddings (within the parity tolerance): their faces are adopted.
    earlier_versions: tuple[str, ...] = ()

    def path(self, name: str) -> Path:
        return self.directory / str(self.models[name]["file"])

    def earlier_names(self, version: str) -> list[str]:
        """`version` (this build's model version, with any `+flip` or `+<head>` applied) as each earlier build
        named it: the same numbers under another name."""
        applied = version.removeprefix(self.model_version)
        return [earlier + applied for earlier in self.earlier_versions]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (the checksum the manifests of models and heads record)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: Path, *, verify: bool = True) -> Manifest:
    """Read the manifest; with `verify`, refuse files whose checksum differs from what the build wrote."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelUnavailable(f"no {MANIFEST} in {directory}: build the models with `make models`")
    # A cut, hand-edited or unreadable manifest (or model file) ended every command, `serve` included, with a
    # traceback: one line instead, as for a head's manifest (app/vision/head.py).
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(
            directory=directory,
            model_name=str(raw["model_name"]),
            model_version=str(raw["model_version"]),
            opset=int(raw["opset"]),
            models=dict(raw["models"]),
            earlier_versions=tuple(raw.get("earlier_versions", ())),
        )
        for name in ("embedder", "detector", "landmarks"):
            if name not in manifest.models:
                raise ModelUnavailable(f"{MANIFEST} lists no {name} model: rebuild with `make models`")
            if verify:
                file = manifest.path(name)
                if not file.is_file():
                    raise ModelUnavailable(f"model file {file.name} is missing: run `make models`")
                if file_sha256(file) != manifest.models[name]["sha256"]:
                    raise ModelUnavailable(f"model file {file.name} does not match its checksum: run `make models`")
    except OSError as error:
        raise ModelUnavailable(f"cannot read {error.filename or path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelUnavailable(f"{path} is unreadable ({type(error).__name__}: {error}): rebuild with `make models`") from None
    return manifest

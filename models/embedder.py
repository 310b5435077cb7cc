"""Placeholder: being written."""
from pathlib import Path
from typing import Any


def convert(source: Path, dest: Path) -> dict[str, Any]:
    raise NotImplementedError

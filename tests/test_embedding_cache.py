"""The --cache file of eval, eval-identify, calibrate and train: a file that is not a whole cache is started
afresh (and rewritten), whatever is wrong with it."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.evaluate import Embedded, EmbeddingCache

SIGNATURE = "model-1|test"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    cache = EmbeddingCache(SIGNATURE)
    photo = tmp_path / "a.png"
    photo.write_bytes(b"photo")
    cache.put("a.png", photo, Embedded(np.ones(128, np.float32)))
    path = tmp_path / "cache.npz"
    cache.save(path)
    assert len(EmbeddingCache.load(path, SIGNATURE).entries) == 1
    return path


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"", id="empty"),  # numpy: EOFError (the command ended 'Aborted.', exit 1)
        pytest.param(lambda data: data[: len(data) // 2], id="cut"),  # zipfile.BadZipFile (a traceback)
        pytest.param(lambda data: b"some notes, not a cache\n", id="text"),
    ],
)
def test_a_damaged_cache_starts_afresh(saved: Path, damage: Callable[[bytes], bytes]) -> None:
    saved.write_bytes(damage(saved.read_bytes()))
    cache = EmbeddingCache.load(saved, SIGNATURE)
    assert cache.entries == {} and cache.signature == SIGNATURE


def test_a_photo_refused_by_a_setting_is_tried_again(tmp_path: Path) -> None:
    """Whether a format is decoded (FACEGATE_IMAGE__HEIC) and how many pixels a photo may have
    (FACEGATE_IMAGE__MAX_PIXELS) are settings, not part of the cache's signature: a HEIC refused while it was off,
    or a 50 MP photo refused under a lower limit, must not stay refused once the setting allows it."""
    cache = EmbeddingCache(SIGNATURE)
    photo = tmp_path / "a.heic"
    photo.write_bytes(b"photo")
    cache.put("a.heic", photo, Embedded(np.full(128, np.nan, np.float32), "unsupported_image"))
    cache.put("big.jpg", photo, Embedded(np.full(128, np.nan, np.float32), "image_too_large"))
    cache.put("b.heic", photo, Embedded(np.full(128, np.nan, np.float32), "no_face"))
    assert cache.get("a.heic", photo) is None
    assert cache.get("big.jpg", photo) is None
    assert cache.get("b.heic", photo) is not None


def test_the_cache_file_is_readable_by_its_owner_only(saved: Path) -> None:
    """It holds embeddings and the photos' paths (people's names): not world-readable whatever the umask (0644 by
    numpy's default), also when it replaces a file that was."""
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    saved.chmod(0o644)
    cache = EmbeddingCache.load(saved, SIGNATURE)
    cache.save(saved)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600

"""/readyz with the models opened on first use (FACEGATE_PRELOAD_MODELS=false): ready before the first photo, not
ready once opening them failed (every photo is then answered 503), as long as they stay unopened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.conftest import api_settings, error_of, running

pytestmark = pytest.mark.model

Photo = Callable[[str], tuple[str, bytes, str]]
AMY = "bbt_amy/face-api__amy1.png"


def test_readyz_says_when_models_opened_on_first_use_failed(
    models_dir: Path, tmp_path: Path, photo: Photo, caplog: pytest.LogCaptureFixture
) -> None:
    # The CPU provider only, with a GPU required: opening either network fails, on any machine.
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", preload_models=False, require_gpu=True)
    with running(settings) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["models_loaded"] is False, ready.text
        for _ in range(2):  # tried again on each photo, failing each time
            error_of(client.post("/identify", files={"image": photo(AMY)}), 503, "model_unavailable")
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["problems"] == ["models failed to load"]
            assert ready.json()["ready"] is False and ready.json()["database"] is True
        # Why, in the log (once, not per photo): /readyz says only "models failed to load", the access lines only
        # model_unavailable.
        why = [r for r in caplog.records if r.levelname == "ERROR" and "CUDA provider is not usable" in r.getMessage()]
        assert len(why) == 1, caplog.text

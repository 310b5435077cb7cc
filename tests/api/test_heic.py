"""HEIC uploads (FACEGATE_IMAGE__HEIC): with the setting on, a phone's photo is enrolled and verified as sent (and
kept as sent, with its type); off, it is refused with 415 as before. The HEIC files are made from dev photos here."""

from __future__ import annotations

import io
from pathlib import Path

import pillow_heif
import pytest
from PIL import Image as PILImage

from app.vision.decode import load_image
from tests.api.conftest import api_settings, error_of, running

pytestmark = pytest.mark.model

OBAMA = "barack_obama/face_recognition__obama.jpg"
OBAMA_AGAIN = "barack_obama/face_recognition__obama1.jpg"
AMY = "bbt_amy/face-api__amy1.png"


def _as_heic(path: Path) -> tuple[str, bytes, str]:
    """A dev photo converted to HEIC, as an upload tuple for `files=` (named and typed as an iPhone sends it)."""
    buf = io.BytesIO()
    pillow_heif.from_pillow(PILImage.fromarray(load_image(path, max_pixels=10_000_000))).save(buf, quality=85)
    return path.with_suffix(".HEIC").name, buf.getvalue(), "image/heic"


def test_with_heic_on_a_heic_photo_is_enrolled_verified_and_kept(
    models_dir: Path, dev_faces: Path, tmp_path: Path
) -> None:
    enrolment, probe = _as_heic(dev_faces / OBAMA), _as_heic(dev_faces / OBAMA_AGAIN)
    settings = api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", image={"heic": True}, store_images=True)
    with running(settings) as client:
        r = client.post("/enroll", files={"image": enrolment}, data={"name": "Barack"})
        assert r.status_code == 201, r.text
        enrolled = r.json()
        same = client.post("/verify", files={"image": probe}, data={"identity_id": enrolled["identity_id"]})
        assert same.status_code == 200, same.text
        assert same.json()["match"] is True and same.json()["distance"] <= 0.36
        amy = ("amy.png", (dev_faces / AMY).read_bytes(), "image/png")
        other = client.post("/verify", files={"image": amy}, data={"identity_id": enrolled["identity_id"]})
        assert other.status_code == 200 and other.json()["match"] is False
        kept = client.get(f"/identities/{enrolled['identity_id']}/faces/{enrolled['face_id']}/image")
        assert kept.status_code == 200, kept.text
        assert kept.content == enrolment[1] and kept.headers["content-type"] == "image/heic"


def test_with_heic_off_a_heic_photo_is_refused_as_before(models_dir: Path, dev_faces: Path, tmp_path: Path) -> None:
    with running(api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}")) as client:
        r = client.post("/enroll", files={"image": _as_heic(dev_faces / OBAMA)}, data={"name": "Barack"})
        error = error_of(r, 415, "unsupported_image")
        assert error["details"] == {"format": "HEIF/HEIC"}
        assert "FACEGATE_IMAGE__HEIC=true" in error["message"]
        assert client.get("/identities").json()["total"] == 0

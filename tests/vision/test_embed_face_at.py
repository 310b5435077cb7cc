"""`Pipeline.embed_face_at`: the face of a photo at a known box (how `facegate reindex --from-photos` finds an
enrolled face again in its stored photo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.vision.decode import load_image
from app.vision.pipeline import Pipeline
from app.vision.types import Box

pytestmark = pytest.mark.model


def test_each_face_of_a_two_face_photo_is_found_at_its_box(settings: Settings, lfw_faces: Path) -> None:
    pipeline = Pipeline.from_settings(settings)
    pipeline.load()
    image = load_image(lfw_faces / "mikhail_gorbachev" / "lfw__Mikhail_Gorbachev_0001.jpg", max_pixels=10_000_000)
    faces = pipeline.find_faces(image)
    assert len(faces) == 2
    for face in faces:
        shifted = Box(face.box.left + 3, face.box.top - 2, face.box.right + 3, face.box.bottom - 2)
        found = pipeline.embed_face_at(image, shifted)
        assert found is not None and found.box == face.box
        np.testing.assert_allclose(found.embedding, face.embedding, atol=1e-6)
    width = image.shape[1]
    assert pipeline.embed_face_at(image, Box(width - 20, 0, width - 1, 19)) is None  # nothing there
    far = max(faces, key=lambda f: f.box.left).box
    assert pipeline.embed_face_at(image, Box(far.left + far.width // 2, far.top, far.right + far.width, far.bottom)) is None

"""Photos of several faces, small faces and faces at the border, end to end: test photos are composed in code from
dev photos (FACEGATE_FACES_DIR), at sizes that put their faces on either side of the detector's reach.

The detector reports boxes of at least its window, 80 px, in the photo it scans: a photo under
`detector.auto_upsample_below` (600 px) is doubled first (faces from about 40 px are found), one larger than
`detector.max_side` (1024 px) is shrunk first (a 4000 x 3000 photo's faces only from about 310 px).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.conftest import error_of

pytestmark = pytest.mark.model

Upload = tuple[str, bytes, str]

OBAMA = "barack_obama/face_recognition__obama.jpg"  # one face, box (353, 131)-(615, 393): 263 px across
OBAMA_CROP = (280, 60, 690, 470)  # 410 px around that face
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def head(dev_faces: Path) -> Image.Image:
    """Obama's head, the face 263 px across in a 410 px square."""
    return Image.open(dev_faces / OBAMA).convert("RGB").crop(OBAMA_CROP)


def scaled(head: Image.Image, face_px: int) -> Image.Image:
    """The head resized so that its face is about `face_px` across."""
    side = round(head.width * face_px / 263)
    return head.resize((side, side), Image.Resampling.LANCZOS)


def composed(size: tuple[int, int], pasted: list[tuple[Image.Image, tuple[int, int]]]) -> Image.Image:
    canvas = Image.new("RGB", size, GREY)
    for image, at in pasted:
        canvas.paste(image, at)
    return canvas


def upload(image: Image.Image, orientation: int | None = None) -> Upload:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return "composed.jpg", buffer.getvalue(), "image/jpeg"


def boxes(body: dict[str, object]) -> list[dict[str, int]]:
    faces = body["faces"]
    assert isinstance(faces, list)
    return [f["face"]["box"] for f in faces]


class TestDetectorReach:
    def test_a_face_below_reach_is_no_face_naming_the_smallest_face_found(
        self, shared_client: TestClient, head: Image.Image
    ) -> None:
        # 640 x 480 is not upsampled: a 60 px face is below the 80 px window...
        small = composed((640, 480), [(scaled(head, 60), (100, 100))])
        error = error_of(shared_client.post("/identify", files={"image": upload(small)}), 422, "no_face")
        assert error["details"]["min_face_px"] == 80
        assert "80 px" in error["message"]
        # ... and found in the same photo at 500 x 375, which is upsampled once (faces from about 40 px)
        r = shared_client.post("/identify", files={"image": upload(small.resize((500, 375)))})
        assert r.status_code == 200, r.text
        assert r.json()["faces_detected"] == 1

    def test_a_group_photo_shrunk_to_max_side_names_the_reach_in_its_own_pixels(
        self, shared_client: TestClient, head: Image.Image
    ) -> None:
        # 4000 x 3000 is shrunk to 1024 x 768: faces 200 px across become 51 px, below the window
        faces = [(scaled(head, 200), (200 + 500 * k, 1000)) for k in range(3)]
        error = error_of(
            shared_client.post("/enroll", files={"image": upload(composed((4000, 3000), faces))}, data={"name": "x"}),
            422,
            "no_face",
        )
        assert 311 <= error["details"]["min_face_px"] <= 313  # 80 px / (1024 / 4000)
        # in the many-photo routes too, in the photo's place, and in /verify naming the photo
        batch = shared_client.post("/identify/batch", files=[("images", upload(composed((4000, 3000), faces)))])
        assert batch.status_code == 200, batch.text
        assert 311 <= batch.json()["images"][0]["error"]["details"]["min_face_px"] <= 313
        verify = shared_client.post(
            "/verify",
            files={"image_a": upload(composed((640, 480), [(scaled(head, 150), (100, 100))])),
                   "image_b": upload(composed((4000, 3000), faces))},
        )
        details = error_of(verify, 422, "no_face")["details"]
        assert details["field"] == "image_b" and 311 <= details["min_face_px"] <= 313
        # faces above the reach are all found, in the photo's own pixels
        large = [(scaled(head, 340), (200 + 700 * k, 1000)) for k in range(3)]
        r = shared_client.post("/identify", files={"image": upload(composed((4000, 3000), large))})
        assert r.status_code == 200, r.text
        lefts = sorted(b["left"] for b in boxes(r.json()))
        assert len(lefts) == 3
        for k, left in enumerate(lefts):
            assert abs(left - (200 + 700 * k + 94)) < 40  # the face starts ~94 px into its 530 px square


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_boxes_of_several_faces_are_in_the_upright_photo_when_exif_turns_it(
    shared_client: TestClient, head: Image.Image, orientation: int
) -> None:
    """An upsampled photo (under 600 px) of two faces, stored turned with an EXIF orientation: the boxes are those
    of the upright photo, each over the face pasted there."""
    face = scaled(head, 100)  # about 156 px square, the face from ~28 px in
    upright = composed((520, 300), [(face, (20, 40)), (face, (320, 100))])
    turned = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    expected = shared_client.post("/identify", files={"image": upload(upright)})
    r = shared_client.post("/identify", files={"image": upload(turned, orientation)})
    assert expected.status_code == r.status_code == 200, r.text
    assert r.json()["faces_detected"] == 2
    found = sorted(boxes(r.json()), key=lambda b: b["left"])
    for box, (x, y) in zip(found, [(20, 40), (320, 100)], strict=True):
        assert abs(box["left"] - (x + 28)) < 15 and abs(box["top"] - (y + 28)) < 20
    for a, b in zip(found, sorted(boxes(expected.json()), key=lambda b: b["left"]), strict=True):
        assert max(abs(a[k] - b[k]) for k in a) <= 2  # JPEG noise of the turned pixels at most

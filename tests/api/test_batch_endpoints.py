"""POST /embed and POST /identify/batch on the real models and dev photos.

One app for the module (enrolled once: three people of the dev set), with a small FACEGATE_BATCH__MAX_IMAGES so
that the limit can be hit with few photos. Every photo's answer in a batch must be what the single-photo path gives:
/identify for /identify/batch, and the unbatched pipeline (same decode, same models) for /embed.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from app.config import Settings
from app.vision.batcher import BatchInfo
from app.vision.decode import decode_image
from app.vision.pipeline import Pipeline
from tests.api.conftest import api_settings, error_of, running

pytestmark = pytest.mark.model

MAX_IMAGES = 6
ENROLLED = {"Amy": "bbt_amy/face-api__amy1.png", "Howard": "bbt_howard/face-api__howard1.png",
            "Penny": "bbt_penny/face-api__penny1.png"}  # fmt: skip
PROBES = ("bbt_amy/face-api__amy2.png", "bbt_howard/face-api__howard2.png", "bbt_leonard/face-api__leonard1.png")

Upload = tuple[str, bytes, str]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# Photos no face can come from, made in code: each must give its own error and leave the others alone.
NOT_AN_IMAGE: Upload = ("notes.txt", b"this is not a photo", "text/plain")
EMPTY: Upload = ("empty.jpg", b"", "image/jpeg")
NO_FACE: Upload = ("grey.png", png(np.full((120, 160, 3), 128, np.uint8)), "image/png")
TOO_SMALL: Upload = ("dot.png", png(np.zeros((2, 2, 3), np.uint8)), "image/png")


def files(*uploads: Upload) -> list[tuple[str, Upload]]:
    return [("images", upload) for upload in uploads]


@pytest.fixture(scope="module")
def app_client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("batch") / "gallery.db"
    settings = api_settings(models_dir, f"sqlite:///{db}", batch={"max_images": MAX_IMAGES})
    with running(settings) as client:
        yield client


@pytest.fixture(scope="module")
def enrolled(app_client: TestClient, photo: Callable[[str], Upload]) -> dict[str, str]:
    ids = {}
    for name, relative in ENROLLED.items():
        response = app_client.post("/enroll", files={"image": photo(relative)}, data={"name": name})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["identity_id"]
    return ids


@pytest.fixture(scope="module")
def probes(photo: Callable[[str], Upload]) -> list[Upload]:
    return [photo(p) for p in PROBES]


@pytest.fixture(scope="module")
def single_identify(app_client: TestClient, enrolled: dict[str, str], probes: list[Upload]) -> list[dict[str, Any]]:
    """What /identify answers for each probe alone (top_k 3)."""
    answers = []
    for probe in probes:
        response = app_client.post("/identify", files={"image": probe}, data={"top_k": "3"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def assert_close(got: Any, want: Any, path: str = "") -> None:
    """Equal JSON, floats within 1e-6 (embeddings of a batch may differ from one photo's by ~1e-7)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=0, abs_tol=1e-6), (path, got, want)
    else:
        assert got == want, (path, got, want)


class TestIdentifyBatch:
    def test_each_photo_gets_what_identify_gives_it_alone(
        self, app_client: TestClient, probes: list[Upload], single_identify: list[dict[str, Any]],
        enrolled: dict[str, str],
    ) -> None:  # fmt: skip
        response = app_client.post("/identify/batch", files=files(*probes), data={"top_k": "3"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["n_images"] == len(probes) and body["n_errors"] == 0
        for index, (entry, alone, probe) in enumerate(zip(body["images"], single_identify, probes, strict=True)):
            assert entry["index"] == index and entry["filename"] == probe[0] and entry["error"] is None
            assert_close(entry["result"], alone)
        # The answers are right, not only consistent: Amy and Howard are named, Leonard (not enrolled) is not.
        matches = [e["result"]["faces"][0]["match"] for e in body["images"]]
        assert [m and m["identity_id"] for m in matches] == [enrolled["Amy"], enrolled["Howard"], None]

    def test_bad_photos_get_their_own_errors_and_the_others_their_results(
        self, app_client: TestClient, probes: list[Upload], single_identify: list[dict[str, Any]],
        caplog: pytest.LogCaptureFixture,
    ) -> None:  # fmt: skip
        uploads = [NOT_AN_IMAGE, probes[0], EMPTY, NO_FACE, probes[2], TOO_SMALL]
        caplog.set_level(logging.INFO, logger="facegate.access")
        response = app_client.post("/identify/batch", files=files(*uploads), data={"top_k": "3"})
        # The access line counts the outcomes: Amy named, Leonard (not enrolled) unknown, four photos refused.
        access = [r.__dict__["fields"] for r in caplog.records if r.name == "facegate.access"]
        assert [a["decision"] for a in access] == ["error:4,match:1,unknown:1"]
        assert response.status_code == 200, response.text
        body = response.json()
        codes = [e["error"]["code"] if e["error"] else None for e in body["images"]]
        assert codes == ["invalid_image", None, "invalid_image", "no_face", None, "image_too_small"]
        assert body["n_errors"] == 4
        for entry in body["images"]:
            assert (entry["result"] is None) == (entry["error"] is not None)
            if entry["error"]:
                assert set(entry["error"]) <= {"code", "message", "details"} and entry["error"]["message"]
        assert_close(body["images"][1]["result"], single_identify[0])
        assert_close(body["images"][4]["result"], single_identify[2])

    def test_threshold_applies_to_every_photo(self, app_client: TestClient, probes: list[Upload]) -> None:
        response = app_client.post("/identify/batch", files=files(*probes[:2]), data={"threshold": "0.01"})
        assert response.status_code == 200, response.text
        for entry in response.json()["images"]:
            result = entry["result"]
            assert result["threshold"] == 0.01 and result["threshold_source"] == "request"
            assert all(face["match"] is None for face in result["faces"])  # nobody is that close


class TestEmbed:
    def test_embeddings_equal_the_single_photo_pipeline(
        self, app_client: TestClient, models_dir: Path, probes: list[Upload], single_identify: list[dict[str, Any]]
    ) -> None:
        response = app_client.post("/embed", files=files(*probes))
        assert response.status_code == 200, response.text
        body = response.json()
        plain = Pipeline.from_settings(Settings(models_dir=models_dir, runtime={"providers": ["CPUExecutionProvider"]},
                                                batching={"enabled": False}))  # fmt: skip
        version = plain.model_version
        assert body["model_version"] == version and body["n_errors"] == 0
        assert body["n_faces"] == sum(len(e["faces"]) for e in body["images"])
        for entry, probe, alone in zip(body["images"], probes, single_identify, strict=True):
            assert entry["filename"] == probe[0] and entry["model_version"] == version and entry["error"] is None
            want = plain.find_faces(decode_image(probe[1], max_pixels=40_000_000))
            assert len(entry["faces"]) == len(want) >= 1
            for face, ref in zip(entry["faces"], want, strict=True):
                assert len(face["embedding"]) == 128
                np.testing.assert_allclose(np.array(face["embedding"], np.float32), ref.embedding, rtol=0, atol=1e-6)
                assert face["box"] == ref.box.as_dict() and face["landmarks"] == ref.landmarks.tolist()
                assert math.isclose(face["score"], ref.score, abs_tol=1e-6)
            # The same faces /identify reports for the photo alone (box, score, quality, landmarks).
            assert_close([{k: v for k, v in f.items() if k != "embedding"} for f in entry["faces"]],
                         [f["face"] for f in alone["faces"]])  # fmt: skip

    def test_bad_photos_get_their_own_errors(self, app_client: TestClient, probes: list[Upload]) -> None:
        response = app_client.post("/embed", files=files(NO_FACE, probes[1], NOT_AN_IMAGE, TOO_SMALL))
        assert response.status_code == 200, response.text
        images = response.json()["images"]
        codes = [e["error"]["code"] if e["error"] else None for e in images]
        assert codes == ["no_face", None, "invalid_image", "image_too_small"]
        # Each error is the object /identify refuses that photo alone with: `details` only where there are some
        # (no_face's reach, image_too_small's sizes), never `"details": null`.
        for upload, entry in zip((NO_FACE, NOT_AN_IMAGE, TOO_SMALL), (images[0], images[2], images[3]), strict=True):
            alone = app_client.post("/identify", files={"image": upload})
            assert entry["error"] == alone.json()["error"], upload[0]
        assert "details" not in images[2]["error"] and images[3]["error"]["details"]["width"] == 2
        assert images[0]["error"]["details"] == {"min_face_px": 40}  # a small photo: upsampled once
        assert images[0]["faces"] is None and len(images[1]["faces"][0]["embedding"]) == 128
        assert "embedding" not in response.text.split('"images"')[0]  # only faces carry embeddings

    def test_a_photo_sent_twice_gives_the_same_faces_twice(self, app_client: TestClient, probes: list[Upload]) -> None:
        response = app_client.post("/embed", files=files(probes[0], probes[0]))
        assert response.status_code == 200, response.text
        first, second = response.json()["images"]
        assert_close(second["faces"], first["faces"])


class TestLimits:
    @pytest.mark.parametrize("endpoint", ["/embed", "/identify/batch"])
    def test_more_photos_than_the_limit_are_refused(self, app_client: TestClient, endpoint: str) -> None:
        error = error_of(app_client.post(endpoint, files=files(*[NO_FACE] * (MAX_IMAGES + 1))), 422, "invalid_request")
        assert error["details"]["limit"] == MAX_IMAGES and "FACEGATE_BATCH__MAX_IMAGES" in error["message"]

    @pytest.mark.parametrize("endpoint", ["/embed", "/identify/batch"])
    def test_no_photo_is_refused(self, app_client: TestClient, endpoint: str) -> None:
        error_of(app_client.post(endpoint, data={"top_k": "2"} if "identify" in endpoint else {"x": "1"}), 422,
                 "invalid_request")  # fmt: skip

    def test_unknown_fields_are_refused(self, app_client: TestClient, probes: list[Upload]) -> None:
        error = error_of(app_client.post("/embed", files=files(probes[0]), data={"top_k": "3"}), 422, "invalid_request")
        assert error["details"]["unknown_fields"] == ["top_k"]

    def test_the_body_limit_covers_the_whole_batch(
        self, models_dir: Path, tmp_path: Path, probes: list[Upload]
    ) -> None:
        limit = len(probes[0][1]) + len(probes[1][1]) // 2  # one photo fits, two do not
        with running(api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", image={"max_upload_bytes": limit},
                                  preload_models=False)) as client:  # fmt: skip
            error_of(client.post("/embed", files=files(probes[0], probes[1])), 413, "request_too_large")


def test_photos_past_the_requests_pixel_budget_are_refused_undecoded(
    models_dir: Path, tmp_path: Path, probes: list[Upload]
) -> None:
    """A 40-megapixel PNG can be 50 kB and costs ~1 s: the photos of one request share image.max_request_pixels.
    The dev probes are 150x150 (22,500 pixels): with a budget of 40,000 the first two are decoded, the next ones
    get request_too_large in their place, undecoded (not an image would otherwise be invalid_image)."""
    image = {"max_pixels": 40_000, "max_request_pixels": 40_000}
    with running(api_settings(models_dir, f"sqlite:///{tmp_path / 'g.db'}", image=image)) as client:
        batch = files(probes[0], probes[1], NOT_AN_IMAGE, probes[2])
        for endpoint in ("/embed", "/identify/batch"):
            response = client.post(endpoint, files=batch)
            assert response.status_code == 200, response.text
            entries = response.json()["images"]
            assert [e["error"]["code"] if e["error"] else None for e in entries] == [
                None, None, "request_too_large", "request_too_large"
            ], endpoint  # fmt: skip
            assert entries[2]["error"]["details"] == {"max_request_pixels": 40_000}
            assert "FACEGATE_IMAGE__MAX_REQUEST_PIXELS" in entries[2]["error"]["message"]
        # A new request has the whole budget again; /cluster lists the refused photos among its problems.
        clustered = client.post("/cluster", files=files(probes[2], probes[0], probes[1]))
        assert clustered.status_code == 200, clustered.text
        body = clustered.json()
        assert body["n_photos"] == 3 and body["n_faces"] == 2
        assert [(p["photo_index"], p["code"]) for p in body["problems"]] == [(2, "request_too_large")]


def test_the_pixel_budget_holds_at_least_one_photo() -> None:
    with pytest.raises(ValueError, match="max_request_pixels"):
        Settings(image={"max_pixels": 1000, "max_request_pixels": 999})


def test_concurrent_identify_requests_share_the_inference_threads(
    app_client: TestClient, probes: list[Upload], single_identify: list[dict[str, Any]]
) -> None:
    """Requests at once: every network call goes through the batchers (counted by the pipeline's hook), and
    every answer is the one the request gets alone."""
    pipeline = app_client.app.state.service.pipeline  # type: ignore[attr-defined]
    assert pipeline.batching
    seen: list[BatchInfo] = []
    pipeline.on_batch = seen.append
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(app_client.post, "/identify", files={"image": p}, data={"top_k": "3"})
                       for p in probes * 2]  # fmt: skip
            answers = [f.result(timeout=300) for f in futures]
    finally:
        pipeline.on_batch = None
    for response, alone in zip(answers, single_identify * 2, strict=True):
        assert response.status_code == 200, response.text
        assert_close(response.json(), alone)
    assert sum(b.items for b in seen if b.name == "detector") == 6
    assert sum(b.items for b in seen if b.name == "embedder") == 6  # one embedding call's share per photo


def test_many_photo_requests_leave_the_shared_threads_to_other_requests(
    app_client: TestClient, probes: list[Upload], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/embed and /identify/batch run their photos on threads of their own: with more of them in flight than the
    shared thread pool has threads (anyio's 40), the API-key check and /readyz (health checks time out after 4 s)
    are still answered at once, not after the photos."""
    import threading
    import time

    from app.service import FaceService

    release = threading.Event()
    real = FaceService.embed_photos

    def slow(self: FaceService, photos: Any) -> Any:  # a long many-photo request: the real work, later
        release.wait(60)
        return real(self, photos)

    monkeypatch.setattr(FaceService, "embed_photos", slow)
    with ThreadPoolExecutor(50) as pool:
        try:
            posts = [pool.submit(app_client.post, "/embed", files=files(probes[0])) for _ in range(45)]
            time.sleep(2)  # every one inside the route
            started = time.monotonic()
            ready = pool.submit(app_client.get, "/readyz").result(timeout=30)
            waited = time.monotonic() - started
        finally:
            release.set()
        assert [p.result().status_code for p in posts] == [200] * 45
    assert ready.status_code == 200
    assert waited < 3, f"/readyz waited {waited:.1f} s behind the /embed requests"

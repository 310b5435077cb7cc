"""The MMOD face detector: each step against dlib (resize, upsample, too-small images) or hand-worked values
(pyramid layout, decoding, NMS, mapping back), and the whole detector against dlib-bin on real photos."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

from app.config import RuntimeSettings
from app.errors import ImageTooSmall
from app.vision import detect, pyramid
from app.vision.detect import Candidate, FaceDetector
from app.vision.models import load_manifest
from app.vision.types import Box
from tests.oracle import iou, photo_paths

CPU = RuntimeSettings(providers=["CPUExecutionProvider"])
_dlib: dict[str, Any] = {}


def dlib_detector() -> Any:
    """dlib's own CNN face detector on the packaged .dat (dlib-bin is the test oracle)."""
    if not _dlib:
        import dlib

        from models.build import source_dir

        _dlib["detector"] = dlib.cnn_face_detection_model_v1(str(source_dir() / "mmod_human_face_detector.dat"))
    return _dlib["detector"]


def dlib_detect(job: tuple[np.ndarray, int]) -> list[tuple[tuple[int, int, int, int], float]] | None:
    """dlib's detections for (pixels, upsample), or None where dlib refuses the image."""
    pixels, upsample = job
    try:
        found = dlib_detector()(pixels, upsample)
    except RuntimeError:
        return None
    return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence)) for d in found]


@pytest.fixture(scope="module")
def dlib_pool() -> Iterator[ProcessPoolExecutor]:
    """dlib's detector runs in two spawned workers (it uses one core each). Never in the pytest process: its
    CNN starts a thread pool there, and processes forked afterwards (other tests' oracles) would hang. Only
    images dlib can take go here: a refused one can leave the worker's memory corrupted."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth-ish synthetic RGB content (noise plus gradients), so resizes see both edges and flat areas."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy * 3 + xx * 2)[..., None] % 256
    return ((base + rng.integers(0, 64, (height, width, 3))) % 256).astype(np.uint8)


class TestLayout:
    def test_level_sizes_shrink_by_five_sixths_until_under_five_rows(self) -> None:
        sizes = pyramid.level_sizes(480, 640)
        assert sizes[:4] == [(480, 640), (400, 533), (333, 444), (277, 370)]
        assert sizes[-1][0] >= 5 and int(sizes[-1][0] * 5 / 6) < 5
        assert pyramid.level_sizes(30, 12)[-3:] == [(8, 3), (6, 2), (5, 1)]  # stops at zero width
        assert pyramid.level_sizes(0, 10) == []

    def test_small_image_keeps_only_level_zero(self) -> None:
        # Worked by hand from compute_tiled_image_pyramid_details: level 1 (5x8) would overlap level 0.
        layout = pyramid.tiled_layout(7, 10)
        assert (layout.rows, layout.cols) == (29, 32)
        assert layout.levels == (Box(11, 11, 20, 17),)

    def test_narrow_image_uses_unsigned_comparisons(self) -> None:
        # 30x12: 12 - 6 - 10 wraps around as unsigned, so the first column stops after four levels (signed
        # arithmetic would keep going); the rest climb up the right edge from the bottom.
        layout = pyramid.tiled_layout(30, 12)
        assert (layout.rows, layout.cols) == (143, 34)
        assert layout.levels == (
            Box(11, 11, 22, 40),
            Box(11, 51, 20, 75),
            Box(11, 86, 18, 105),
            Box(11, 116, 16, 131),
            Box(18, 119, 22, 131),
            Box(19, 99, 22, 108),
            Box(20, 81, 22, 88),
            Box(21, 65, 22, 70),
            Box(22, 50, 22, 54),
        )

    @pytest.mark.parametrize(
        ("height", "width"), [(480, 640), (640, 480), (250, 250), (112, 112), (961, 1282), (40, 300)]
    )
    def test_levels_fit_without_overlap(self, height: int, width: int) -> None:
        layout = pyramid.tiled_layout(height, width)
        sizes = pyramid.level_sizes(height, width)
        assert layout.cols == width + 2 * pyramid.OUTER_PADDING
        assert layout.levels[0] == Box(11, 11, 10 + width, 10 + height)
        assert [(r.height, r.width) for r in layout.levels] == sizes[: len(layout.levels)]
        for i, a in enumerate(layout.levels):
            assert a.left >= 11 and a.top >= 11 and a.right < layout.cols - 11 and a.bottom < layout.rows - 11
            for b in layout.levels[i + 1 :]:
                assert not pyramid._intersects(a, b)

    def test_640x480_tiles_into_1782x662(self) -> None:
        layout = pyramid.tiled_layout(480, 640)
        assert (layout.rows, layout.cols, len(layout.levels)) == (1782, 662, 24)
        assert layout.levels[4] == Box(11, 1541, 318, 1770)  # last of the first column
        assert layout.levels[5] == Box(395, 1580, 650, 1770)  # first of the second, bottom-right aligned


class TestResize:
    """Bit-exact against dlib.resize_image, which runs the same code as the detector's pyramid levels."""

    SIZES = (
        ((480, 640), (400, 533)),
        ((37, 91), (30, 75)),
        ((7, 10), (5, 8)),
        ((50, 60), (101, 122)),
        ((20, 33), (47, 13)),
    )

    @pytest.mark.parametrize(("src", "dst"), SIZES)
    def test_float_planes_match_dlib(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        import dlib

        rng = np.random.default_rng(7)
        plane = (random_image(rng, *src)[..., 0].astype(np.float32) - np.float32(122.782)) / np.float32(256)
        ours = pyramid.resize_plane(plane[None], *dst)[0]
        np.testing.assert_array_equal(ours, dlib.resize_image(plane, *dst))

    @pytest.mark.parametrize(("src", "dst"), SIZES)
    def test_rgb_matches_dlib(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        import dlib

        image = random_image(np.random.default_rng(8), *src)
        np.testing.assert_array_equal(pyramid.resize_rgb(image, *dst), dlib.resize_image(image, *dst))

    def test_many_random_sizes_match_dlib(self) -> None:
        import dlib

        rng = np.random.default_rng(9)
        for _ in range(60):
            h, w, oh, ow = (int(v) for v in rng.integers(1, 90, 4))
            plane = rng.standard_normal((h, w)).astype(np.float32)
            np.testing.assert_array_equal(
                pyramid.resize_plane(plane[None], oh, ow)[0], dlib.resize_image(plane, oh, ow)
            )
            image = random_image(rng, h, w)
            np.testing.assert_array_equal(pyramid.resize_rgb(image, oh, ow), dlib.resize_image(image, oh, ow))

    @pytest.mark.parametrize(("height", "width"), [(1, 1), (5, 8), (121, 77), (250, 250)])
    def test_upsample_is_2h_plus_1_by_2w_plus_2(self, height: int, width: int) -> None:
        import dlib

        image = random_image(np.random.default_rng(10), height, width)
        up = pyramid.upsample(image)
        assert up.shape == (2 * height + 1, 2 * width + 2, 3)
        # pyramid_up is resize_image into the up-mapped rectangle (the binding has no pyramid_up).
        np.testing.assert_array_equal(up, dlib.resize_image(image, 2 * height + 1, 2 * width + 2))

    def test_tiled_pyramid_levels_are_resized_from_the_previous_normalised_level(self) -> None:
        import dlib

        image = random_image(np.random.default_rng(11), 120, 90)
        layout = pyramid.tiled_layout(120, 90)
        tensor = pyramid.tiled_pyramid(image, layout, detect.MEANS)
        assert tensor.shape == (1, 3, layout.rows, layout.cols) and tensor.dtype == np.float32
        planes = tensor[0]
        filled = np.zeros(planes.shape[1:], bool)
        for i, rect in enumerate(layout.levels):
            region = planes[:, rect.top : rect.bottom + 1, rect.left : rect.right + 1]
            if i == 0:
                expected = (image.transpose(2, 0, 1).astype(np.float32) - detect.MEANS[:, None, None]) / np.float32(256)
            else:
                prev = layout.levels[i - 1]
                source = planes[:, prev.top : prev.bottom + 1, prev.left : prev.right + 1]
                expected = np.stack(
                    [dlib.resize_image(np.ascontiguousarray(c), rect.height, rect.width) for c in source]
                )
            np.testing.assert_array_equal(region, expected)
            filled[rect.top : rect.bottom + 1, rect.left : rect.right + 1] = True
        assert not planes[:, ~filled].any()  # zero (the mean colour) everywhere else

    def test_resize_weights_are_computed_once_per_size_and_shared_read_only(self) -> None:
        rows, cols = pyramid._rows(480, 400), pyramid._cols(640, 533)
        assert pyramid._rows(480, 400) is rows and pyramid._cols(640, 533) is cols
        arrays: list[np.ndarray] = [rows.top, rows.bottom, rows.frac, rows.frac32, rows.inv32]
        arrays += [cols.left, cols.frac, cols.inv, cols.tail_left, cols.tail_right, cols.tail_frac]
        assert not any(a.flags.writeable for a in arrays)  # a caller writing into one would change every photo's

    def test_tiled_pyramid_is_the_same_with_cached_weights(self) -> None:
        image = random_image(np.random.default_rng(12), 97, 131)
        layout = pyramid.tiled_layout(97, 131)
        pyramid._rows.cache_clear()
        pyramid._cols.cache_clear()
        first = pyramid.tiled_pyramid(image, layout, detect.MEANS)
        assert pyramid._cols.cache_info().misses == len(layout.levels) - 1
        again = pyramid.tiled_pyramid(image, layout, detect.MEANS)
        assert pyramid._cols.cache_info().hits >= len(layout.levels) - 1
        np.testing.assert_array_equal(again, first)


class TestDecode:
    LAYOUT = pyramid.tiled_layout(480, 640)  # level 0 at (11, 11)-(650, 490), level 1 at (11, 501)-(543, 900)

    def scores(self, cells: dict[tuple[int, int], float]) -> np.ndarray:
        h = (((self.LAYOUT.rows - 5) // 2 + 1 - 5) // 2 + 1 - 5) // 2 + 1
        w = (((self.LAYOUT.cols - 5) // 2 + 1 - 5) // 2 + 1 - 5) // 2 + 1
        scores = np.full((h, w), -1.0, np.float32)
        for (r, c), v in cells.items():
            scores[r, c] = v
        return scores

    def test_windows_map_through_their_level(self) -> None:
        # Cell (10, 20) -> centre (174, 94) in level 0: window 174 +- 39.5 - 11 -> (123.5, 43.5, 202.5, 122.5).
        # Cell (70, 20) -> centre (174, 574) in level 1: (123.5, 33.5, 202.5, 112.5) * 1.2 + 0.3 in double is
        # (148.5, 40.49999999999999, 243.3, 135.3): 148.5 rounds away from zero, 40.4999... down.
        # Cell (60, 20) -> centre (174, 494), in the padding: nearest is level 0 (4 px away vs 7).
        found = detect.decode(self.scores({(10, 20): 0.5, (70, 20): 1.5, (60, 20): 0.25}), self.LAYOUT)
        assert found == [
            Candidate(1.5, Box(149, 40, 243, 135)),
            Candidate(0.5, Box(124, 44, 203, 123)),
            Candidate(0.25, Box(124, 444, 203, 523)),
        ]

    def test_threshold_is_strict(self) -> None:
        scores = self.scores({(10, 20): 0.0, (11, 20): 0.5})
        assert [c.score for c in detect.decode(scores, self.LAYOUT)] == [0.5]
        assert [c.score for c in detect.decode(scores, self.LAYOUT, threshold=-0.5)] == [0.5, 0.0]
        assert detect.decode(scores, self.LAYOUT, threshold=0.5) == []

    def test_round_half_away_from_zero(self) -> None:
        values = np.array([-2.5, -0.5, 0.5, 1.5, 2.4999, 0.49999999999999994, -0.49999999999999994])
        assert detect.round_half_away(values).tolist() == [-3, -1, 1, 2, 2, 0, 0]


class TestNms:
    def test_overlap_divides_by_the_bounding_box_not_the_union(self) -> None:
        a = Box(0, 0, 99, 99)
        b = Box(28, 28, 127, 127)  # inner 72^2 = 5184: union IoU 0.350, bounding-box ratio 5184 / 128^2 = 0.316
        assert iou((0, 0, 99, 99), (28, 28, 127, 127)) > detect.NMS_IOU
        assert not detect.overlaps(a, b)
        c = Box(25, 25, 124, 124)  # inner 75^2 = 5625, bounding box 125^2 = 15625: 0.36
        assert detect.overlaps(a, c)

    def test_threshold_edges(self) -> None:
        # Same-height boxes shifted sideways: inner / outer = (100 - s) / (100 + s); 0.3382761 lies between s = 50 and 49.
        a = Box(0, 0, 99, 9)
        assert not detect.overlaps(a, Box(50, 0, 149, 9))  # 50 / 150 = 0.333
        assert detect.overlaps(a, Box(49, 0, 148, 9))  # 51 / 149 = 0.342

    def test_contained_and_disjoint_boxes_survive(self) -> None:
        big, small, far = Box(0, 0, 99, 99), Box(10, 10, 39, 39), Box(200, 200, 279, 279)
        kept = detect.nms(
            [Candidate(2.0, big), Candidate(1.5, small), Candidate(1.0, far), Candidate(0.5, Box(1, 1, 98, 98))]
        )
        assert [c.box for c in kept] == [big, small, far]  # covered-fraction threshold 1.0 never fires

    def test_higher_score_wins(self) -> None:
        a, b = Box(0, 0, 79, 79), Box(5, 5, 84, 84)
        assert detect.nms([Candidate(0.9, b), Candidate(0.3, a)]) == [Candidate(0.9, b)]


class TestMapBack:
    def test_half_then_offset_per_level(self) -> None:
        # p / 2 - (1.25, 0.75): (10, 20, 100, 120) -> (3.75, 9.25, 48.75, 59.25)
        assert detect.map_back(Box(10, 20, 100, 120), 1) == Box(4, 9, 49, 59)
        # twice: (3.75, 9.25, 48.75, 59.25) / 2 - (1.25, 0.75) -> (0.625, 3.875, 23.125, 28.875)
        assert detect.map_back(Box(10, 20, 100, 120), 2) == Box(1, 4, 23, 29)
        assert detect.map_back(Box(1, -1, 2, 0), 1) == Box(-1, -1, 0, -1)  # -0.75 -> -1, -1.25 -> -1, -0.25 -> 0
        assert detect.map_back(Box(7, 8, 9, 10), 0) == Box(7, 8, 9, 10)

    def test_upsampled_size(self) -> None:
        assert detect.upsampled_size(100, 50, 0) == (100, 50)
        assert detect.upsampled_size(100, 50, 2) == (403, 206)


class TestTooSmall:
    # (height, width, upsample): dlib refuses the first two, takes the rest.
    DLIB_SAFE = (
        (6, 40, 0),
        (6, 10, 0),
        (6, 40, 1),
        (7, 40, 0),
        (40, 10, 0),
        (7, 10, 0),
        (6, 10, 1),
        (40, 9, 1),
        (4, 4, 1),
    )
    NARROW = ((40, 9, 0), (7, 9, 0), (3, 3, 1), (2, 3, 1), (1, 1, 0), (1, 1, 1), (0, 0, 0))

    def test_refuses_what_dlib_refuses(self) -> None:
        """Rows: dlib throws for fewer than 7 (after upsampling) and takes the others, as check_size does."""
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # its own worker: see dlib_pool
            answers = list(
                pool.map(dlib_detect, [(np.full((h, w, 3), 128, np.uint8), up) for h, w, up in self.DLIB_SAFE])
            )
        assert [a is None for a in answers] == [True, True] + [False] * (len(self.DLIB_SAFE) - 2)
        with pytest.raises(ImageTooSmall):
            detect.check_size(6, 40, 0)
        with pytest.raises(ImageTooSmall):
            detect.check_size(6, 10, 0)
        for height, width, up in self.DLIB_SAFE[2:]:
            detect.check_size(height, width, up)

    def test_refuses_images_narrower_than_ten_columns(self) -> None:
        """Columns: under 10 (after upsampling) dlib's layout stops before placing the photo, and dlib then
        writes out of bounds (it throws, segfaults or corrupts later detections), so it cannot be the oracle
        here; our layout shows the same breakdown, and check_size refuses first."""
        for height, width, up in self.NARROW:
            with pytest.raises(ImageTooSmall):
                detect.check_size(height, width, up)
            rows, cols = detect.upsampled_size(height, width, up)
            if rows * cols:
                layout = pyramid.tiled_layout(rows, cols)
                assert not layout.levels or layout.levels[0] != Box(11, 11, 10 + cols, 10 + rows)
        assert pyramid.tiled_layout(40, 10).levels[0] == Box(11, 11, 20, 50)

    def test_detector_raises_before_opening_the_model(self, tmp_path: Path) -> None:
        detector = FaceDetector(tmp_path / "absent.onnx", CPU)
        with pytest.raises(ImageTooSmall, match="too small") as info:
            detector.detect(np.zeros((5, 40, 3), np.uint8))
        assert info.value.code == "image_too_small" and info.value.details["height"] == 5
        assert detector.provider is None

    def test_a_shrunk_photo_is_named_by_its_own_size(self) -> None:
        from app.config import DetectorSettings
        from app.vision.pipeline import working_image

        with pytest.raises(ImageTooSmall) as info:
            working_image(np.zeros((1, 6000, 3), np.uint8), DetectorSettings(upsample=0, max_side=1024))
        assert "image of 6000x1 px, shrunk to 1024x1 px" in info.value.message
        assert info.value.details == {
            "width": 6000,
            "height": 1,
            "upsample": 0,
            "shrunk_to": {"width": 1024, "height": 1},
        }

    def test_rejects_non_rgb_input(self, tmp_path: Path) -> None:
        detector = FaceDetector(tmp_path / "absent.onnx", CPU)
        with pytest.raises(ValueError, match="uint8"):
            detector.detect(np.zeros((50, 40), np.uint8))
        with pytest.raises(ValueError, match="upsample"):
            detector.detect(np.zeros((50, 40, 3), np.uint8), upsample=-1)


def test_constants_match_the_model_file() -> None:
    """Means, window and NMS thresholds hard-coded in detect.py are those stored in the .dat file."""
    from models import detector as converter
    from models.build import source_dir

    parsed = converter.parse((source_dir() / "mmod_human_face_detector.dat").read_bytes())
    assert np.array_equal(np.array(parsed.means, np.float32), detect.MEANS)
    assert (parsed.options.window_width, parsed.options.window_height) == (detect.WINDOW, detect.WINDOW)
    assert parsed.options.nms_iou_threshold == detect.NMS_IOU
    assert parsed.options.nms_percent_covered_threshold == detect.NMS_COVERED


# ---------------------------------------------------------------------------------------------------------
# The whole detector against dlib on real photos


def load_photo(path: Path, max_side: int = 1024) -> np.ndarray:
    with PILImage.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), PILImage.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(image))


def parity_jobs(dev_faces: Path) -> list[tuple[str, np.ndarray, int]]:
    """Every large photo (shrunk to 1024) at upsample 0, and every 16th small one at upsample 0 and 1."""
    jobs = []
    for i, path in enumerate(photo_paths(dev_faces)):
        with PILImage.open(path) as raw:
            large = max(raw.size) > 256
        if not large and i % 16:
            continue
        pixels = load_photo(path)
        name = str(path.relative_to(dev_faces))
        if not large or max(pixels.shape) <= 512:
            jobs += [(name, pixels, 0), (name, pixels, 1)]
        else:
            jobs.append((name, pixels, 0))
    return jobs


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> FaceDetector:
    found = FaceDetector(load_manifest(models_dir).path("detector"), CPU)
    found.load()
    return found


@pytest.mark.model
@pytest.mark.slow
def test_parity_with_dlib_on_dev_photos(
    dev_faces: Path, detector: FaceDetector, dlib_pool: ProcessPoolExecutor
) -> None:
    jobs = parity_jobs(dev_faces)
    expected = dlib_pool.map(dlib_detect, [(pixels, up) for _, pixels, up in jobs])
    faces, worst_iou, worst_score = 0, 1.0, 0.0
    for (name, pixels, up), theirs in zip(jobs, expected, strict=True):
        assert theirs is not None, name
        found = detector.detect(pixels, upsample=up)
        assert len(found) == len(theirs), (name, up, [d.box for d in found], theirs)
        for det, (box, score) in zip(found, theirs, strict=True):
            overlap = iou((det.box.left, det.box.top, det.box.right, det.box.bottom), box)
            assert overlap >= 0.99, (name, up, det.box, box)
            assert abs(det.score - score) <= 1e-4, (name, up, det.score, score)
            faces, worst_iou, worst_score = faces + 1, min(worst_iou, overlap), max(worst_score, abs(det.score - score))
    assert len(jobs) >= 40 and faces >= 30  # the sample really exercised the detector
    print(f"\n{len(jobs)} photo/upsample cases, {faces} faces, min IoU {worst_iou}, max score diff {worst_score:.2e}")


@pytest.mark.model
def test_detections_are_sorted_and_thresholded(detector: FaceDetector, dev_faces: Path) -> None:
    pixels = load_photo(dev_faces / "barack_obama" / "face_recognition__obama.jpg", max_side=400)
    found = detector.detect(pixels, upsample=1)
    assert found and detector.provider == "CPUExecutionProvider"
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    assert all(isinstance(v, int) for d in found for v in (d.box.left, d.box.top, d.box.right, d.box.bottom))
    cut = scores[0] - 1e-3
    assert [d.score for d in detector.detect(pixels, upsample=1, score_threshold=cut)] == [s for s in scores if s > cut]

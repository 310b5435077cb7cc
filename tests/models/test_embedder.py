"""The ResNet embedder converter: byte-exact parsing, and the ONNX graph against dlib on chips dlib made itself.

Chips: dlib's HOG detector -> dlib's 5-point shape_predictor -> dlib.get_face_chip (150 px, padding 0.25) on a
deterministic sample of dev photos; oracle: face_recognition_model_v1.compute_face_descriptor(chip).
Tolerance 1e-5 per dimension (dlib-models.md section 11 measured 4.9e-7).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models import embedder
from models.build import source_dir
from models.dlib_dnn import Affine, Conv, Fc
from models.serialization import FormatError

pytestmark = pytest.mark.model

SOURCE = "dlib_face_recognition_resnet_model_v1.dat"
SAMPLE_PHOTOS = 48
MAX_SIDE = 1600  # very large photos are shrunk first: HOG only needs faces of 80 px or more


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return (source_dir() / SOURCE).read_bytes()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("embedder") / "embedder.onnx"
    extra = embedder.convert(source_dir() / SOURCE, path)
    assert extra["opset"] == 17
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def dlib_chips(dev_faces: Path) -> tuple[np.ndarray, np.ndarray]:
    """(chips N x 150 x 150 x 3 uint8, dlib's descriptors N x 128 float64) for the sampled dev photos."""
    import dlib

    src = source_dir()
    hog = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(str(src / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(src / SOURCE))
    photos = sorted(p for p in dev_faces.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    chips = []
    for path in photos[:: max(1, len(photos) // SAMPLE_PHOTOS)][:SAMPLE_PHOTOS]:
        with Image.open(path) as im:
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))
            rgb = im.convert("RGB")
        rgb.thumbnail((MAX_SIDE, MAX_SIDE))
        pixels = np.asarray(rgb)
        for rect in hog(pixels, 0):
            chips.append(dlib.get_face_chip(pixels, shapes(pixels, rect), size=150, padding=0.25))
    descriptors = np.array([recognizer.compute_face_descriptor(chip) for chip in chips], dtype=np.float64)
    return np.stack(chips), descriptors


class TestParser:
    def test_reads_the_whole_network(self, source_bytes: bytes) -> None:
        net = embedder.parse(source_bytes)
        kinds = Counter(type(layer).__name__ for layer in net.network.layers)
        assert kinds["Conv"] == 29 and kinds["Affine"] == 29 and kinds["Fc"] == 1
        assert kinds["TagSpec"] == 18 and kinds["SkipSpec"] == 4 and kinds["AddPrevSpec"] == 14
        assert Counter(net.network.wrapper_versions) == {2: 107, 1: 22, 3: 1}  # the 130 header integers
        assert net.means == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
        assert (net.margin, net.distance_threshold) == pytest.approx((0.04, 0.6))
        fc = net.network.layers[-1]
        assert isinstance(fc, Fc) and fc.weights.shape == (256, 128)
        stem, affine = net.network.layers[:2]
        assert isinstance(stem, Conv) and stem.weights.shape == (32, 3, 7, 7) and isinstance(affine, Affine)

    @pytest.mark.parametrize(
        "corrupt",
        [
            pytest.param(lambda d: d[:-1], id="truncated-by-one-byte"),
            pytest.param(lambda d: d[: len(d) // 2], id="truncated-in-the-middle"),
            pytest.param(lambda d: d + b"\x00", id="trailing-byte"),
            pytest.param(lambda d: d.replace(b"relu_", b"relu2", 1), id="layer-version-string"),
            pytest.param(lambda d: d.replace(b"avg_pool_2", b"avg_pool_3", 1), id="pool-version-string"),
            pytest.param(lambda d: d.replace(b"\x01\x02\x01\x02", b"\x01\x02\x01\x04", 1), id="wrapper-version"),
            pytest.param(lambda d: d.replace(b"input_rgb_image_sized\x03", b"input_rgb_image_sizex\x03", 1), id="input"),
        ],
    )
    def test_corrupt_file_is_refused(self, source_bytes: bytes, corrupt: Callable[[bytes], bytes]) -> None:
        data = corrupt(source_bytes)
        assert data != source_bytes
        with pytest.raises(FormatError):
            embedder.parse(data)


class TestGraph:
    def test_signature(self, session: ort.InferenceSession) -> None:
        (chips,) = session.get_inputs()
        (out,) = session.get_outputs()
        assert (chips.name, chips.type, chips.shape[1:]) == ("chips", "tensor(uint8)", [150, 150, 3])
        assert (out.name, out.type, out.shape[1:]) == ("embeddings", "tensor(float)", [128])
        assert isinstance(chips.shape[0], str) and isinstance(out.shape[0], str)  # dynamic batch

    def test_matches_dlib_on_dlib_chips(self, session: ort.InferenceSession, dlib_chips: tuple[np.ndarray, np.ndarray]) -> None:
        chips, expected = dlib_chips
        assert len(chips) >= 30
        ours = np.concatenate([session.run(None, {"chips": chips[i : i + 16]})[0] for i in range(0, len(chips), 16)])
        assert ours.dtype == np.float32 and ours.shape == (len(chips), 128)
        assert np.abs(ours - expected).max() <= 1e-5
        norms = np.linalg.norm(ours, axis=1)
        assert norms.min() > 1.0 and norms.max() < 2.0  # dlib's scale: not normalised

    def test_batch_invariance(self, session: ort.InferenceSession, dlib_chips: tuple[np.ndarray, np.ndarray]) -> None:
        chips = dlib_chips[0][:16]
        one_by_one = np.concatenate([session.run(None, {"chips": chip[None]})[0] for chip in chips])
        batched = session.run(None, {"chips": chips})[0]
        assert np.abs(one_by_one - batched).max() <= 1e-6


def test_graph_is_convolutions_and_pooling_only(source_bytes: bytes) -> None:
    """The input normalisation lives in the first convolution and the down blocks' end-padding in identity 1x1
    convolutions: no whole-tensor Sub/Div/Pad that would break ONNX Runtime's blocked layout (the dlib parity test
    above proves the maths unchanged)."""
    graph = embedder.build_graph(embedder.parse(source_bytes)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert set(ops) == {"Cast", "Transpose", "Conv", "Relu", "Add", "MaxPool", "AveragePool", "GlobalAveragePool",
                        "Flatten", "MatMul", "Identity"}  # fmt: skip
    # the network's 29, plus the identities: 3 shortcuts that gain channels (32->64->128->256), 2 branches a row and
    # a column short of their shortcut (the two smallest levels)
    assert ops["Conv"] == 29 + 3 + 2

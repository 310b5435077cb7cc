"""`run_identify_eval` (issue 9's eval-identify protocol) on real photos.

- dev (53 people, 476 photos): the embeddings come from the session's `dev_results` (tests/dev_embeddings.py: the same
  models, every dev photo, computed once per session and cached), handed to `run_identify_eval` as an
  `EmbeddingCache`, so everything but the network calls runs: photo listing, no-face counting, the split,
  the evaluation, the JSON and the PNG. About 2 s once `dev_results` exists.
- a small folder of lfw-dev photos (symlinks) plus a blank image: the real embedding path and the cache file
  (a few seconds).

Measured on dev (pipeline embeddings; lfw-calibrated shipped model): 27 enrolled, 214 probes, 233 strangers, 2
photos without a face; at the default settings FPIR 0 % (0/233), DIR 60.3 %; the raw rule at 0.36 accepts
11.6 % of the strangers. DIR at FPIR 1 %: raw 71.0 %, ratio 66.8 %, facegate 71.0 % (a tie: 152/214 each; the
1 % point lets 2 of the 233 strangers in, so it moves by several points with one stranger). At 5 % and 10 % raw
is ahead on dev (76.2 / 77.6 % vs 73.4 / 76.6 %): with N = 27 and strangers far from each other the runner-up
carries little information. facegate's gain is an lfw-dev fact (N = 414: 75.1 % vs raw 54.3 % at FPIR 1 %); the
full lfw-dev run is not tested here: embedding its 2,107 photos takes about 6 minutes on CI's 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from app.config import Provider, RuntimeSettings, Settings
from app.errors import InvalidRequest
from app.evaluate import Embedded, EmbeddingCache, pipeline_signature
from app.identify_eval import (
    REPORT_JSON,
    REPORT_PNG,
    IdentifyEvaluation,
    format_identify_table,
    person_photos,
    run_identify_eval,
)
from app.vision.models import load_manifest
from tests.dev_embeddings import DevResults

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DevEval = tuple[IdentifyEvaluation, Path, DevResults]


def _cache_from_dev_results(dev_results: DevResults, dev_faces: Path, settings: Settings) -> EmbeddingCache:
    manifest = load_manifest(settings.models_dir, verify=False)
    cache = EmbeddingCache(pipeline_signature(manifest.model_version, settings.detector))
    largest = dev_results.largest("ours")
    for name in dev_results.photos:
        value = (
            Embedded(largest[name].astype(np.float32))
            if name in largest
            else Embedded(np.full(128, np.nan, np.float32), "no_face")
        )
        cache.put(name, dev_faces / name, value)
    return cache


@pytest.fixture(scope="module")
def dev_eval(
    dev_results: DevResults, dev_faces: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> DevEval:
    """run_identify_eval on dev with dev_results' embeddings as its cache: (result, out folder, dev_results)."""
    settings = Settings(models_dir=models_dir, runtime=RuntimeSettings(providers=[Provider.CPU]))
    out = tmp_path_factory.mktemp("eval-identify-dev")
    cache = _cache_from_dev_results(dev_results, dev_faces, settings)
    return run_identify_eval(dev_faces, settings=settings, out_dir=out, cache=cache), out, dev_results


@pytest.mark.model
@pytest.mark.slow
class TestDev:
    def test_protocol_counts_and_missing_faces(self, dev_eval: DevEval) -> None:
        result, _, dev_results = dev_eval
        r = result.report
        no_face = {name for name, photo in dev_results.photos.items() if not photo.ours_boxes}
        assert result.n_people == 53
        assert r.n_enrolled == 27  # every dev person has a face found in some photo
        assert set(result.missing_photos) == no_face and set(result.missing_photos.values()) == {"no_face"}
        assert r.n_enrolled + r.n_probes + r.n_strangers + len(result.missing_photos) == result.n_photos
        assert 200 <= r.n_probes <= 220 and 225 <= r.n_strangers <= 240  # measured 214 / 233

    def test_lfw_calibrated_default_keeps_fpir_on_dev(self, dev_eval: DevEval) -> None:
        r = dev_eval[0].report
        p = r.default_point
        assert p["gallery_size"] == 27 and p["target_fpir"] == 0.01
        assert p["fpir"] <= 0.03  # issue 9: calibrated on lfw-dev, <= 3 % on dev (measured 0 %)
        assert r.raw_threshold_point["fpir"] >= 0.05  # the raw rule at 0.36 lets many more in (measured 11.6 %)
        assert p["dir"] >= 0.5  # and it is not done by refusing everybody (measured 60.3 %)

    def test_facegate_rule_not_behind_raw_at_fpir_1_percent(self, dev_eval: DevEval) -> None:
        table = dev_eval[0].report.dir_at_fpir
        # Measured: a tie (71.0 % each). 2 points = 4 probes of slack for a stranger more or less at the cut.
        assert table["facegate"]["0.01"] >= table["raw"]["0.01"] - 0.02
        assert table["facegate"]["0.01"] >= 0.6

    def test_report_files(self, dev_eval: DevEval) -> None:
        result, out, _ = dev_eval
        assert result.files == (out / REPORT_JSON, out / REPORT_PNG)
        data = json.loads((out / REPORT_JSON).read_text())
        assert data["n_missing"] == len(result.missing_photos)
        assert data["dir_at_fpir"]["facegate"]["0.01"] == result.report.dir_at_fpir["facegate"]["0.01"]
        assert set(data["curves"]) == {"raw", "ratio", "facegate"}
        assert (out / REPORT_PNG).read_bytes()[:8] == PNG_MAGIC

    def test_table(self, dev_eval: DevEval) -> None:
        result = dev_eval[0]
        text = format_identify_table(result)
        lines = text.splitlines()
        header = next(line for line in lines if line.startswith("rule"))
        assert all(f"FPIR {p} %" in header for p in (1, 5, 10))
        facegate = next(line for line in lines if line.startswith("facegate "))
        dir1 = result.report.dir_at_fpir["facegate"]["0.01"]
        assert f"{100 * dir1:.1f} % / {100 * (1 - dir1):.1f} %" in facegate
        assert any(line.startswith("raw distance") for line in lines)
        assert any(line.startswith("ratio") for line in lines)
        r = result.report
        assert f"({round(r.default_point['fpir'] * r.n_strangers)}/{r.n_strangers};" in text  # strangers accepted


def _small_folder(lfw_faces: Path, root: Path, people: int = 6) -> Path:
    """`people` lfw-dev people with >= 2 photos (sorted names, symlinked), and a blank photo in the first folder."""
    chosen = 0
    for person in sorted(p for p in lfw_faces.iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) < 2:
            continue
        (root / person.name).mkdir(parents=True)
        for photo in photos[:3]:
            (root / person.name / photo.name).symlink_to(photo)
        if chosen == 0:
            PILImage.new("RGB", (200, 200), (128, 128, 128)).save(root / person.name / "zz_blank\x1b[2J.png")  # printed escaped
        chosen += 1
        if chosen == people:
            return root
    raise AssertionError("lfw-dev has too few people with two photos")


@pytest.mark.model
@pytest.mark.slow
def test_real_embedding_path_and_cache(lfw_faces: Path, settings: Settings, tmp_path: Path) -> None:
    images = _small_folder(lfw_faces, tmp_path / "people")
    cache = tmp_path / "embeddings.npz"
    first = run_identify_eval(images, settings=settings, cache=cache)
    blank = next(p for p in person_photos(images) if p.endswith("zz_blank\x1b[2J.png"))
    assert first.missing_photos == {blank: "no_face"}
    assert first.n_people == 6 and first.report.n_enrolled == 3 and first.files == ()
    r = first.report
    assert r.n_enrolled + r.n_probes + r.n_strangers + 1 == first.n_photos
    assert cache.is_file()
    stored = EmbeddingCache.load(cache, pipeline_signature(first.model_version, settings.detector))
    assert set(stored.entries) == set(person_photos(images))
    again = run_identify_eval(images, settings=settings, cache=cache)
    assert again.to_dict() == first.to_dict()


def test_folder_without_people_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loose.jpg").write_bytes(b"not read")
    with pytest.raises(InvalidRequest):
        run_identify_eval(tmp_path, settings=Settings())
    with pytest.raises(InvalidRequest):
        run_identify_eval(tmp_path / "absent", settings=Settings())


@pytest.mark.model
@pytest.mark.slow
def test_cli_prints_the_table_and_writes_the_report(
    lfw_faces: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    images = _small_folder(lfw_faces, tmp_path / "people")
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["eval-identify", "--images", str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for row in ("raw distance d1", "ratio d1/d2", "facegate", "FPIR 1 %", "FPIR 5 %", "FPIR 10 %"):
        assert row in result.stdout
    assert "no face:" in result.stdout and "zz_blank\\x1b[2J.png (no_face)" in result.stdout
    assert "\x1b" not in result.stdout
    report = json.loads((out / "eval-identify.json").read_text())
    assert report["n_missing"] == 1
    assert (out / "eval-identify.png").stat().st_size > 0

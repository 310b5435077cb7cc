"""`facegate eval`, `facegate calibrate` and `facegate cluster` on a small set of real dev photos.

The set: 4 photos each of three TV characters (150 x 150 crops, fast) plus one photo with no face, linked into a
temporary folder-per-person tree; pairs: every pair of the 13 photos (18 same, 60 different; 12 pairs involve the
photo without a face). Settings come from the environment, as in production.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app import evaluate as evaluation
from app.cli import cli
from app.cli import evaluation as evaluation_cli
from app.cli.common import Unusable
from app.errors import InvalidRequest

pytestmark = pytest.mark.model

PEOPLE = ("amy", "raj", "sheldon")
BLANK = "nobody/blank\x1b[2J.png"  # a terminal escape in its name: printed escaped, stored as it is
SHOWN_BLANK = "nobody/blank\\x1b[2J.png"
# 160 x 160 px, upsampled once: the detector's 80 px window is 40 px of the photo
BLANK_MESSAGE = (
    "no face was found in the photo (faces smaller than about 40 px across are too small for the detector at this "
    "photo's size)"
)


@pytest.fixture
def env(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "cli.db"
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    return db


@pytest.fixture
def photos(dev_faces: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(images folder, pairs.csv)."""
    root = tmp_path / "images"
    names = []
    for person in PEOPLE:
        (root / person).mkdir(parents=True)
        for i in range(1, 5):
            name = f"face-api__{person}{i}.png"
            (root / person / name).symlink_to(dev_faces / f"bbt_{person}" / name)
            names.append(f"{person}/{name}")
    (root / "nobody").mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.full((160, 160, 3), 90, np.uint8)).save(buffer, format="PNG")
    (root / BLANK).write_bytes(buffer.getvalue())
    names.append(BLANK)
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_a", "img_b", "same"])
        for a, b in itertools.combinations(names, 2):
            writer.writerow([a, b, int(a.split("/")[0] == b.split("/")[0])])
    return root, pairs


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout


def test_eval_prints_the_table_and_writes_json_and_png(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    images, pairs = photos
    out = tmp_path / "report"
    cache = tmp_path / "embeddings.npz"
    args = ["eval", "--pairs", str(pairs), "--images", str(images), "--out", str(out), "--cache", str(cache)]
    code, text = run(*args)
    assert code == 0, text
    for row in ("AUC", "EER", "accuracy at 0.36", "10-fold accuracy", "VAL @ FAR 0.001", "VAL @ FAR 0.01"):
        assert row in text, text
    assert "pairs             78 (18 same, 60 different)" in text
    assert "missing faces     1 of 13 photos; 12 pairs left out (0 same, 12 different)" in text
    assert f"no face: {SHOWN_BLANK} (no_face)" in text and "\x1b" not in text

    report = json.loads((out / "eval.json").read_text())
    assert report["n_pairs"] == 78 and report["n_missing"] == 12 and report["missing_photos"] == {BLANK: "no_face"}
    # Three well-separated people (same 0.10-0.28, different above 0.45): every found pair is decided right.
    assert report["auc"] == 1.0 and report["at_threshold"]["accuracy"] == 1.0
    assert report["kfold"]["n_folds"] == 10 and len(report["kfold"]["accuracies"]) == 10
    assert [v["target_far"] for v in report["val_at_far"]] == [0.001, 0.01]
    assert sum(report["histograms"]["same_counts"]) == 18 and sum(report["histograms"]["different_counts"]) == 48
    with Image.open(out / "eval.png") as png:
        assert png.format == "PNG" and png.size[0] > 800
    labelled = json.loads((out / "eval-distances.json").read_text())  # the pairs part of a /calibrate body
    assert (len(labelled["same"]), len(labelled["different"])) == (18, 48)
    assert max(labelled["same"]) < 0.3 < 0.45 < min(labelled["different"])

    # The cache holds every photo; a second run reads it instead of embedding again. Proof: plant a wrong entry
    # (amy1 marked as faceless) and see it reported although the photo did not change.
    with np.load(cache) as data:
        stored = {k: data[k] for k in data.files}
    assert sorted(stored["paths"].tolist()) == sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    assert stored["errors"].tolist().count("no_face") == 1
    row = stored["paths"].tolist().index("amy/face-api__amy1.png")
    stored["errors"][row] = "no_face"
    stored["embeddings"][row] = np.nan
    np.savez_compressed(cache, **stored)
    code, text = run(*args, "--json")
    assert code == 0, text
    again = json.loads(text)
    assert again["missing_photos"] == {BLANK: "no_face", "amy/face-api__amy1.png": "no_face"}
    assert again["n_missing"] == 12 + 11  # amy1 pairs with the 11 other found photos (its pair with BLANK counted once)


def test_eval_refuses_a_malformed_pairs_file(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    images, _ = photos
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    result = CliRunner().invoke(cli, ["eval", "--pairs", str(bad), "--images", str(images)])
    assert result.exit_code == 2 and "img_a, img_b and same" in result.output


def test_too_few_pairs_are_refused_before_any_photo_is_embedded(
    env: Path, photos: tuple[Path, Path], tmp_path: Path
) -> None:
    """10-fold accuracy needs 10 same and 10 different pairs: a file with fewer was refused only after every photo
    was embedded (minutes for a large set). Calibrating needs one of each."""
    images, pairs = photos
    rows = pairs.read_text().splitlines()
    header, same = rows[0], [r for r in rows[1:] if r.endswith(",1")]
    different = [r for r in rows[1:] if r.endswith(",0")]
    few = tmp_path / "few.csv"
    few.write_text("\n".join([header, *same[:9], *different]) + "\n")
    cache, out = tmp_path / "cache.npz", tmp_path / "report"
    result = CliRunner().invoke(
        cli, ["eval", "--pairs", str(few), "--images", str(images), "--out", str(out), "--cache", str(cache)]
    )
    assert result.exit_code == 2, result.output
    assert "9 same and 60 different pairs: at least 10 of each" in result.output
    assert not cache.exists() and not out.exists()  # nothing embedded, nothing written
    only_same = tmp_path / "same.csv"
    only_same.write_text("\n".join([header, *same]) + "\n")
    result = CliRunner().invoke(
        cli, ["calibrate", "--pairs", str(only_same), "--images", str(images), "--far", "0.05", "--cache", str(cache)]
    )
    assert result.exit_code == 2 and "18 same and 0 different pairs: at least 1 of each" in result.output
    assert not cache.exists()


def test_an_images_folder_without_the_pairs_photos_is_named_as_the_problem(
    env: Path, photos: tuple[Path, Path], tmp_path: Path
) -> None:
    """The wrong --images (the README's relative `../shared/faces/dev` from another folder) made every photo
    `unreadable`, and eval ended with "need at least one same pair and one different pair with both faces found", as
    if the detector had found no face. It is refused before anything is embedded, naming --images."""
    _, pairs = photos
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    cache = tmp_path / "cache.npz"
    for command in (["eval", "--out", str(tmp_path / "report")], ["calibrate", "--far", "0.05"]):
        result = CliRunner().invoke(
            cli, [*command, "--pairs", str(pairs), "--images", str(wrong), "--cache", str(cache)]
        )
        assert result.exit_code == 2, result.output
        assert "none of the 13 photos the pairs file names is under --images" in result.output
        assert "--images is the folder the pairs' paths are relative to" in result.output
        assert "both faces found" not in result.output
    assert not cache.exists() and not (tmp_path / "report").exists()


def test_pairs_saved_by_a_spreadsheet_are_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark and ends lines with CRLF: the header was refused ("missing
    img_a"). A header in capitals or with spaces after the commas is read too; a missing column is still named."""
    saved = tmp_path / "pairs.csv"
    saved.write_bytes("\ufeffIMG_A, img_b ,Same\r\nann/1.jpg,ann/2.jpg,TRUE\r\nann/1.jpg,bob/1.jpg,0\r\n".encode())
    assert evaluation.read_pairs(saved) == [
        evaluation.Pair("ann/1.jpg", "ann/2.jpg", True),
        evaluation.Pair("ann/1.jpg", "bob/1.jpg", False),
    ]
    saved.write_bytes("\ufeffimg_a,img_b\r\nann/1.jpg,ann/2.jpg\r\n".encode())
    with pytest.raises(InvalidRequest, match=r"missing same\)"):
        evaluation.read_pairs(saved)


def test_a_pairs_file_with_a_nul_in_a_path_is_refused_naming_the_line(env: Path, tmp_path: Path) -> None:
    """No file name holds a NUL (a damaged file, or one saved as UTF-16): opening the photo raised ValueError
    ("embedded null byte") and `eval` / `calibrate` ended with a traceback, after embedding the photos before it."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("img_a,img_b,same\nann/1.jpg,ann/2.jpg,1\nann/1.jpg,bob/\x001.jpg,0\n")
    with pytest.raises(InvalidRequest, match="line 3: a photo path holds a NUL character"):
        evaluation.read_pairs(pairs)
    result = CliRunner().invoke(cli, ["calibrate", "--pairs", str(pairs), "--images", str(tmp_path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "line 3: a photo path holds a NUL character" in result.stderr


def test_a_cache_that_is_no_npz_is_not_overwritten(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    """`--cache` is rewritten at the end of a run: a mistyped `--cache pairs.csv` must not destroy the pairs."""
    images, pairs = photos
    kept = tmp_path / "pairs-copy.csv"
    kept.write_bytes(pairs.read_bytes())
    for command in ("eval", "calibrate"):
        result = CliRunner().invoke(cli, [command, "--pairs", str(pairs), "--images", str(images), "--cache", str(kept)])
        assert result.exit_code == 2 and "is not an embedding cache (.npz)" in result.output, result.output
    assert kept.read_bytes() == pairs.read_bytes()
    empty = tmp_path / "new.npz"
    empty.write_bytes(b"")  # e.g. made by `touch`: a cache is written there
    out = tmp_path / "report"  # not ./facegate-eval, in the folder the tests run from
    code, text = run("eval", "--pairs", str(pairs), "--images", str(images), "--cache", str(empty), "--out", str(out))
    assert code == 0, text
    assert empty.read_bytes()[:4] == b"PK\x03\x04"


def test_an_out_or_cache_folder_that_cannot_be_made_is_refused_before_embedding(
    env: Path, photos: tuple[Path, Path], tmp_path: Path
) -> None:
    """--out and --cache were first written after every photo was embedded: a parent that is a file (or no
    permission) ended a long run there with a traceback, the embeddings lost."""
    images, pairs = photos
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    blocked = str(in_the_way / "sub")
    commands = [
        ["eval", "--pairs", str(pairs), "--images", str(images), "--out", blocked],
        ["eval-identify", "--images", str(images), "--out", blocked],
        ["eval", "--pairs", str(pairs), "--images", str(images), "--cache", blocked + "/emb.npz"],
        ["calibrate", "--pairs", str(pairs), "--images", str(images), "--cache", blocked + "/emb.npz"],
    ]
    for args in commands:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert "Not a directory" in result.output and "Embedding" not in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_calibrate_prints_the_threshold_and_apply_stores_it(
    env: Path, photos: tuple[Path, Path], dev_faces: Path
) -> None:
    images, pairs = photos
    cache = env.parent / "calibrate-cache.npz"  # the second run embeds nothing
    args = ["calibrate", "--pairs", str(pairs), "--images", str(images), "--far", "0.05", "--cache", str(cache)]
    code, text = run(*args, "--json")
    assert code == 0, text
    result = json.loads(text)
    # 48 different pairs found: FAR 0.05 allows floor(2.4) = 2 false accepts, so the threshold sits just under the
    # third-nearest different pair; all 18 same pairs (0.10-0.28) are accepted.
    assert result["n_different"] == 48 and result["n_same"] == 18
    assert result["false_accepts"] == 2 and result["far"] == pytest.approx(2 / 48)
    assert result["val"] == 1.0 and result["applied"] is False
    assert result["missing_photos"] == [BLANK] and result["n_missing_pairs"] == 12
    assert not env.exists()  # without --apply no database is touched

    # Stored only into an existing gallery: a mistyped FACEGATE_DATABASE_URL created an empty one and stored it there.
    refused = CliRunner().invoke(cli, [*args, "--apply"])
    assert refused.exit_code == 2 and f"the SQLite database {env} (FACEGATE_DATABASE_URL) does not exist" in refused.stderr
    assert not env.exists()
    assert run("db", "upgrade")[0] == 0
    code, text = run(*args, "--apply")
    assert code == 0, text
    assert f"threshold {result['threshold']:.4f} for target FAR 0.05" in text
    assert "stored as the deployment threshold." in text
    code, text = run(
        "verify", "--json", str(dev_faces / "bbt_amy/face-api__amy1.png"), str(dev_faces / "bbt_raj/face-api__raj1.png")
    )
    decision = json.loads(text)
    assert decision["threshold_source"] == "deployment"
    assert decision["threshold"] == pytest.approx(result["threshold"])


def test_calibrate_refuses_a_threshold_that_decides_nothing(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    """A "different" pair at distance 0 (a photo paired with itself) leaves no threshold above 0 within the target:
    without --apply the command printed `threshold -0.0000` (JSON -5e-324) and exit 0, where --apply and
    POST /calibrate refuse it."""
    images, _ = photos
    pairs = tmp_path / "zero.csv"
    amy = "amy/face-api__amy1.png"
    pairs.write_text(f"img_a,img_b,same\n{amy},{amy},0\n{amy},amy/face-api__amy2.png,1\n")
    assert run("db", "upgrade")[0] == 0  # --apply stores into an existing gallery only
    for extra in ([], ["--json"], ["--apply"]):
        result = CliRunner().invoke(cli, ["calibrate", "--pairs", str(pairs), "--images", str(images), "--far", "0.4", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert "insufficient_data: no threshold above 0 keeps the FAR at or below 0.4" in result.stderr, extra
        assert "threshold" not in result.stdout, extra


def test_eval_identify_decides_at_the_threshold_identify_uses(
    env: Path, photos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default point is the rule as /identify applies it, so its distance cap is the 1:1 threshold /identify
    uses: a head's own threshold when one is served (as `eval` and POST /evaluate/identify), not always
    FACEGATE_THRESHOLD. Here the served threshold is stood in for: a head needs a trained model."""
    images, _ = photos
    monkeypatch.setattr(evaluation_cli, "default_threshold", lambda settings, pipeline: 0.2)
    code, text = run("eval-identify", "--images", str(images), "--out", str(tmp_path / "out"), "--json")
    assert code == 0, text
    assert json.loads(text)["default_point"]["max_distance"] == 0.2


def test_a_person_removed_from_the_folder_leaves_the_cache(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    """A --cache file holds embeddings, which identify people: one whose photos were deleted from the folder stayed in
    it (with their name, the folder's) however often it was rewritten."""
    images, pairs = photos
    cache = tmp_path / "emb.npz"
    args = ["calibrate", "--pairs", str(pairs), "--images", str(images), "--far", "0.05", "--cache", str(cache)]
    assert run(*args)[0] == 0
    with np.load(cache) as data:
        raj = [i for i, p in enumerate(data["paths"].tolist()) if p.startswith("raj/")]
        raj_bytes = [data["embeddings"][i].tobytes() for i in raj]
    assert len(raj) == 4
    shutil.rmtree(images / "raj")
    assert run(*args)[0] == 0
    with np.load(cache) as data:
        paths = data["paths"].tolist()
        assert not [p for p in paths if p.startswith("raj/")] and len(paths) == 9  # amy, sheldon and the blank
    with np.load(cache) as data:
        assert not any(b == e.tobytes() for b in raj_bytes for e in data["embeddings"])


def test_cluster_a_folder(env: Path, photos: tuple[Path, Path]) -> None:
    images, _ = photos
    code, text = run("cluster", str(images), "--json")
    assert code == 0, text
    body = json.loads(text)
    assert body["n_photos"] == 13 and body["n_faces"] == 12 and body["sizes"] == [4, 4, 4]
    for members in body["clusters"]:
        assert len({m["photo"].split("/")[0] for m in members}) == 1
    assert body["unclustered"] == []
    assert body["problems"] == [{"photo": BLANK, "code": "no_face", "message": BLANK_MESSAGE}]

    code, text = run("cluster", str(images))
    assert code == 0, text
    assert text.startswith("13 photos, 12 faces: 3 clusters, 0 unclustered faces, 1 photos without a face")
    assert "cluster 1: 4 faces" in text and f"{SHOWN_BLANK}: no_face" in text


def test_commands_stop_their_inference_threads(env: Path, photos: tuple[Path, Path], tmp_path: Path) -> None:
    """Every command that embeds photos stops the micro-batcher's threads before it returns, as it would on Ctrl-C:
    left inside an ONNX Runtime call while the interpreter exits, they aborted the process ('terminate called
    without an active exception', SIGABRT) instead of exit status 130."""
    images, pairs = photos

    def started_and_alive(*args: str) -> list[str]:
        before = set(threading.enumerate())
        code, text = run(*args)
        assert code == 0, text
        return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]

    assert started_and_alive("cluster", str(images)) == []
    assert started_and_alive("eval", "--pairs", str(pairs), "--images", str(images), "--out", str(tmp_path / "r")) == []
    assert started_and_alive("calibrate", "--pairs", str(pairs), "--images", str(images), "--far", "0.05") == []


def test_cluster_follows_linked_folders_once(tmp_path: Path) -> None:
    """As `enroll DIR` does: a folder of links to each person's photo folder is clustered, not "no photos"; a link
    back up is walked once; hidden names and other files are left out."""
    from app.cli.cluster import _photos_under

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "raj").mkdir(parents=True)
    (elsewhere / "raj" / "1.png").write_bytes(b"")
    top = tmp_path / "top"
    (top / "amy").mkdir(parents=True)
    (top / ".trash").mkdir()
    for name in ("amy/1.jpg", "amy/.2.jpg", "amy/notes.txt", ".trash/3.jpg"):
        (top / name).write_bytes(b"")
    (top / "raj").symlink_to(elsewhere / "raj")
    (top / "amy" / "up").symlink_to(top)  # a cycle
    unreadable: list[Unusable] = []
    assert [p.relative_to(top).as_posix() for p in _photos_under(top, unreadable)] == ["amy/1.jpg", "raj/1.png"]
    assert unreadable == []


def test_cluster_lists_a_folder_it_cannot_read(
    env: Path, photos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sub-folder without read permission (simulated: the tests may run as root) was skipped without a word, its
    photos missing from the clusters; it is listed as enroll lists one. DIRECTORY itself: one error line."""
    images, _ = photos
    (images / "locked").mkdir()
    (images / "locked" / "1.png").symlink_to(images / "amy" / "face-api__amy1.png")
    listing = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path).name in ("locked", "locked-top"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, text = run("cluster", str(images))
    assert code == 0, text
    assert text.startswith("13 photos, 12 faces: 3 clusters, 0 unclustered faces, 1 photos without a face, 1 folders "
                           "unreadable (threshold 0.25)"), text  # fmt: skip
    assert text.endswith(f"  {SHOWN_BLANK}: no_face: {BLANK_MESSAGE}\n"
                         "  locked: unreadable: cannot read the folder: Permission denied\n"), text  # fmt: skip
    code, text = run("cluster", str(images), "--json")
    assert json.loads(text)["unreadable_folders"] == [
        {"folder": "locked", "code": "unreadable", "message": "cannot read the folder: Permission denied"}
    ]
    (tmp_path / "locked-top").mkdir()
    result = CliRunner().invoke(cli, ["cluster", str(tmp_path / "locked-top")])
    assert result.exit_code == 2 and result.stderr == f"error: cannot read {tmp_path / 'locked-top'}: Permission denied\n"


def test_eval_identify_refuses_a_person_folder_it_cannot_read(
    env: Path, photos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person's folder without read permission (simulated: the tests may run as root) ended eval-identify with a
    PermissionError traceback; leaving the person out would change the split, so it is refused, naming the folder.
    `facegate train` lists the people the same way."""
    images, _ = photos
    listing = os.listdir

    def listdir(path: Any) -> Any:
        if Path(path).name == "raj":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "listdir", listdir)
    result = CliRunner().invoke(cli, ["eval-identify", "--images", str(images), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: cannot read the folder {images / 'raj'}: Permission denied\n"
    assert not (tmp_path / "out").exists()  # the --out folder it made for the report is taken back
    (tmp_path / "kept").mkdir()  # one that was there before stays
    result = CliRunner().invoke(cli, ["eval-identify", "--images", str(images), "--out", str(tmp_path / "kept")])
    assert result.exit_code == 2 and (tmp_path / "kept").is_dir(), result.output
    from app.training.data import folder_photos

    with pytest.raises(InvalidRequest, match="cannot read the folder .*raj: Permission denied"):
        folder_photos(images)


def _on_listing(monkeypatch: pytest.MonkeyPatch, seen: Callable[[Path], None]) -> None:
    """`seen(folder)` before each listing of a folder, through os.listdir (Path.iterdir) and os.scandir (Path.rglob,
    os.walk) alike."""
    for function in ("listdir", "scandir"):
        real = getattr(os, function)

        def listing(*args: Any, real: Any = real) -> Any:
            if args and isinstance(args[0], (str, os.PathLike)):
                seen(Path(args[0]))
            return real(*args)

        monkeypatch.setattr(os, function, listing)


def _embedding_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the first photo is embedded: a test of what happens before it ends there."""
    from app import identify_eval
    from app.training import data

    def ctrl_c(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    for module in (identify_eval, data):
        monkeypatch.setattr(module, "embed_photos", ctrl_c)


def test_train_refuses_a_folder_inside_a_person_folder_it_cannot_read(
    env: Path, photos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train` takes the photos of the folders inside a person's folder too, but rglob skipped one it could not
    list without a word (the person trained on fewer photos), where a person's folder it could not list was
    refused. Refused alike now, before the models load."""
    from app.training.data import folder_photos

    images, _ = photos
    (images / "amy" / "2019").mkdir()
    (images / "amy" / "2019" / "old.png").write_bytes(b"")
    assert "amy/2019/old.png" in folder_photos(images)

    def locked(folder: Path) -> None:  # no read permission, simulated: the tests may run as root
        if folder.name == "2019":
            raise PermissionError(13, "Permission denied", str(folder))

    _on_listing(monkeypatch, locked)
    _embedding_interrupted(monkeypatch)  # were it not refused, the command ends there, not after training
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))
    result = CliRunner().invoke(cli, ["train", "--images", str(images)])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: invalid_request: cannot read the folder {images / 'amy' / '2019'}: Permission " \
        "denied\n"  # fmt: skip


def test_train_and_eval_identify_list_each_folder_once(
    env: Path, photos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both commands listed the people and their photos once to size the progress bar and again to embed them;
    train listed each person's folder twice more each time (to check that it could be read, then through rglob)."""
    images, _ = photos
    listed: list[Path] = []
    _on_listing(monkeypatch, listed.append)
    _embedding_interrupted(monkeypatch)
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))
    folders = sorted([images, *(images / person for person in (*PEOPLE, "nobody"))])
    for args in (["eval-identify", "--out", str(tmp_path / "out")], ["train"]):
        listed.clear()
        result = CliRunner().invoke(cli, [*args, "--images", str(images)])
        assert result.exit_code == 130, result.output
        assert sorted(p for p in listed if p == images or images in p.parents) == folders, args


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["eval", "--out", "out"], "no report was written; the photos embedded so far are kept in embeddings.npz"),
        (["calibrate", "--apply"], "no threshold was computed or stored; the photos embedded so far are kept in "
                                   "embeddings.npz"),  # fmt: skip
        (["eval-identify", "--out", "out"], "no report was written; the photos embedded so far are kept in "
                                            "embeddings.npz"),  # fmt: skip
        (["cluster"], "nothing was written (cluster only prints)"),
    ],
)
def test_ctrl_c_says_nothing_was_written(
    env: Path,
    photos: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    said: str,
) -> None:
    """Ctrl-C while the photos are embedded ended these commands silently (exit status 130): one line now says that
    nothing was written, and where the embeddings done so far are kept."""
    from app import evaluate, identify_eval
    from app.cli import cluster as cluster_cli

    images, pairs = photos
    monkeypatch.chdir(tmp_path)
    if command == ["calibrate", "--apply"]:
        assert run("db", "upgrade")[0] == 0  # --apply needs an existing gallery

    def ctrl_c(*args: Any, **kwargs: Any) -> Any:  # where a SIGINT lands: in the middle of the embedding
        raise KeyboardInterrupt

    for module, name in ((evaluate, "embed_photos"), (identify_eval, "embed_photos"), (cluster_cli, "cluster_files")):
        monkeypatch.setattr(module, name, ctrl_c)
    if command[0] == "cluster":
        args = [*command, str(images)]
    elif command[0] == "eval-identify":
        args = [*command, "--images", str(images), "--cache", "embeddings.npz"]
    else:
        args = [*command, "--pairs", str(pairs), "--images", str(images), "--cache", "embeddings.npz"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == f"interrupted: {said}"
    assert not (tmp_path / "out" / "eval.json").exists() and not (tmp_path / "out" / "eval-identify.json").exists()


def test_folder_commands_pick_up_heic_photos_only_when_they_are_decoded(tmp_path: Path) -> None:
    """With FACEGATE_IMAGE__HEIC on, `enroll DIR`, `cluster`, `eval-identify` and `train` list HEIC/HEIF files (an
    iPhone names them IMG_0001.HEIC; .hif: Canon, Fujifilm); off, they are left out as before."""
    from app.cli.cluster import _photos_under
    from app.cli.common import PhotoSelection
    from app.cli.people import _people
    from app.identify_eval import person_photos
    from app.training.data import folder_photos

    for name in ("amy/1.jpg", "amy/IMG_0001.HEIC", "amy/2.heif", "amy/3.hif", "raj/1.heic"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    every = ["amy/1.jpg", "amy/2.heif", "amy/3.hif", "amy/IMG_0001.HEIC", "raj/1.heic"]
    assert person_photos(tmp_path) == folder_photos(tmp_path) == ["amy/1.jpg"]
    assert person_photos(tmp_path, heic=True) == folder_photos(tmp_path, heic=True) == every
    for heic, expected in ((False, ["amy/1.jpg"]), (True, every)):
        assert [p.relative_to(tmp_path).as_posix() for p in _photos_under(tmp_path, [], heic=heic)] == expected
        people = _people(tmp_path, PhotoSelection.all, [], heic=heic)
        assert [f"{person}/{photo.name}" for person, photos in people for photo in photos] == expected


def test_folder_commands_leave_hidden_files_and_folders_out(tmp_path: Path) -> None:
    """A folder copied from a Mac holds "._1.jpg" (AppleDouble metadata, not a photo) beside each photo. `enroll DIR`
    and `train` took them (enroll reported each as a failed photo; train counted them as the person's photos with
    no face), where `cluster` and `eval-identify` left hidden names out."""
    from app.cli.cluster import _photos_under
    from app.cli.common import PhotoSelection
    from app.cli.people import _people
    from app.identify_eval import person_photos
    from app.training.data import folder_photos

    for name in ("amy/1.jpg", "amy/._1.jpg", "amy/.thumbnails/1.jpg", ".trash/bob/1.jpg", "raj/1.png", "raj/._1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = ["amy/1.jpg", "raj/1.png"]
    assert person_photos(tmp_path) == folder_photos(tmp_path) == expected
    assert [p.relative_to(tmp_path).as_posix() for p in _photos_under(tmp_path, [])] == expected
    people = _people(tmp_path, PhotoSelection.all, [])
    assert [f"{person}/{photo.name}" for person, photos in people for photo in photos] == expected


@pytest.mark.parametrize("name", [os.fsdecode(b"caf\xe9"), "run_$5_$"], ids=["not-utf8", "dollar-signs"])
def test_reports_are_drawn_for_any_file_name(env: Path, photos: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    """A pairs file or images folder named in another encoding (caf\xe9 in Latin-1: a byte that is not UTF-8 reaches
    Python as a lone surrogate), or with two `$` (matplotlib reads what lies between as TeX), ended `eval` and
    `eval-identify` with a matplotlib traceback once every photo was embedded, the PNG unwritten. The title shows
    the name as the commands print it."""
    images, pairs = photos
    renamed_pairs = pairs.with_name(f"{name}.csv")
    pairs.rename(renamed_pairs)
    renamed_images = images.with_name(name)
    images.rename(renamed_images)
    out = tmp_path / "out"
    code, text = run("eval", "--pairs", str(renamed_pairs), "--images", str(renamed_images), "--out", str(out))
    assert code == 0 and "10-fold accuracy" in text, text
    code, text = run("eval-identify", "--images", str(renamed_images), "--out", str(out))
    assert code == 0 and "rank-1" in text, text
    for png in ("eval.png", "eval-identify.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG", png

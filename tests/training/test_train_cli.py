"""`facegate train --images DIR`: the dev photos' embeddings come from a cache written from the shared
`dev_results` (so nothing is embedded again), training runs, and the head is registered where the service finds it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.evaluate import Embedded, EmbeddingCache, pipeline_signature
from app.vision.head import read_head_manifest
from app.vision.models import load_manifest
from tests.dev_embeddings import DevResults

pytestmark = pytest.mark.model


def test_train_command_registers_a_head(
    dev_results: DevResults, dev_faces: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_version = load_manifest(models_dir, verify=False).model_version
    cache = EmbeddingCache(pipeline_signature(base_version, Settings().detector))
    largest = dev_results.largest("ours")
    for relative in dev_results.photos:
        found = largest.get(relative)
        value = Embedded(np.asarray(found, np.float32)) if found is not None else Embedded(
            np.full(128, np.nan, np.float32), "no_face"
        )
        cache.put(relative, dev_faces / relative, value)
    cache.save(tmp_path / "dev.npz")
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))

    args = ["train", "--images", str(dev_faces), "--cache", str(tmp_path / "dev.npz"), "--name", "dev-head"]
    result = CliRunner().invoke(cli, [*args, "--epochs", "3", "--p", "8", "--mining", "batch_hard", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "validation VAL@FAR 0.001: base" in result.output
    assert "FACEGATE_HEAD__NAME=dev-head" in result.output
    manifest = read_head_manifest(tmp_path / "heads" / "dev-head")
    assert manifest.base_model_version == base_version
    assert manifest.raw["training"]["mining"] == "batch_hard" and manifest.raw["training"]["seed"] == 1
    assert manifest.raw["validation"]["train_identities"] + manifest.raw["validation"]["val_identities"] >= 50
    assert json.loads((tmp_path / "heads" / "dev-head" / "head.json").read_text())["opset"] == 17

    bad = CliRunner().invoke(cli, [*args, "--loss", "nonsense"])
    assert bad.exit_code == 2 and "Invalid value for '--loss': 'nonsense' is not one of" in bad.output
    # Refused once the photos are read (too few training people left): no empty heads/<name>/ stays behind.
    other = ["train", "--images", str(dev_faces), "--cache", str(tmp_path / "dev.npz"), "--name", "other"]
    refused = CliRunner().invoke(cli, [*other, "--val-fraction", "0.99"])
    assert refused.exit_code != 0 and "too few for a train/validation split" in refused.output, refused.output
    assert not (tmp_path / "heads" / "other").exists() and (tmp_path / "heads" / "dev-head").is_dir()


def test_train_refuses_a_heads_folder_or_name_it_cannot_use_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heads folder that could not be made ended the run after embedding and training, with a traceback. Refused
    first: the models folder here does not exist, so nothing was loaded."""
    (tmp_path / "people" / "a").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "a-file" / "heads"))
    args = ["train", "--images", str(tmp_path / "people")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: cannot create the head's folder {tmp_path / 'a-file' / 'heads' / 'head'}: Not a directory\n"
    bad = CliRunner().invoke(cli, [*args, "--name", "../elsewhere"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --name: a head name is 1-64 letters"), bad.stderr


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--margin", "inf", "inf is not in the range 0<=x<=4"),
        ("--margin", "nan", "nan is not in the range 0<=x<=4"),
        ("--margin", "4.5", "4.5 is not in the range 0<=x<=4"),
        ("--contrastive-margin", "0", "0 is not in the range 0<x<=2"),
        ("--contrastive-margin", "1e309", "inf is not in the range 0<x<=2"),
        ("--center-weight", "nan", "nan is not in the range 0<=x<=100"),
        ("--center-weight", "-1", "-1 is not in the range 0<=x<=100"),
        ("--lr", "1e9", "1e+09 is not in the range 0<x<=0.1"),
        ("--lr", "nan", "nan is not in the range 0<x<=0.1"),
        ("--lr", "0", "0 is not in the range 0<x<=0.1"),
        ("--val-fraction", "nan", "nan is not in the range 0.01<=x<=0.99"),
        ("--loss", "bogus", "'bogus' is not one of triplet, contrastive, none"),
        ("--mining", "hard", "'hard' is not one of semi_hard, batch_hard, batch_all"),
        ("--arch", "cnn", "'cnn' is not one of linear, mlp"),
        ("--loss", "none", "--loss none trains nothing without center loss: give --center-weight > 0"),
    ],
)
def test_a_float_option_outside_its_range_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, value: str, expected: str
) -> None:
    """Infinite and NaN margins, rates and weights were accepted (typer's min= lets inf through) and trained a
    head of NaNs, or refused NaN as 'greater than or equal to 0'. Refused while the arguments are read (the models
    folder here does not exist), naming the option and its range."""
    (tmp_path / "people" / "a").mkdir(parents=True)
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))
    result = CliRunner().invoke(cli, ["train", "--images", str(tmp_path / "people"), option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': {expected}" in " ".join(result.stderr.replace("│", " ").split())
    assert not (tmp_path / "heads").exists()


@pytest.mark.parametrize(("p", "k"), [("16", "2000"), ("1000", "4"), ("2", "257"), (str(10**30), "2")])
def test_a_batch_too_large_is_refused_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: str, k: str
) -> None:
    """--k 2000 was PyTorch's out-of-memory traceback ("you tried to allocate 204800000000 bytes") after every photo
    had been embedded. P x K is bounded; refused first (the models folder here does not exist), naming both options.
    The bound is the one the sampler enforces and the help states."""
    from app.training.sampler import MAX_BATCH_FACES, PKSampler

    (tmp_path / "people" / "a").mkdir(parents=True)
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(tmp_path / "no-models"))
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))
    result = CliRunner().invoke(cli, ["train", "--images", str(tmp_path / "people"), "--p", p, "--k", k])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.replace("│", " ").split())
    assert f"Invalid value for '--p' / '--k': a batch of P x K = {p} x {k} = {int(p) * int(k)} faces is over " \
        f"{MAX_BATCH_FACES}" in text, text  # fmt: skip
    with pytest.raises(ValueError, match="is over"):
        PKSampler(np.repeat(np.arange(4), 3), p=int(p), k=int(k))
    help_text = CliRunner().invoke(cli, ["train", "--help"], env={"COLUMNS": "200", "TERM": "dumb"}).output
    assert f"P x K is at most {MAX_BATCH_FACES} faces" in " ".join(help_text.replace("│", " ").split())


def test_a_failed_registration_leaves_the_previous_head_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph used to replace the old one before the manifest was written: a manifest write that failed (disk
    full) left a new head.onnx beside the old head.json, a head the service refuses."""
    from app.training import TrainConfig, register_head, split_identities, train_head
    from tests.training.conftest import synthetic_set

    train_set, val_set = split_identities(synthetic_set(), val_fraction=0.3, seed=0)
    result = train_head(train_set, val_set, TrainConfig(epochs=1, p=4, k=2))
    folder = register_head(result, name="h", heads_dir=tmp_path, base_model_version="base", opset=17)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if "head.json" in self.name:
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    import torch

    with torch.no_grad():  # another graph
        next(result.model.parameters()).mul_(0.5)
    with pytest.raises(OSError):
        register_head(result, name="h", heads_dir=tmp_path, base_model_version="base", opset=17)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_ctrl_c_says_whether_the_head_was_registered(
    dev_faces: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C ended train with a traceback or no word. One line now says what is left: while photos are embedded,
    no head and the embeddings so far kept in --cache; while the head trains, no head; while its files are written,
    the write ends first (a real SIGINT, held) and the head is registered whole."""
    import app.evaluate
    import app.training

    people = tmp_path / "people"
    for person in ("bbt_amy", "bbt_howard", "bbt_leonard", "bbt_penny", "bbt_raj"):
        (people / person).mkdir(parents=True)
        for n in (1, 2):
            (people / person / f"{n}.png").symlink_to(dev_faces / person / f"face-api__{person[4:]}{n}.png")
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("FACEGATE_HEAD__DIR", str(tmp_path / "heads"))
    cache = tmp_path / "people.npz"
    args = ["train", "--images", str(people), "--cache", str(cache), "--name", "h", "--epochs", "1", "--p", "4", "--k", "2"]

    embed_one = app.evaluate.embed_one
    embedded = 0

    def ctrl_c_on_the_fourth_photo(*a: Any) -> Any:  # raised where a SIGINT would land, between two photos
        nonlocal embedded
        embedded += 1
        if embedded == 4:
            raise KeyboardInterrupt
        return embed_one(*a)

    monkeypatch.setattr(app.evaluate, "embed_one", ctrl_c_on_the_fourth_photo)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: no head was registered (any head already named h is left as it was); the photos embedded so "
        f"far are kept in {cache}"
    )
    settings = Settings(models_dir=models_dir)
    signature = pipeline_signature(load_manifest(models_dir, verify=False).model_version, settings.detector)
    assert len(EmbeddingCache.load(cache, signature).entries) == 3
    monkeypatch.setattr(app.evaluate, "embed_one", embed_one)

    def ctrl_c_while_training(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    train_head = app.training.train_head
    monkeypatch.setattr(app.training, "train_head", ctrl_c_while_training)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1].startswith("interrupted: no head was registered")
    assert not (tmp_path / "heads" / "h" / "head.json").exists()
    monkeypatch.setattr(app.training, "train_head", train_head)

    register_head = app.training.register_head

    def ctrl_c_while_registering(*a: Any, **kw: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, arriving as the head's files are written
        return register_head(*a, **kw)

    monkeypatch.setattr(app.training, "register_head", ctrl_c_while_registering)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: the head was registered in {tmp_path / 'heads' / 'h'} (serve it with FACEGATE_HEAD__NAME=h)"
    )
    assert read_head_manifest(tmp_path / "heads" / "h").name == "h"

"""How much issue 9's figures depend on which people are enrolled: the eval-identify protocol over random splits.

    python -m bench.identify_splits --images ../shared/faces/lfw-dev [--cache lfw-dev.npz] [--splits 20] [--seed 0]

`facegate eval-identify` enrols the people at even positions of the name-sorted list: one fixed split. Here the
people are shuffled (seeded) before the same protocol, `--splits` times, on the same embeddings (largest face per
photo, as eval-identify; `--cache` reuses eval-identify's cache file). Per split and on average: the default
operating point's FPIR and DIR (the rule as /identify applies it at FACEGATE_IDENTIFY_FPIR, calibrated for the
split's gallery size) and DIR at FPIR 1 % for the raw, ratio and facegate rules. Writes
bench/results/identify_splits.json. Not part of `make bench` (it is about accuracy, not speed).

The shipped open-set model (app/matching/data/openset.json) was built from every lfw-dev photo, so on lfw-dev it
has seen every split's strangers: its default FPIR there is measured on its own calibration data. Each split
therefore builds the model again as models.calibration_tables does (leave-one-identity-out, `build_model`), from
the split's enrolled people only (their photos against each other's first photos), and measures the default point
on strangers the model never saw. `--shipped-model` uses the shipped model instead (in-sample on lfw-dev).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Provider, RuntimeSettings, Settings
from app.evaluate import EmbeddingCache, embed_photos, pipeline_signature
from app.identify_eval import person_photos
from app.matching.openset import OpenSetModel, build_model, leave_one_identity_out
from app.matching.openset_eval import Split, enrolment_split, evaluate_identification
from app.vision.pipeline import Pipeline
from bench.common import write
from models.calibration_tables import OPENSET_DRAWS


def embeddings(images: Path, cache: Path | None) -> tuple[list[str], np.ndarray]:
    """Photos with a face ("person/file") and their embeddings, as eval-identify computes them."""
    settings = Settings(runtime=RuntimeSettings(providers=[Provider.CPU]))
    pipeline = Pipeline.from_settings(settings)
    photos = person_photos(images)
    store = EmbeddingCache.load(cache, pipeline_signature(pipeline.model_version, settings.detector)) if cache else None
    try:
        embedded = embed_photos(pipeline, images, photos, cache=store)
    finally:
        if cache is not None and store is not None:
            store.save(cache)
    found = [p for p in photos if not embedded[p].error]
    return found, np.stack([embedded[p].embedding for p in found]).astype(np.float32)


def held_out_model(photos: list[str], emb: np.ndarray, ids: list[str], split: Split, draws: int) -> OpenSetModel:
    """The open-set model built from the split's enrolled people alone (gallery and probe photos), as the shipped one
    is built from all of lfw-dev: none of the split's strangers is in it."""
    rows = np.concatenate([split.gallery_rows, split.probe_rows])
    reference = leave_one_identity_out(emb[rows], [ids[r] for r in rows], [photos[r] for r in rows])
    return build_model(reference, draws=draws)


def run_split(
    photos: list[str], emb: np.ndarray, order: dict[str, int], settings: Settings, *, draws: int | None
) -> dict[str, Any]:
    """The protocol with people ranked by `order` instead of by name; the open-set model built from the split's
    enrolled people with `draws` simulated galleries per photo (None: the shipped model)."""
    ids = [f"{order[p.split('/', 1)[0]]:06d}" for p in photos]
    split = enrolment_split(ids, photos)
    report = evaluate_identification(
        emb[split.gallery_rows],
        split.gallery_ids,
        emb[split.probe_rows],
        split.probe_ids,
        emb[split.stranger_rows],
        model=None if draws is None else held_out_model(photos, emb, ids, split, draws),
        target_fpir=settings.identify_fpir,
        max_distance=settings.threshold,
        ambiguity_margin=settings.ambiguity_margin,
    )
    return {
        "n_enrolled": report.n_enrolled,
        "n_probes": report.n_probes,
        "n_strangers": report.n_strangers,
        "default_fpir": report.default_point["fpir"],
        "default_dir": report.default_point["dir"],
        "dir_at_fpir_1pct": {rule: table["0.01"] for rule, table in report.dir_at_fpir.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="one sub-folder of photos per person")
    parser.add_argument("--cache", type=Path, help="embeddings .npz (eval-identify's --cache format)")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shipped-model",
        action="store_true",
        help="the shipped open-set model, built on all of lfw-dev (in-sample there), instead of one per split",
    )
    parser.add_argument("--draws", type=int, default=OPENSET_DRAWS, help="simulated galleries per photo, per split")
    args = parser.parse_args(argv)
    draws = None if args.shipped_model else args.draws

    settings = Settings()
    photos, emb = embeddings(args.images, args.cache)
    people = sorted({p.split("/", 1)[0] for p in photos})
    rng = np.random.default_rng(args.seed)
    splits = []
    for k in range(args.splits):
        order = {people[j]: i for i, j in enumerate(rng.permutation(len(people)))}
        result = run_split(photos, emb, order, settings, draws=draws)
        splits.append(result)
        print(
            f"split {k:2d}: default FPIR {100 * result['default_fpir']:.2f} % (of {result['n_strangers']}), "
            f"DIR {100 * result['default_dir']:.1f} %; DIR at FPIR 1 %: "
            + ", ".join(f"{rule} {100 * v:.1f} %" for rule, v in result["dir_at_fpir_1pct"].items()),
            file=sys.stderr,
        )
    fpir = np.array([s["default_fpir"] for s in splits])
    summary = {
        "default_fpir_mean": float(fpir.mean()),
        "default_fpir_min": float(fpir.min()),
        "default_fpir_max": float(fpir.max()),
        "splits_with_fpir_in_0.5_2pct": int(np.sum((fpir >= 0.005) & (fpir <= 0.02))),
        "default_dir_mean": float(np.mean([s["default_dir"] for s in splits])),
        "dir_at_fpir_1pct_mean": {
            rule: float(np.mean([s["dir_at_fpir_1pct"][rule] for s in splits])) for rule in splits[0]["dir_at_fpir_1pct"]
        },
    }
    print(summary)
    model = "shipped" if draws is None else f"built per split from its enrolled people ({draws} draws)"
    write(
        "identify_splits",
        {"images": str(args.images), "openset_model": model, "splits": splits, "summary": summary, "seed": args.seed},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 8's report: does a trained head beat dlib's base embeddings on people it never saw?

    python -m bench.train_heads [--dev DIR] [--lfw DIR] [--cache-dir DIR] [--epochs 30]

1. Base embeddings of the dev set (53 people, hard photos) and lfw-dev (828 LFW people), computed once and cached
   (`app.training.embed_folder`; `--cache-dir`, default bench/results/train-cache).
2. The dev identities are split (seed 0): 30 % are HELD OUT for the report; of the rest, 20 % choose the epoch
   (validation) and the others train. Cross-dataset: heads trained on lfw-dev (15 % of its people for validation)
   are evaluated on the same held-out dev people.
3. For the base and each head: every pair of the held-out people's faces (same and different), evaluated as
   `facegate eval` does (`app.evaluate.evaluate_distances`: 10-fold accuracy, VAL@FAR 1e-3, EER, accuracy at the
   threshold). The base uses 0.36; a head uses the threshold its training calibrated (FAR on its validation pairs
   equal to the base's at 0.36) - its distances have another scale.

Writes bench/results/train_heads.json and prints a Markdown table (the README's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import REPO_ROOT, BatchingSettings, Provider, RuntimeSettings, Settings
from app.evaluate import evaluate_distances
from app.matching.thresholds import DEFAULT_THRESHOLD
from app.training import EmbeddingSet, TrainConfig, embed_folder, pair_indices, split_identities, train_head
from app.vision.pipeline import Pipeline

FACES = REPO_ROOT.parent / "shared" / "faces"

HEADS: list[tuple[str, dict[str, Any]]] = [
    ("triplet semi-hard, linear", {}),
    ("triplet batch-hard, linear", {"mining": "batch_hard"}),
    ("triplet batch-all, linear", {"mining": "batch_all"}),
    ("triplet semi-hard, mlp", {"arch": "mlp"}),
    ("contrastive, linear", {"loss": "contrastive"}),
    ("triplet semi-hard + center 0.5", {"center_weight": 0.5}),
]


def held_out_report(name: str, test: EmbeddingSet, embeddings: np.ndarray, threshold: float) -> dict[str, Any]:
    i, j, same = pair_indices(test.labels, max_different=10**9)
    diff = embeddings[i].astype(np.float64) - embeddings[j].astype(np.float64)
    distances = np.einsum("ij,ij->i", diff, diff)
    r = evaluate_distances(distances, same, threshold=threshold).report
    val = next(v for v in r.val_at_far if v.target_far == 1e-3)
    return {
        "name": name,
        "threshold": threshold,
        "accuracy_at_threshold": r.at_threshold.accuracy,
        "far_at_threshold": r.at_threshold.far,
        "kfold_mean": r.kfold.mean,
        "kfold_std": r.kfold.std,
        "val_at_far_1e-3": val.val,
        "eer": r.eer.eer,
        "auc": r.auc,
        "pairs_same": r.n_same,
        "pairs_different": r.n_different,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", type=Path, default=FACES / "dev")
    parser.add_argument("--lfw", type=Path, default=FACES / "lfw-dev")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "bench" / "results" / "train-cache")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "train_heads.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the head is tiny: one thread is as fast and leaves the other core free

    settings = Settings(runtime=RuntimeSettings(providers=[Provider.CPU]), batching=BatchingSettings(enabled=False))
    pipeline = Pipeline.from_settings(settings)
    dev = embed_folder(pipeline, args.dev, cache_path=args.cache_dir / "dev.npz")
    lfw = embed_folder(pipeline, args.lfw, cache_path=args.cache_dir / "lfw-dev.npz")
    rest, test = split_identities(dev, val_fraction=0.3, seed=0)
    dev_train, dev_val = split_identities(rest, val_fraction=0.2, seed=0)
    lfw_train, lfw_val = split_identities(lfw, val_fraction=0.15, seed=0)

    rows = [held_out_report("base (dlib, as served)", test, test.embeddings, DEFAULT_THRESHOLD)]
    unit = test.embeddings / np.linalg.norm(test.embeddings, axis=1, keepdims=True)
    rows.append(held_out_report("base, L2-normalised (untrained head)", test, unit, float("nan")))
    for source, train, val in (("dev", dev_train, dev_val), ("lfw-dev", lfw_train, lfw_val)):
        for label, options in HEADS:
            config = TrainConfig(epochs=args.epochs, patience=6, p=16, k=4 if source == "dev" else 2, **options)
            started = time.perf_counter()
            result = train_head(train, val, config)
            with torch.no_grad():
                served = result.model(torch.from_numpy(test.embeddings)).numpy()
            row = held_out_report(f"{label} (trained on {source})", test, served, result.threshold)
            row.update(
                seconds=round(time.perf_counter() - started, 1),
                best_epoch=result.best_epoch,
                epochs_run=len(result.history) - 1,
                val_at_far_validation=result.summary()["val_at_far"],
                base_val_at_far_validation=result.base_val_at_far,
                config=config.to_dict(),
            )
            rows.append(row)
            print(f"{row['name']}: VAL {row['val_at_far_1e-3']:.2%}, best epoch {result.best_epoch}", flush=True)

    summary = {
        "held_out": {"identities": test.n_identities, "faces": len(test)},
        "dev_train": {"identities": dev_train.n_identities, "faces": len(dev_train)},
        "dev_val": {"identities": dev_val.n_identities, "faces": len(dev_val)},
        "lfw_train": {"identities": lfw_train.n_identities, "faces": len(lfw_train)},
        "lfw_val": {"identities": lfw_val.n_identities, "faces": len(lfw_val)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    print(f"\nheld out: {test.n_identities} dev people, {len(test)} faces; {rows[0]['pairs_same']} same and "
          f"{rows[0]['pairs_different']} different pairs\n")
    print("| embeddings | threshold | 10-fold accuracy | VAL @ FAR 1e-3 | EER | best epoch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        threshold = "-" if r["threshold"] != r["threshold"] else f"{r['threshold']:.3f}"
        print(
            f"| {r['name']} | {threshold} | {r['kfold_mean']:.2%} +- {r['kfold_std']:.2%} | "
            f"{r['val_at_far_1e-3']:.2%} | {r['eer']:.2%} | {r.get('best_epoch', '-')} |"
        )


if __name__ == "__main__":
    main()

"""`facegate eval`, `eval-identify`, `calibrate`: how well the model separates people on labelled photos, and the
threshold for a target false-accept rate."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from app import evaluate as evaluation
from app.cli.common import (
    CacheOption,
    cli,
    default_threshold,
    embeddings_kept,
    fail,
    failing_on_errors,
    load_settings,
    on_interrupt,
    open_pipeline,
    open_service,
    pipeline_call,
    positive_distance,
    report_folder,
    require_gallery,
    shown,
    target_far,
    writing_reports,
)
from app.matching.evaluation import KFOLDS
from app.service import CalibrationSource
from app.vision.pipeline import Pipeline

PairsOption = Annotated[
    Path,
    typer.Option(
        "--pairs",
        exists=True,
        dir_okay=False,
        help="CSV of labelled pairs with the header img_a,img_b,same (same: 1 or 0), paths relative to --images "
        "(the format of the dev set's pairs.csv).",
    ),
]
ImagesOption = Annotated[
    Path, typer.Option("--images", exists=True, file_okay=False, help="Folder the pair paths are relative to.")
]


def _require_photos(pairs: list[evaluation.Pair], images: Path) -> None:
    """Refuse, before any model is loaded, a pairs file none of whose photos is under --images. Each missing file was
    embedded as `unreadable`, and the command ended with "need at least one same pair and one different pair with
    both faces found", as if the detector had found no face, when --images was the wrong folder (the README's
    relative `../shared/faces/dev` typed from another folder)."""
    photos = list(dict.fromkeys(p for pair in pairs for p in (pair.img_a, pair.img_b)))
    if not any((images / photo).is_file() for photo in photos):
        fail(
            f"none of the {len(photos)} photos the pairs file names is under --images {shown(images)} (the first: "
            f"{shown(images / photos[0])}): --images is the folder the pairs' paths are relative to"
        )


def _pair_distances(
    pipeline: Pipeline, pairs: list[evaluation.Pair], images: Path, cache_path: Path | None
) -> tuple[np.ndarray, dict[str, evaluation.Embedded]]:
    cache = (
        evaluation.EmbeddingCache.load(
            cache_path, evaluation.pipeline_signature(pipeline.model_version, pipeline.settings.detector)
        )
        if cache_path is not None
        else None
    )
    photos = list(dict.fromkeys(p for pair in pairs for p in (pair.img_a, pair.img_b)))
    try:
        with typer.progressbar(length=len(photos), label="Embedding", show_pos=True, file=sys.stderr) as bar:
            embedded = evaluation.embed_photos(pipeline, images, photos, cache=cache, progress=bar.update)
    finally:
        if cache is not None and cache_path is not None:
            cache.save(cache_path)
    return evaluation.pair_distances(pairs, embedded), embedded


@cli.command("eval")
def eval_pairs(
    pairs: PairsOption,
    images: ImagesOption,
    threshold: Annotated[
        float | None,
        typer.Option(
            callback=positive_distance,
            help="Distance at which accuracy, TAR and FAR are reported and the histograms are marked (default "
            "FACEGATE_THRESHOLD, 0.36). The ROC, AUC, EER, 10-fold accuracy and VAL@FAR do not depend on it.",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            file_okay=False,
            help="Folder for eval.json (every number), eval-distances.json (the labelled distances, for "
            "POST /calibrate) and eval.png (ROC + histograms).",
        ),
    ] = Path("facegate-eval"),
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
) -> None:
    """1:1 accuracy on labelled photo pairs (ROC, AUC, EER, 10-fold accuracy, VAL@FAR), as a table, JSON and PNG.

    Accuracy at the threshold, 10-fold accuracy with the threshold chosen on 9 folds (the LFW protocol), VAL at FAR
    1e-3 and 1e-2, same/different distance histograms. Photos without a face are counted and listed, not dropped.
    """
    settings = load_settings()
    with failing_on_errors():
        pair_list = evaluation.read_pairs(pairs, at_least=KFOLDS)  # 10-fold accuracy needs one of each per fold
    _require_photos(pair_list, images)
    with report_folder(out, "the --out folder"):  # taken back if no report is written
        with (
            on_interrupt(lambda: f"no report was written{embeddings_kept(cache)}"),
            pipeline_call(settings) as pipeline,
        ):
            distances, embedded = _pair_distances(pipeline, pair_list, images, cache)
        with failing_on_errors():
            result = evaluation.evaluate_distances(
                distances,
                [p.same for p in pair_list],
                threshold=default_threshold(settings, pipeline) if threshold is None else threshold,
                model_version=pipeline.model_version,
                n_photos=len(embedded),
                missing_photos={path: e.error for path, e in embedded.items() if e.error},
                pairs_file=str(pairs),
            )
        with writing_reports(out):
            json_path, png_path = evaluation.write_report(result, out, title=f"facegate 1:1 on {pairs.name}")
    if as_json:
        typer.echo(json_path.read_text(), nl=False)
        return
    typer.echo(evaluation.format_table(result))
    for path, code in sorted(result.missing_photos.items()):
        typer.echo(f"  no face: {shown(path)} ({code})")
    if png_path is None:
        typer.echo(f"report: {json_path}; no plot: matplotlib is not installed (pip install 'facegate[report]')")
    else:
        typer.echo(f"report: {json_path}, plot: {png_path}")
    typer.echo(f"labelled distances (for POST /calibrate): {json_path.parent / evaluation.DISTANCES_JSON}")


@cli.command("eval-identify")
def eval_identify(
    images: Annotated[
        Path,
        typer.Option(
            "--images",
            exists=True,
            file_okay=False,
            help="Folder with one sub-folder of photos per person (folders inside those are not read).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(file_okay=False, help="Folder for eval-identify.json (every number) and eval-identify.png (DIR vs FPIR)."),
    ] = Path("facegate-eval"),
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
) -> None:
    """1:N open-set accuracy: DIR / FNIR at FPIR 1 %, 5 %, 10 % for the raw-distance rule and facegate's rule.

    Protocol: people sorted by folder name; every other person is enrolled with their first photo (sorted file
    names), their other photos are probes, every photo of the others is a stranger. FPIR = share of strangers
    named as someone; DIR = share of probes named correctly; FNIR = 1 - DIR.
    """
    from app.identify_eval import (
        format_identify_table,
        person_photos,
        run_identify_eval,
        write_identify_report,
    )

    settings = load_settings()
    with report_folder(out, "the --out folder"):  # taken back if no report is written
        with (
            on_interrupt(lambda: f"no report was written{embeddings_kept(cache)}"),
            pipeline_call(settings) as pipeline,
            failing_on_errors(),
        ):
            photos = person_photos(images, heic=settings.image.heic)
            with typer.progressbar(length=len(photos), label="Embedding", show_pos=True, file=sys.stderr) as bar:
                result = run_identify_eval(
                    images,
                    settings=settings,
                    cache=cache,
                    pipeline=pipeline,
                    progress=bar.update,
                    photos=photos,
                    # a head's own threshold, as eval and /identify
                    max_distance=default_threshold(settings, pipeline),
                )
        with writing_reports(out):
            result = replace(result, files=write_identify_report(result, out))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    typer.echo(format_identify_table(result))
    for path, code in sorted(result.missing_photos.items()):
        typer.echo(f"  no face: {shown(path)} ({code})")
    typer.echo(f"report: {', '.join(str(f) for f in result.files)}")


@cli.command()
def calibrate(
    pairs: PairsOption,
    images: ImagesOption,
    far: Annotated[
        float,
        typer.Option(
            callback=target_far,
            help="Target false-accept rate (0 < x < 1): the share of different-person pairs the threshold may accept. "
            "Lower it for a stricter threshold (fewer strangers accepted, more genuine users refused); it needs many "
            "different-person pairs (well over 1/FAR) to be measured.",
        ),
    ] = 1e-3,
    apply: Annotated[
        bool,
        typer.Option(
            help="Store the threshold as the deployment threshold in the gallery database (FACEGATE_DATABASE_URL); "
            "verify and identify then use it when a request gives none. Refused below 1/FAR different pairs.",
        ),
    ] = False,
    cache: CacheOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The threshold for a target FAR on labelled photo pairs, with the VAL it gives and confidence intervals."""
    settings = load_settings()
    with failing_on_errors():
        pair_list = evaluation.read_pairs(pairs)
    _require_photos(pair_list, images)
    if apply:  # a mistyped FACEGATE_DATABASE_URL created an empty gallery and stored the threshold there
        require_gallery(settings)
    service = open_service(settings) if apply else None
    pipeline = service.pipeline if service is not None else open_pipeline(settings)
    try:
        with on_interrupt(lambda: f"no threshold was computed or stored{embeddings_kept(cache)}"):
            distances, embedded = _pair_distances(pipeline, pair_list, images, cache)
        same = np.array([p.same for p in pair_list], bool)
        found = ~np.isnan(distances)
        with failing_on_errors(with_code=True):
            if service is not None:
                result = service.calibrate(
                    CalibrationSource.pairs,
                    target_far=far,
                    same=distances[found & same].tolist(),
                    different=distances[found & ~same].tolist(),
                    apply=True,
                    note=f"facegate calibrate --pairs {pairs}",
                )
                c = result.calibration
            else:
                c = evaluation.calibrate(distances, same, far)
    finally:
        if service is not None:
            service.close()  # its pipeline's too
        else:
            pipeline.close()
    missing = sorted(path for path, e in embedded.items() if e.error)
    if as_json:
        extra = {"applied": apply, "missing_photos": missing, "n_missing_pairs": int((~found).sum())}
        typer.echo(json.dumps({**c.to_dict(), **extra}))
        return
    typer.echo(f"threshold {c.threshold:.4f} for target FAR {c.target_far:g}")
    typer.echo(
        f"  FAR {c.far:.4%} ({c.false_accepts}/{c.n_different} different pairs), {c.confidence:.0%} interval "
        f"[{c.far_interval[0]:.4%}, {c.far_interval[1]:.4%}]"
    )
    typer.echo(
        f"  VAL {c.val:.2%} ({c.true_accepts}/{c.n_same} same pairs), {c.confidence:.0%} interval "
        f"[{c.val_interval[0]:.2%}, {c.val_interval[1]:.2%}]"
    )
    typer.echo(f"  {int((~found).sum())} pairs left out: no face in {len(missing)} photos")
    if apply:
        typer.echo("stored as the deployment threshold.")
    else:
        typer.echo("not stored (use --apply to make it the deployment threshold).")

"""`facegate train` (an embedding head from labelled photos) and `facegate reindex` (stored faces recomputed for
the served model)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from sqlalchemy.exc import SQLAlchemyError

from app.cli.common import (
    CacheOption,
    cli,
    embeddings_kept,
    fail,
    failing_on_errors,
    float_range,
    interrupts_held,
    load_settings,
    make_folder,
    on_interrupt,
    pipeline_call,
    require_gallery,
)
from app.errors import FacegateError
from app.gallery import Gallery
from app.gallery.reindex import PhotoBase
from app.vision.pipeline import Pipeline
from app.vision.types import Box


def _one_of(*choices: str) -> Callable[[str], str]:
    """A choice option checked by click (exit 2, the option named) without importing app.training (PyTorch)."""

    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


@cli.command("train")
def train(
    images: Annotated[
        Path,
        typer.Option(
            "--images",
            exists=True,
            file_okay=False,
            help="Folder with one sub-folder of photos per person (the photos of folders inside those count as the "
            "person's).",
        ),
    ],
    name: Annotated[
        str, typer.Option(help="Name to register the head under (<heads dir>/<name>/; replaces a head of that name).")
    ] = "head",
    loss: Annotated[
        str,
        typer.Option(
            callback=_one_of("triplet", "contrastive", "none"),
            help="triplet, contrastive, or none (center loss alone: give --center-weight).",
        ),
    ] = "triplet",
    mining: Annotated[
        str,
        typer.Option(
            callback=_one_of("semi_hard", "batch_hard", "batch_all"),
            help="Triplet mining in each batch: semi_hard (FaceNet: the nearest negative farther than the positive), "
            "batch_hard (each anchor's farthest positive and nearest negative) or batch_all.",
        ),
    ] = "semi_hard",
    margin: Annotated[
        float,
        typer.Option(
            callback=float_range(0.0, 4.0),
            help="Triplet margin alpha on squared distances (FaceNet: 0.2), 0 <= x <= 4: the head's outputs are unit "
            "vectors, at most 4 apart (squared), so no triplet could meet a larger margin.",
        ),
    ] = 0.2,
    contrastive_margin: Annotated[
        float,
        typer.Option(
            callback=float_range(0.0, 2.0, low_open=True),
            help="Contrastive loss: different faces are pushed this far apart (Euclidean), 0 < x <= 2: unit vectors "
            "are at most 2 apart, and at 0 nothing is pushed apart (every face collapses onto one point).",
        ),
    ] = 1.0,
    center_weight: Annotated[
        float,
        typer.Option(
            callback=float_range(0.0, 100.0),
            help="Weight of center loss added to the loss (0 = off), 0 <= x <= 100: on unit vectors both terms are "
            "below a few units, so beyond 100 the other one no longer counts (center loss alone: --loss none).",
        ),
    ] = 0.0,
    arch: Annotated[
        str, typer.Option(callback=_one_of("linear", "mlp"), help="linear (128x128 map) or mlp (residual 2-layer map).")
    ] = "linear",
    # 512 below: app.training.sampler.MAX_BATCH_FACES, not imported at the top (app.training imports torch, which
    # every command would then load); the help test checks they agree.
    p: Annotated[
        int,
        typer.Option(
            "--p",
            min=2,
            help="Identities per batch (P of PK sampling); P x K is at most 512 faces (batch-all mining's memory grows "
            "with the cube of the batch). A P above the number of training identities puts all of them in each "
            "batch, one step an epoch.",
        ),
    ] = 16,
    k: Annotated[
        int,
        typer.Option(
            "--k",
            min=2,
            help="Faces per identity in a batch (K of PK sampling; drawn again when a person has fewer); P x K is at "
            "most 512.",
        ),
    ] = 4,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs (each visits every training identity once).")] = 60,
    patience: Annotated[
        int, typer.Option(min=1, help="Stop after this many epochs without a better validation VAL@FAR.")
    ] = 10,
    lr: Annotated[
        float,
        typer.Option(
            callback=float_range(0.0, 0.1, low_open=True),
            help="AdamW learning rate, 0 < x <= 0.1: each step moves every weight by about this much and the head "
            "starts as the identity map (weights of 1), which a few steps of a larger rate erase; at 0 nothing trains.",
        ),
    ] = 1e-4,
    val_fraction: Annotated[
        float,
        typer.Option(
            callback=float_range(0.01, 0.99),
            help="Share of the identities held out for validation, 0.01 <= x <= 0.99.",
        ),
    ] = 0.2,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the split, the batches and the initial weights.")] = 0,
    cache: CacheOption = None,
) -> None:
    """Train an embedding head on labelled photos (metric learning on dlib's embeddings) and register it.

    The photos are embedded once (--cache keeps the embeddings between runs); the head trains on the embeddings,
    choosing the epoch by VAL@FAR 1e-3 on identities it never trains on. Needs the `train` extra (PyTorch).
    Serve it with FACEGATE_HEAD__NAME=<name>, then run `facegate reindex`.
    """
    # PyTorch takes seconds to import: a Ctrl-C meanwhile says so too, not a bare exit 130.
    with on_interrupt(lambda: f"no head was registered (any head already named {name} is left as it was)"):
        try:
            from tqdm import tqdm

            from app.training import (
                EpochLog,
                TrainConfig,
                embed_folder,
                folder_photos,
                register_head,
                split_identities,
                train_head,
            )
        except ModuleNotFoundError as error:
            fail(f"{error.name} is missing: install the training extra (pip install 'facegate[train]')")
    from app.training.sampler import batch_problem

    # Checked here, not at the first batch: a batch too large ended the run after the photos were embedded, with
    # PyTorch's out-of-memory traceback ("you tried to allocate 204800000000 bytes").
    if loss == "none" and center_weight <= 0:
        raise typer.BadParameter(
            "--loss none trains nothing without center loss: give --center-weight > 0", param_hint="'--loss'"
        )
    problem = batch_problem(p, k)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="'--p' / '--k'")
    from app.config import HeadSettings
    from app.training.export import head_folder
    from app.vision.head import heads_dir

    # Training starts from the embedder's own output, whatever head is being served.
    configured = load_settings()
    settings = configured.model_copy(update={"head": HeadSettings(dir=configured.head.dir)})
    # The head's name and folder are checked before the photos are embedded and the head trained: a folder that
    # could not be made ended the run at its very end with a traceback, the training lost.
    try:
        folder = head_folder(heads_dir(settings.head, settings.models_dir), name)
    except ValueError as error:
        fail(f"--name: {error}")
    created = not folder.exists()  # made here: removed again (if still empty) when no head is registered
    make_folder(folder, "the head's folder")
    registered = False  # set once register_head has replaced both files (a Ctrl-C during it is held till then)

    def head_state() -> str:
        if registered:
            return f"the head was registered in {folder} (serve it with FACEGATE_HEAD__NAME={name})"
        return f"no head was registered (any head already named {name} is left as it was){embeddings_kept(cache)}"

    try:
        with on_interrupt(head_state):
            try:
                config = TrainConfig(
                    loss=loss,  # type: ignore[arg-type]
                    mining=mining,  # type: ignore[arg-type]
                    margin=margin,
                    contrastive_margin=contrastive_margin,
                    center_weight=center_weight,
                    arch=arch,  # type: ignore[arg-type]
                    p=p,
                    k=k,
                    epochs=epochs,
                    patience=patience,
                    lr=lr,
                    seed=seed,
                )
                photos = folder_photos(images, heic=settings.image.heic)
                count = len(photos)
                with (
                    pipeline_call(settings) as pipeline,
                    typer.progressbar(length=count, label="Embedding", show_pos=True, file=sys.stderr) as bar,
                ):
                    data = embed_folder(pipeline, images, photos=photos, cache_path=cache, progress=bar.update)
                train_set, val_set = split_identities(data, val_fraction=val_fraction, seed=seed)
                with tqdm(total=epochs + 1, desc="Training", unit="epoch", file=sys.stderr) as epochs_bar:

                    def progress(log: EpochLog) -> None:
                        epochs_bar.set_postfix(val_loss=f"{log.val_loss:.4f}", val_at_far=f"{log.val_at_far:.3f}")
                        epochs_bar.update(1)

                    result = train_head(train_set, val_set, config, progress=progress)
                try:
                    with interrupts_held():  # a Ctrl-C waits for both files of the head: no head half old, half new
                        register_head(
                            result,
                            name=name,
                            heads_dir=folder.parent,
                            base_model_version=pipeline.base_model_version,
                            opset=pipeline.manifest.opset,
                            extra={"data": {"photos": count, "faces": len(data), "no_face": data.missing}},
                        )
                        registered = True
                except OSError as error:  # e.g. disk full: no file of a head of that name was replaced
                    fail(f"cannot write the head into {folder}: {error.strerror or error}")
            except FacegateError as error:
                fail(f"{error.code}: {error.message}")
            except ValueError as error:
                fail(str(error))
    finally:
        if created and not registered:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a refused or interrupted run leaves no empty heads/<name>/
    summary = result.summary()
    typer.echo(
        f"faces {len(data)} of {count} photos ({data.missing} without a face); train {summary['train_identities']} "
        f"identities / {summary['train_faces']} faces, validation {summary['val_identities']} / "
        f"{summary['val_faces']}"
    )
    typer.echo(
        f"validation VAL@FAR {config.target_far:g}: base {summary['base_val_at_far']:.2%}, head "
        f"{summary['val_at_far']:.2%} (best epoch {result.best_epoch} of {summary['epochs_run']}; epoch 0 = untrained)"
    )
    typer.echo(f"head threshold {result.threshold:.4f} (same FAR as the base at 0.36 on the validation pairs)")
    typer.echo(f"registered {folder}: serve it with FACEGATE_HEAD__NAME={name}, then run `facegate reindex`")


@cli.command("reindex")
def reindex_command(
    from_photos: Annotated[
        bool,
        typer.Option(
            "--from-photos",
            help="Also embed again, from their stored photos (FACEGATE_STORE_IMAGES), the faces whose stored numbers "
            "cannot serve: made by another base (e.g. before FACEGATE_EMBEDDING__FLIP changed) or with none. Loads the "
            "models; ~60 ms a face on 2 cores.",
        ),
    ] = False,
) -> None:
    """Recompute every enrolled face's embedding for the model now served (FACEGATE_HEAD__NAME set or not) from
    the stored base embeddings (and with --from-photos from stored photos), in one transaction; every worker's index
    picks the change up. Safe to re-run. Exit status 1 when faces are left stale."""
    from app.gallery.reindex import reindex

    settings = load_settings()
    require_gallery(settings)
    pipeline: Pipeline | None = None
    gallery: Gallery | None = None
    elsewhere: int | None = None  # faces at other model versions when the reindex starts

    def outcome() -> str:
        # An interrupt inside the transaction rolls it back. It can also come after the commit, while this process's
        # index is rebuilt (seconds for a large gallery): then fewer faces are left at other versions.
        if gallery is not None and elsewhere is not None:
            try:
                done = elsewhere - _faces_elsewhere(gallery)
            except SQLAlchemyError:  # e.g. a PostgreSQL connection cut mid-query by the interrupt
                return (
                    "whether it had been committed cannot be read: run `facegate reindex` again (it rewrites what is "
                    "left)"
                )
            if done > 0:
                return f"the reindex had been committed: {done} faces are now at model version {gallery.model_version}"
        return "no face was changed (the reindex is one transaction, rolled back); run `facegate reindex` again"

    try:
        with on_interrupt(outcome):
            with failing_on_errors():
                pipeline = Pipeline.from_settings(settings)  # only the head's graph is opened (lazily), not the networks
                if from_photos:
                    pipeline.load()
                gallery = Gallery.open(settings.database_url, pipeline.model_version, index=settings.index)
            elsewhere = _faces_elsewhere(gallery)
            with failing_on_errors(with_code=True):
                report = reindex(
                    gallery,
                    target_version=pipeline.model_version,
                    base_version=pipeline.base_model_version,
                    transform=pipeline.head.apply if pipeline.head is not None else None,
                    photo_base=_photo_base(pipeline) if from_photos else None,
                    # Earlier builds' names of this base (as the service adopts them): the same numbers.
                    earlier_bases=pipeline.manifest.earlier_names(pipeline.base_model_version),
                )
    finally:
        if gallery is not None:
            gallery.close()
        if pipeline is not None:
            pipeline.close()  # --from-photos: its inference threads
    sources = ", ".join(f"{n} from {v}" for v, n in sorted(report.from_versions.items())) or "none"
    photos = f", {report.from_photos} of them from their photos" if from_photos else ""
    stale = f"{report.skipped} left stale"
    if report.skipped:  # why, and what to do, only when some face is actually left behind
        stale += (
            " (no usable base embedding"
            + (" or photo" if from_photos else "; --from-photos uses stored photos")
            + ": enrol them again)"
        )
    typer.echo(
        f"model version {report.target_version}: {report.updated} faces recomputed ({sources}){photos}, "
        f"{report.already_current} already current, {stale}"
    )
    if report.skipped:
        raise typer.Exit(1)


def _faces_elsewhere(gallery: Gallery) -> int:
    """Stored faces of another model version than the gallery's (the served one): what a reindex rewrites."""
    return sum(n for version, n in gallery.face_counts().items() if version != gallery.model_version)


def _photo_base(pipeline: Pipeline) -> PhotoBase:
    """The base embedding of the detected face that overlaps `box` best (IoU >= 0.5) in a stored photo."""

    def base(photo: bytes, box: Box) -> np.ndarray | None:
        try:
            face = pipeline.embed_face_at(pipeline.decoder(photo), box, min_iou=0.5)
        except FacegateError:
            return None
        if face is None:
            return None
        return face.embedding if face.base_embedding is None else face.base_embedding

    return base

"""`facegate cluster`: group the faces of a folder of photos by person."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import Unusable, cli, fail, load_settings, on_interrupt, pipeline_call, positive_distance, shown
from app.grouping import ClusterMember, ClusterReport, cluster_files
from app.identify_eval import hidden, photo_suffixes


def _photos_under(directory: Path, unreadable: list[Unusable], *, heic: bool = False) -> list[Path]:
    """Photo files below `directory` (HEIC/HEIF ones with `heic`), hidden names left out. Linked folders are
    followed, as `enroll DIR` follows them (Path.rglob does not before Python 3.13), each real folder once: a link
    back up ends no walk. A folder that cannot be listed (no permission) is added to `unreadable`, as enroll lists
    it: os.walk skipped it silently, its photos missing from the clusters without a word; DIRECTORY itself is an
    error."""

    def cannot_list(error: OSError) -> None:
        if error.filename in (None, os.fspath(directory)):  # os.walk names DIRECTORY as it was given
            fail(f"cannot read {shown(directory)}: {error.strerror}")
        unreadable.append(Unusable.unreadable_folder(os.path.relpath(error.filename, directory), error))

    suffixes = photo_suffixes(heic)
    photos = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(directory, onerror=cannot_list, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not hidden(d))
        for name in files:
            path = Path(folder) / name
            if not hidden(name) and path.suffix.lower() in suffixes and path.is_file():
                photos.append(path)
    return sorted(photos)


def _member_text(m: ClusterMember) -> str:
    b = m.box
    return f"{shown(m.photo)} ({b.left},{b.top})-({b.right},{b.bottom})"


def _cluster_json(report: ClusterReport) -> dict[str, object]:
    def member(m: ClusterMember) -> dict[str, object]:
        return {"photo": m.photo, "box": m.box.as_dict(), "score": m.score}

    return {
        "threshold": report.threshold,
        "n_photos": report.n_photos,
        "n_faces": report.n_faces,
        "sizes": report.sizes,
        "clusters": [[member(m) for m in c] for c in report.clusters],
        "unclustered": [member(m) for m in report.unclustered],
        "problems": [{"photo": p.photo, "code": p.code, "message": p.message} for p in report.problems],
    }


@cli.command()
def cluster(
    directory: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Folder of photos (sub-folders included).")
    ],
    threshold: Annotated[
        float | None,
        typer.Option(
            callback=positive_distance,
            help="Faces within this squared distance are linked (default FACEGATE_CLUSTER__THRESHOLD, 0.25: stricter "
            "than the 1:1 threshold, as clusters grow along chains of links). Lower it for purer clusters and more "
            "faces left unclustered; raise it for fewer, larger clusters that may merge different people.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the clusters as JSON.")] = False,
) -> None:
    """Group the faces of every photo under DIRECTORY by person (chinese whispers, as dlib)."""
    from app.service import cluster_threshold

    settings = load_settings()
    unreadable: list[Unusable] = []
    files = _photos_under(directory, unreadable, heic=settings.image.heic)
    if not files and not unreadable:
        fail(f"no photos under {directory}")
    with (
        on_interrupt(lambda: "nothing was written (cluster only prints)"),
        pipeline_call(settings) as pipeline,
        typer.progressbar(length=len(files), label="Finding faces", show_pos=True, file=sys.stderr) as bar,
    ):
        report = cluster_files(
            pipeline,
            directory,
            files,
            cluster_threshold(settings, pipeline) if threshold is None else threshold,
            progress=bar.update,
        )
    if as_json:
        listed = [{"folder": str(u.path), "code": u.code, "message": u.message} for u in unreadable]
        typer.echo(json.dumps({**_cluster_json(report), "unreadable_folders": listed}))
        return
    folders = f", {len(unreadable)} folders unreadable" if unreadable else ""
    typer.echo(
        f"{report.n_photos} photos, {report.n_faces} faces: {len(report.clusters)} clusters, "
        f"{len(report.unclustered)} unclustered faces, {len(report.problems)} photos without a face{folders} "
        f"(threshold {report.threshold:g})"
    )
    for i, members in enumerate(report.clusters, 1):
        typer.echo(f"cluster {i}: {len(members)} faces")
        for m in members:
            typer.echo(f"    {_member_text(m)}")
    if report.unclustered:
        typer.echo("unclustered:")
        for m in report.unclustered:
            typer.echo(f"    {_member_text(m)}")
    for problem in [*(Unusable(p.photo, p.code, p.message) for p in report.problems), *unreadable]:
        typer.echo(problem.line())

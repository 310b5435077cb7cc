"""`facegate enroll`, `verify`, `identify`: photos against the gallery, through `app.service` as the HTTP
routes do."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import (
    FaceOption,
    PhotoSelection,
    ThresholdOption,
    Unusable,
    cli,
    error_text,
    fail,
    load_settings,
    on_interrupt,
    open_service,
    read_bytes,
    service_call,
    shown,
)
from app.errors import DatabaseUnavailable, FacegateError, InsufficientStorage, InvalidRequest, PossibleDuplicate
from app.identify_eval import hidden, photo_suffixes
from app.names import clean_name
from app.service import FacePolicy, FaceService, IdentifiedFace, IdentifyResult, VerifyResult


def _people(
    directory: Path, selection: PhotoSelection, unreadable: list[Unusable], *, heic: bool = False
) -> Iterator[tuple[str, list[Path]]]:
    """Each person's folder and photos (HEIC/HEIF ones with `heic`); a folder that cannot be listed (no permission)
    is added to `unreadable` rather than ending the command with a traceback."""
    suffixes = photo_suffixes(heic)
    try:
        people = sorted(p for p in directory.iterdir() if p.is_dir() and not hidden(p.name))
    except OSError as error:
        fail(f"cannot read {shown(directory)}: {error.strerror}")
    for person in people:
        try:
            photos = sorted(p for p in person.iterdir() if p.is_file() and not hidden(p.name) and p.suffix.lower() in suffixes)
        except OSError as error:
            unreadable.append(Unusable.unreadable_folder(person, error))
            continue
        if photos:
            yield person.name, photos[:1] if selection is PhotoSelection.first else photos


@cli.command()
def enroll(
    directory: Annotated[
        Path,
        typer.Argument(
            exists=True, file_okay=False, dir_okay=True, help="One sub-folder per person, named after them."
        ),
    ],
    photos: Annotated[
        PhotoSelection,
        typer.Option(
            help="'first': one photo per person (the first by file name; one is enough to enrol); 'all': every photo "
            "(more faces per identity make verification more tolerant of pose and age, and enrolment slower).",
        ),
    ] = PhotoSelection.first,
    face: FaceOption = FacePolicy.single,
    allow_low_quality: Annotated[
        bool,
        typer.Option(
            help="Enrol faces that fail a quality limit (FACEGATE_QUALITY__*: too small, blurred, too dark or "
            "bright, cut off). Without it they are reported as low_quality and skipped.",
        ),
    ] = False,
    allow_duplicate: Annotated[
        bool,
        typer.Option(
            help="Create a person's identity even if their first face matches another enrolled identity within the "
            "threshold. Without it such a folder is reported as possible_duplicate and skipped.",
        ),
    ] = False,
) -> None:
    """Enrol every person of DIRECTORY. A folder whose name is already an identity's name adds faces to it; photos
    it already has are skipped, so a run can be repeated after an interruption or a fix."""
    failures: list[Unusable] = []
    settings = load_settings()
    people = list(_people(directory, photos, failures, heic=settings.image.heic))
    if not people and not failures:
        fail(f"no photos in sub-folders of {directory}")
    created = added = skipped = 0

    def enrolled_so_far() -> str:
        # Each photo is enrolled in a transaction of its own: those done stay, the one under way was rolled back or
        # committed whole, and a re-run finds each folder's identity by its name and skips the photos it already has.
        return (
            f"{created} identities created and {added} faces added so far stay enrolled; run the same command again "
            "to enrol the rest (photos already enrolled are skipped)"
        )

    with on_interrupt(enrolled_so_far):
        service = open_service(settings)
        try:
            total = sum(len(p) for _, p in people)
            with typer.progressbar(length=total, label="Enrolling", show_pos=True, file=sys.stderr) as bar:
                for name, paths in people:
                    identity_id = _existing_identity(service, name)
                    for i, path in enumerate(paths):
                        try:
                            if identity_id is None:
                                result = service.enroll(
                                    read_bytes(path),
                                    name=name,
                                    face=face,
                                    allow_low_quality=allow_low_quality,
                                    allow_duplicate=allow_duplicate,
                                )
                                identity_id = result.identity_id
                                created += 1
                            else:
                                result = service.enroll(
                                    read_bytes(path), identity_id=identity_id, face=face, allow_low_quality=allow_low_quality
                                )
                                if result.already_enrolled:  # the same photo: stored once, on an earlier run
                                    skipped += 1
                                else:
                                    added += 1
                        except (DatabaseUnavailable, InsufficientStorage):
                            raise  # not this photo's fault: the run ends (what was enrolled stays)
                        except PossibleDuplicate as error:
                            # Only a new identity is checked for duplicates. Had the folder's next photo created it,
                            # this face would have been added to it unchecked by a re-run, neither of the two ways
                            # the message offers: the folder is skipped, as --allow-duplicate's help says.
                            failures.append(Unusable(path, error.code, error_text(error)))
                            failures += [_skipped_with(rest, path) for rest in paths[i + 1 :]]
                            bar.update(len(paths) - i)
                            break
                        except FacegateError as error:
                            failures.append(Unusable(path, error.code, error_text(error)))
                        bar.update(1)
        finally:
            service.close()
    already = f"{skipped} photos already enrolled (skipped), " if skipped else ""
    typer.echo(
        f"{created} identities created, {added} faces added to existing ones, {already}{len(failures)} photos failed."
    )
    for failure in failures:
        typer.echo(failure.line())
    if failures:
        raise typer.Exit(1)


def _skipped_with(path: Path, refused: Path) -> Unusable:
    """A photo not enrolled because its folder's first face, `refused`, matches another identity."""
    return Unusable(path, PossibleDuplicate.code, f"its folder was skipped: {shown(refused.name)} matches another identity")


def _existing_identity(service: FaceService, folder: str) -> str | None:
    """The identity a folder's name names, as enrolment stored it: without surrounding spaces (`clean_name`), and in
    either Unicode form of its accents (a Mac names folders in the decomposed one, "E" and a combining accent; typed
    names are composed, "É"). None for a new name, and for a name enrolment refuses (its photos are refused then,
    each with the reason). Names are stored as given: a canonical form would change some (CJK compatibility
    ideographs), so they are only compared in one."""
    try:
        name = unicodedata.normalize("NFC", clean_name(folder))
    except InvalidRequest:
        return None
    named = service.identities_named(name)
    return next((i for i, found in named.items() if unicodedata.normalize("NFC", found) == name), None)  # oldest


# ------------------------------------------------------------------------------------------ verify / identify


def _decision_line(result: VerifyResult | IdentifyResult) -> str:
    far = f", estimated FAR {result.far_estimate:.2g}" if result.far_estimate is not None else ""
    return f"threshold {result.threshold.value:.4f} ({result.threshold.source.value}{far})"


# The features of an identify decision, named as /identify's reply names them (app.api.schemas.IdentifiedFaceOut).
_DECISION_FEATURES = ("margin", "ratio", "score", "score_threshold", "accept_distance", "fpir_estimate")


def _faces_line(result: IdentifyResult) -> str:
    """How many faces are answered, and, for a crowd photo capped at detector.max_faces, how many were found: the
    faces left out are not listed, so the count alone would read as every face of the photo."""
    if result.faces_detected <= len(result.faces):
        return f"{len(result.faces)} face(s)"
    return (
        f"{len(result.faces)} of {result.faces_detected} faces found (the most confident; "
        "FACEGATE_DETECTOR__MAX_FACES)"
    )


def _why(face: IdentifiedFace) -> str:
    """The numbers an identify decision rests on, for the text output (the JSON has them all)."""
    if face.score is None or face.score_threshold is None:
        return "the gallery is empty"
    parts = [] if face.margin is None else [f"margin {face.margin:.4f}"]
    parts.append(f"score {face.score:.3f}, named at <= {face.score_threshold:.3f}")
    if face.accept_distance is not None:
        parts.append(f"accept distance {face.accept_distance:.4f}")
    if face.fpir_estimate is not None:
        parts.append(f"strangers scoring this well {100 * face.fpir_estimate:.2g} %")
    return "; ".join(parts)


@cli.command()
def verify(
    photo_a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First photo.")],
    photo_b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second photo.")],
    threshold: ThresholdOption = None,
    face: FaceOption = FacePolicy.single,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Are the faces of two photos the same person? Exit status 0: match, 1: no match, 2: error."""
    # Two photos compared need no gallery: an existing one's calibrated threshold is used, a missing one not made.
    with service_call(gallery_if_present=True) as service:
        try:
            result = service.verify_photos(read_bytes(photo_a), read_bytes(photo_b), threshold=threshold, face=face)
        except FacegateError as error:  # the service names the photo (details.field); say which file it is
            photo = {"image_a": photo_a, "image_b": photo_b}.get(str(error.details.get("field")))
            if photo is None:
                raise
            fail(f"{shown(photo)}: {error.code}: {error_text(error)}")
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "match": result.match,
                    "distance": result.distance,
                    "threshold": result.threshold.value,
                    "threshold_source": result.threshold.source.value,
                    "far_estimate": result.far_estimate,
                }
            )
        )
    else:
        verdict = "MATCH" if result.match else "NO MATCH"
        typer.echo(f"{verdict}: distance {result.distance:.4f}, {_decision_line(result)}")
    raise typer.Exit(0 if result.match else 1)


@cli.command()
def identify(
    image: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The photo; every face in it is searched.")
    ],
    top_k: Annotated[
        int,
        typer.Option(
            min=1, max=100, help="Candidates listed per face. Only the list grows; the decision uses the best."
        ),
    ] = 5,
    threshold: ThresholdOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Who is in IMAGE? Each face: the enrolled identity that /identify's open-set rule names (within the threshold
    and standing out from the runner-up), else unknown or ambiguous."""
    photo = read_bytes(image)  # a photo that cannot be read is refused before the models load
    with service_call(existing_gallery=True) as service:
        result = service.identify(photo, top_k=top_k, threshold=threshold)
        stale = service.gallery.stats().stale
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "threshold": result.threshold.value,
                    "threshold_source": result.threshold.source.value,
                    "target_fpir": result.target_fpir,
                    "far_estimate": result.far_estimate,
                    "gallery_size": result.gallery_size,
                    "identities": result.identities,
                    "faces_detected": result.faces_detected,
                    "faces": [
                        {
                            "box": f.face.box.as_dict(),
                            "match": f.match.identity_id if f.match else None,
                            "reason": f.reason.value,
                            "candidates": [
                                {"identity_id": c.identity_id, "name": c.name, "distance": c.distance}
                                for c in f.candidates
                            ],
                            # what the decision used, as /identify reports it
                            **{name: getattr(f, name) for name in _DECISION_FEATURES},
                        }
                        for f in result.faces
                    ],
                }
            )
        )
        return
    gallery = f"gallery of {result.gallery_size} faces of {result.identities} identities"
    if stale:  # "gallery of 0 faces" reads as an empty gallery when every face awaits `facegate reindex`
        gallery += f" searched ({stale} more made by another model version: run `facegate reindex`)"
    typer.echo(
        f"{_faces_line(result)}, {gallery}, {_decision_line(result)}, target FPIR {100 * result.target_fpir:g} %"
    )
    for i, f in enumerate(result.faces, 1):
        b = f.face.box
        who = f"{f.match.name} ({f.match.identity_id}), distance {f.match.distance:.4f}" if f.match else f.reason.value
        typer.echo(f"face {i} at ({b.left},{b.top})-({b.right},{b.bottom}): {who} ({_why(f)})")
        for c in f.candidates:
            typer.echo(f"    {c.distance:.4f}  {c.name}  {c.identity_id}")

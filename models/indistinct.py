"""Regenerate app/vision/data/indistinct.json: where the embeddings of faces that carry no identity gather.

    python -m models.indistinct --faces DIR [--out FILE]

A photo turned sideways with no EXIF orientation still gives the detector a face (about 6 in 10 LFW photos turned
by 90 degrees), and the 5-point shape predictor, which starts from an upright mean shape, fits upright-looking
landmarks to it: the chip is a sideways face and the embedding is one the network never learnt to separate. Such
embeddings gather near the average face, so two people's sideways photos matched each other (74 % of different-
person pairs at 0.36 on the dev set, against 0.29 % for upright photos). The file holds their mean (128 numbers, no
photo): `app.vision.quality` measures a face's `distinctiveness` as its squared distance from it.

The mean comes from the first photo of every person of DIR/lfw-dev, turned by 90 and by 270 degrees, through
facegate's own pipeline (the built models, `make models`; plain embeddings, CPU provider), the most confident face
of each. The dev set stays an independent check (README "Face quality"). Deterministic for the same models and
photos; not part of `make models`, which must not need the photos: rerun it when the embedder changes, and commit
the file.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from app.config import EmbeddingSettings, RuntimeSettings, Settings
from app.errors import FacegateError
from app.vision.pipeline import Pipeline
from app.vision.quality import DATA_DIR, INDISTINCT_FILE

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _first_photos(folder: Path) -> list[Path]:
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    firsts = [next(iter(sorted(f for f in p.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)), None) for p in people]
    return [f for f in firsts if f is not None]


def turned(photo: Path, degrees: int) -> bytes:
    """The photo turned counter-clockwise by `degrees`, as PNG bytes with no EXIF (what a sideways upload gives)."""
    buffer = io.BytesIO()
    with Image.open(photo) as image:
        image.convert("RGB").rotate(degrees, expand=True).save(buffer, "PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, required=True, help="the folder holding lfw-dev/")
    parser.add_argument("--out", type=Path, default=DATA_DIR / INDISTINCT_FILE)
    args = parser.parse_args(argv)
    settings = Settings(
        runtime=RuntimeSettings(providers=["CPUExecutionProvider"]), embedding=EmbeddingSettings(flip=False)
    )
    pipeline = Pipeline.from_settings(settings)
    if pipeline.head is not None:
        parser.error("unset FACEGATE_HEAD__NAME: the mean is of the embedder's own output")
    photos = _first_photos(args.faces / "lfw-dev")
    embeddings = []
    try:
        for i, photo in enumerate(photos, 1):
            for degrees in (90, 270):
                try:
                    faces = pipeline.find_faces(pipeline.decoder(turned(photo, degrees)))
                except FacegateError:
                    continue
                if faces:
                    embeddings.append(faces[0].embedding)
            if i % 100 == 0:
                print(f"{i}/{len(photos)} photos, {len(embeddings)} faces", file=sys.stderr)
    finally:
        pipeline.close()
    centroid = np.mean(np.stack(embeddings).astype(np.float64), axis=0)
    document = {
        "model_name": pipeline.embedding_name,
        "source": f"lfw-dev: the first photo of each of {len(photos)} people, turned by 90 and 270 degrees",
        "faces": len(embeddings),
        "centroid": [round(float(v), 6) for v in centroid],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{args.out}: the mean of {len(embeddings)} faces of {len(photos)} * 2 turned photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())

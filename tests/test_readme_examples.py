"""The README's curl examples, run as a reader would type them: every `curl` line of its "Endpoints" section, with
the real curl (and jq) through bash, against a real server (`facegate serve`, one worker, a SQLite gallery, API keys
in use, stored photos on as the stored-photo example says), in the README's order.

Only what a reader substitutes is substituted: the address, `$KEY` / `$ADMIN_KEY` (real keys of the scopes the
README gives them), the placeholder ids (`3f2a...` is the identity the first example enrolled, `9b1c...` its face,
the cursor a real `next`) and the photos (dev-set faces converted to the JPEGs the examples name). The gallery is
seeded first with other people, so that calibrating from it and evaluating it have data, as on a real deployment.
A wrong field, path, header or body in an example fails here; an example that cannot run must be listed in SKIPPED
with the reason."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.auth import Scope
from app.auth import store as key_store
from app.config import REPO_ROOT
from app.evaluate import DISTANCES_JSON, evaluate_distances, write_report
from app.gallery import db
from tests.system.live import LiveServer

pytestmark = [pytest.mark.model, pytest.mark.slow]

README = (REPO_ROOT / "README.md").read_text()
SECTION = README[README.index("\n## Endpoints\n") : README.index("\n### Errors, photo formats and limits\n")]
# Examples that are not run, and why (none: add one only with a reason a reviewer accepts).
SKIPPED: dict[str, str] = {}
# Deleting comes last, whatever the README's order: the examples after it use the person it deletes.
DESTRUCTIVE = re.compile(r"-X DELETE \S*/identities/")

# The photos the examples name: (dev person, photo index). Alice is nobody the gallery was seeded with (her first
# enrolment must not be a possible duplicate); team.jpg shows three people, the largest of them enrolled as "Bob".
PHOTOS: dict[str, tuple[str, int | str]] = {
    "alice.jpg": ("kate_winslet", 0),
    "alice2.jpg": ("kate_winslet", 1),
    "alice3.jpg": ("kate_winslet", 2),
    "probe.jpg": ("kate_winslet", 3),
    "someone.jpg": ("kate_winslet", 4),
    "a.jpg": ("bbt_amy", 0),
    "b.jpg": ("bbt_amy", 1),
    "1.jpg": ("keanu_reeves", 0),
    "2.jpg": ("keanu_reeves", 1),
    "3.jpg": ("tina_fey", 0),
    "team.jpg": ("ariel_sharon", "krasserm__Ariel_Sharon_0004.jpg"),  # three faces
}
SEEDED = ["barack_obama", "will_smith", "victoria_beckham", "simon_cowell", "robert_downey_jr", "miley_cyrus",
          "mark_ruffalo", "lindsay_lohan", "keira_knightley", "jessica_alba"]  # fmt: skip
SEED_FACES = 5  # per seeded person: 10 x 5 faces make 1,125 different-person pairs, enough to apply a FAR of 0.001


def curl_examples() -> list[str]:
    """Every line of the section's shell blocks that runs curl (a `jq ... | curl` pipe included), in order."""
    lines, fenced = [], False
    for line in SECTION.splitlines():
        if line.startswith("```"):
            fenced = line.strip() == "```sh" if not fenced else False
        elif fenced and re.search(r"(^|\|\s*)curl\s", line):
            lines.append(line)
    return lines


@dataclass
class Run:
    """One example as run: its exit status, HTTP status and body (None when curl wrote the body to a file)."""

    line: str
    exit_status: int
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reader:
    """A shell in a folder with the example photos, the server's address and the keys, as the README's reader has."""

    server: LiveServer
    folder: Path
    keys: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)  # README placeholder -> real value

    def run(self, line: str) -> Run:
        command = line.replace("http://127.0.0.1:8000", self.server.url)
        for placeholder, value in sorted(self.ids.items(), key=lambda item: -len(item[0])):  # the cursor first
            command = command.replace(placeholder, value)
        # curl as typed, plus: quiet, errors shown, and the HTTP status on a last line of its own
        script = 'curl() { command curl -sS -w "\\n%{http_code}" "$@"; }\n' + command
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.folder,
            env={"PATH": "/usr/bin:/bin", **self.keys},
            capture_output=True,
            text=True,
            timeout=120,
        )
        body, _, status = done.stdout.rpartition("\n")
        assert status.isdigit(), f"{line}\n{done.stdout}\n{done.stderr}"
        return Run(line, done.returncode, int(status), body)


def _jpeg(source: Path, target: Path) -> None:
    with Image.open(source) as image:
        image.convert("RGB").save(target, quality=95)


@pytest.fixture(scope="module")
def reader(
    models_dir: Path, dev_faces: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reader]:
    folder = tmp_path_factory.mktemp("reader")
    photos = {
        person.name: sorted(p for p in person.iterdir() if p.suffix.lower() in {".jpg", ".png"})
        for person in dev_faces.iterdir()
        if person.is_dir()
    }
    for name, (person, which) in PHOTOS.items():
        _jpeg(photos[person][which] if isinstance(which, int) else dev_faces / person / which, folder / name)
    url = f"sqlite:///{folder / 'gallery.db'}"
    server = LiveServer(
        url,
        models_dir,
        folder,
        workers=1,
        cli=True,
        environment={"FACEGATE_STORE_IMAGES": "true", "FACEGATE_AUTH__CACHE_SECONDS": "0"},
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for person in SEEDED:
                identity, added = None, 0
                for photo in photos[person]:
                    form = {"face": "largest", "allow_low_quality": "true", "allow_duplicate": "true"}
                    form |= {"identity_id": identity} if identity else {"name": person}
                    r = client.post("/enroll", files={"image": (photo.name, photo.read_bytes())}, data=form)
                    if r.status_code == 422 and r.json()["error"]["code"] == "no_face":
                        continue  # a few dev photos have no face the detector finds
                    assert r.status_code == 201, r.text
                    identity, added = r.json()["identity_id"], added + 1
                    if added == SEED_FACES:
                        break
                assert added == SEED_FACES, person
        # The keys come after the start (LiveServer waits on /admin/index, which keys would close): auth is on from
        # the next request (cache 0 s).
        engine = db.make_engine(url)
        with db.make_session_factory(engine).begin() as session:
            keys = {
                "KEY": key_store.create_key(session, name="my-app", scope=Scope.write).key,
                "ADMIN_KEY": key_store.create_key(session, name="me", scope=Scope.admin).key,
            }
        engine.dispose()
        # `facegate eval`'s distances file, written by its own writer (from made-up distances: the example is about
        # the file and the request, not these numbers).
        rng = np.random.default_rng(0)
        same, different = rng.uniform(0.05, 0.35, 300), rng.uniform(0.3, 1.2, 3000)
        evaluation = evaluate_distances([*same, *different], [True] * 300 + [False] * 3000)
        write_report(evaluation, folder / "facegate-eval")
        assert (folder / "facegate-eval" / DISTANCES_JSON).is_file()
        yield Reader(server, folder, keys)
    finally:
        server.stop()


def test_every_curl_example_of_the_endpoints_section_works(reader: Reader) -> None:
    examples = curl_examples()
    assert len(examples) >= 30, examples  # the section was found and read
    assert set(SKIPPED) <= set(examples), "a skipped example is no longer in the README"
    ordered = [e for e in examples if not DESTRUCTIVE.search(e)] + [e for e in examples if DESTRUCTIVE.search(e)]
    runs: dict[str, Run] = {}
    for line in ordered:
        if line in SKIPPED:
            continue
        run = reader.run(line)
        assert run.exit_status == 0 and 200 <= run.status < 300, f"{line}\n-> {run.status}: {run.body[:600]}"
        runs[line] = run
        if not reader.ids:  # the first example enrols Alice: the ids the later ones name
            enrolled = run.json()
            assert (enrolled["name"], enrolled["created"]) == ("Alice Example", True), enrolled
            reader.ids = {"3f2a...": enrolled["identity_id"], "9b1c...": enrolled["face_id"]}
            page = httpx.get(
                f"{reader.server.url}/identities?limit=1", headers={"X-API-Key": reader.keys["KEY"]}
            ).json()
            reader.ids["1795776000123456_3f2a..."] = page["next"]

    # What the text around the examples promises of their answers.
    def answer(ending: str) -> Any:
        return next(run for line, run in runs.items() if line.split("#")[0].rstrip().endswith(ending)).json()

    verify = next(run for line, run in runs.items() if "image_a=@a.jpg" in line).json()
    assert {"match", "distance", "threshold", "threshold_source", "far_estimate"} <= set(verify)
    assert verify["match"] is True and verify["distance"] <= verify["threshold"], verify
    identified = answer("8000/identify")["faces"][0]
    assert identified["match"]["identity_id"] == reader.ids["3f2a..."] and identified["reason"] == "accepted"
    assert answer("8000/embed")["n_images"] == 3
    assert (reader.folder / "face.jpg").read_bytes() == (reader.folder / "alice.jpg").read_bytes()
    gone = httpx.get(f"{reader.server.url}/identities/{reader.ids['3f2a...']}", headers={"X-API-Key": reader.keys["KEY"]})
    assert gone.status_code == 404  # the last example deleted her


def test_the_examples_run_with_the_keys_they_show(reader: Reader) -> None:
    """The scopes the README gives `$KEY` (write) and `$ADMIN_KEY` (admin) are the ones each example needs: an
    admin example sent with `$KEY` is refused, so the test above did not pass only because keys are ignored."""
    admin_only = next(e for e in curl_examples() if "/admin/index" in e)
    run = reader.run(admin_only.replace("$ADMIN_KEY", "$KEY"))
    assert run.status == 403, run.body
    anonymous = reader.run(next(e for e in curl_examples() if e.endswith("8000/identify")).replace(' -H "X-API-Key: $KEY"', ""))
    assert anonymous.status == 401, anonymous.body


def test_a_broken_example_would_fail(reader: Reader) -> None:
    """The harness catches what it is for: a misspelt field and a wrong path are not 2xx."""
    line = next(e for e in curl_examples() if "image_a=@a.jpg" in e)
    assert reader.run(line.replace("image_a=", "imageA=")).status == 422
    assert reader.run(line.replace("/verify", "/verfy")).status == 404


def test_shell_quoting_of_the_examples_is_valid() -> None:
    for line in curl_examples():
        shlex.split(line, comments=True)  # an unbalanced quote would raise

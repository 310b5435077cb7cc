"""The README's curl examples, run as a reader would type them: every command of its "Endpoints" section's shell
blocks, with the real curl (and jq) through bash, against a real server (`facegate serve`, one worker, a SQLite
gallery, stored photos on as the stored-photo example says), top to bottom in the README's order.

Only what a reader substitutes is substituted: the address, the placeholder ids (`3f2a...` is the identity the
first example enrolled, `9b1c...` its face, the cursor a real `next`) and the photos (dev-set faces saved as the
JPEGs the examples name). `$KEY` and `$ADMIN_KEY` are made by the Quick start's own `facegate keys create` lines
before the server starts, so the server runs with authentication on and every example's scope is checked. The
gallery is seeded with other people first, so that calibrating from it and evaluating it have data, as on a real
deployment, and `facegate-eval/` is written by `facegate eval` itself. A wrong field, path, header or body in an
example fails here; an example that cannot run must be listed in SKIPPED with the reason. The README's other curl
lines (Quick start, API keys, CORS) are run by their own tests below, with the commands beside them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.config import REPO_ROOT
from tests.system.live import LiveServer

pytestmark = [pytest.mark.model, pytest.mark.slow]

README = (REPO_ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent  # where `facegate` is, as after `. .venv/bin/activate`
# Examples that are not run, and why (none: add one only with a reason a reviewer accepts).
SKIPPED: dict[str, str] = {}

# The photos the examples name: (dev person, photo index or file name), or None for a photo of no one. Alice is
# nobody the gallery was seeded with (her first enrolment must not be a possible duplicate); team.jpg shows three
# people, the largest of them enrolled as "Bob"; 2.jpg has no face, as in the README's sample answer of /embed.
PHOTOS: dict[str, tuple[str, int | str] | None] = {
    "alice.jpg": ("kate_winslet", 0),
    "alice2.jpg": ("kate_winslet", 1),
    "alice3.jpg": ("kate_winslet", 2),
    "probe.jpg": ("kate_winslet", 3),
    "someone.jpg": ("kate_winslet", 7),  # clearly her: photo 4 is borderline once her 2 faces count (identify)
    "a.jpg": ("bbt_amy", 0),
    "b.jpg": ("bbt_amy", 1),
    "1.jpg": ("keanu_reeves", 0),
    "2.jpg": None,
    "3.jpg": ("keanu_reeves", 1),
    "team.jpg": ("ariel_sharon", "krasserm__Ariel_Sharon_0004.jpg"),  # three faces
}
SEEDED = ["barack_obama", "will_smith", "victoria_beckham", "simon_cowell", "robert_downey_jr", "miley_cyrus",
          "mark_ruffalo", "lindsay_lohan", "keira_knightley", "jessica_alba"]  # fmt: skip
SEED_FACES = 5  # per seeded person: 10 x 5 faces make 1,125 different-person pairs, enough to apply a FAR of 0.001
EVAL_PAIRS = 15  # same and different dev pairs for `facegate eval` (it needs 10 of each for its 10 folds)

# What the text around each example says its answer holds (the fields it names), by a pattern of the example.
DOCUMENTED: dict[str, set[str]] = {
    # "the identity id, the face id, the box (left/top/right/bottom ...), the detector score, the 5 landmarks ..."
    r'name="Alice Example"': {"identity_id", "face_id", "box", "left", "top", "right", "bottom", "score",
                              "landmarks", "quality"},  # fmt: skip
    r"8000/identify$": {"candidates", "identity_id", "name", "face_id", "distance", "match", "reason", "margin",
                        "ambiguous", "ratio", "score", "score_threshold", "accept_distance", "fpir_estimate",
                        "faces_detected"},  # fmt: skip
    r"8000/identify/batch$": {"n_images", "n_errors", "images", "index", "filename", "error", "result", "faces",
                              "threshold", "gallery_size"},  # fmt: skip
    r"offset=0&limit=50": {"items", "total", "start", "next"},
    r'KEY" http://127\.0\.0\.1:8000/calibration$': {"threshold", "threshold_source", "default_table"},
    r"8000/readyz": {"models_loaded", "providers", "detector", "embedder", "database", "gallery_size",
                     "stale_faces", "model_version"},  # fmt: skip
    r"8000/metrics/summary": {"routes", "p50_ms", "p95_ms", "max_ms"},
    r"8000/admin/index": {"pid", "size", "identities", "last_change_id", "face_ids_sha256"},
}


def section(title: str, level: int = 2) -> str:
    """The README's section headed `title` at `level` (2: `## title`), its sub-sections included: up to the next
    heading of that level or above (`## `, `### `: not a `# comment` of a shell block)."""
    start = README.index(f"\n{'#' * level} {title}\n") + 1
    end = re.compile(rf"^#{{2,{level}}} ", re.MULTILINE).search(README, start + 1)
    return README[start : end.start() if end else None]


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block of `text`, in order."""
    blocks: list[tuple[str, list[str]]] = []
    language: str | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language = line[3:].strip()
                blocks.append((language, []))
            else:
                language = None
        elif language is not None:
            blocks[-1][1].append(line)
    return blocks


def commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: a line ending in a backslash joined with the next, blank lines and comments left
    out (a comment after a command stays: bash drops it)."""
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    assert not pending, f"a command continued past the end of its block: {pending}"
    return out


def shell_commands(text: str) -> list[str]:
    """The commands of the shell blocks of `text`, in order."""
    return [c for language, lines in fenced_blocks(text) if language == "sh" for c in commands(lines)]


# A command that runs curl (alone, or at the end of a pipe).
CURL = re.compile(r"(^|\|\s*)curl\s")
ENDPOINTS = section("Endpoints")
QUICK_START = shell_commands(section("Quick start"))
API_KEYS = shell_commands(section("Who may call it: API keys", level=3))
CORS = shell_commands(section("Pages of other sites: CORS", level=3))


def curl_examples() -> list[str]:
    """Every command of the Endpoints section's shell blocks (a `jq ... | curl` pipe included), in order."""
    return shell_commands(ENDPOINTS)


def sample_answers() -> list[tuple[str, str]]:
    """(the first example of the shell block before it, the text) of each ```json sample answer of the section."""
    samples, last_examples = [], [""]
    for language, lines in fenced_blocks(ENDPOINTS):
        if language == "sh":
            last_examples = commands(lines)
        elif language == "json":
            samples.append((last_examples[0], "\n".join(lines)))
    return samples


def request(example: str) -> str:
    """An example without the comment after it, to match DOCUMENTED's patterns against."""
    return example.split("  #")[0].rstrip()


def field_names(value: Any) -> set[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value) | {name for item in value.values() for name in field_names(item)}
    if isinstance(value, list):
        return {name for item in value for name in field_names(item)}
    return set()


@dataclass
class Run:
    """One example as run: its exit status, HTTP status and body (empty when curl wrote the body to a file)."""

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
            env={"PATH": "/usr/bin:/bin", **self.keys},  # /usr/bin/curl and /usr/bin/jq, nothing of the test's
            capture_output=True,
            text=True,
            timeout=120,
        )
        body, _, status = done.stdout.rpartition("\n")
        assert status.isdigit(), f"{line}\n{done.stdout}\n{done.stderr}"
        return Run(line, done.returncode, int(status), body)


def _dev_photos(dev_faces: Path, person: str) -> list[Path]:
    return sorted(p for p in (dev_faces / person).iterdir() if p.suffix.lower() in {".jpg", ".png"})


def _save_photos(dev_faces: Path, folder: Path) -> None:
    """The photos the examples name, as JPEGs in the reader's folder (made here: no photo goes into the repository)."""
    for name, source in PHOTOS.items():
        if source is None:  # a photo of no one: a grey gradient
            Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(folder / name, quality=95)
            continue
        person, which = source
        path = _dev_photos(dev_faces, person)[which] if isinstance(which, int) else dev_faces / person / which
        with Image.open(path) as image:
            image.convert("RGB").save(folder / name, quality=95)


def _create_keys(env: dict[str, str], folder: Path) -> dict[str, str]:
    """Run the Quick start's `NAME=$(facegate keys create ...)` lines as written: the keys, and the scopes the README
    tells its reader to give them."""
    lines = [c for c in QUICK_START if re.match(r"\w+=\$\(facegate keys create ", c)]
    names = [c.split("=", 1)[0] for c in lines]
    assert sorted(names) == ["ADMIN_KEY", "KEY"], QUICK_START
    script = "set -e\n" + "\n".join(lines) + "\n" + "".join(f'printf "{n}=%s\\n" "${n}"\n' for n in names)
    env = env | {"PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = {name: key for name, _, key in (line.partition("=") for line in done.stdout.splitlines())}
    assert all(keys[n].startswith("fg_") for n in names), done.stdout
    return keys


def _seed(server: LiveServer, key: str, dev_faces: Path) -> None:
    """SEED_FACES faces of each SEEDED person, enrolled through the API."""
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60) as client:
        for person in SEEDED:
            identity, added = None, 0
            for photo in _dev_photos(dev_faces, person):
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


def _facegate_eval(env: dict[str, str], folder: Path, dev_faces: Path) -> None:
    """`facegate eval` on a few dev pairs, in the reader's folder with its default --out: the file the jq example
    reads is the one the command writes, where it writes it."""
    rows = (dev_faces / "pairs.csv").read_text().splitlines()
    same = [r for r in rows[1:] if r.rstrip().endswith(",1")][:EVAL_PAIRS]
    different = [r for r in rows[1:] if r.rstrip().endswith(",0")][:EVAL_PAIRS]
    (folder / "pairs.csv").write_text("\n".join([rows[0], *same, *different]) + "\n")
    done = subprocess.run(
        [str(VENV_BIN / "facegate"), "eval", "--pairs", "pairs.csv", "--images", str(dev_faces)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def reader(models_dir: Path, dev_faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    folder = tmp_path_factory.mktemp("reader")
    _save_photos(dev_faces, folder)
    server = LiveServer(
        f"sqlite:///{folder / 'gallery.db'}",
        models_dir,
        folder,
        workers=1,
        cli=True,
        environment={"FACEGATE_STORE_IMAGES": "true"},  # as the stored-photo example says
    )
    _facegate_eval(server.env(), folder, dev_faces)
    keys = _create_keys(server.env(), folder)
    server.api_key = keys["ADMIN_KEY"]  # keys exist before the start: authentication is on from the first request
    server.start()
    try:
        _seed(server, keys["KEY"], dev_faces)
        yield Reader(server, folder, keys)
    finally:
        server.stop()


def test_the_section_is_read_whole() -> None:
    """Every block of the section is a shell block of curl examples or a sample answer: a block in another
    language, or a command that is not curl, is something this test does not run yet."""
    languages = {language for language, _ in fenced_blocks(ENDPOINTS)}
    assert languages <= {"sh", "json"}, languages
    examples = curl_examples()
    assert len(examples) >= 30, examples  # the section was found and read
    assert [e for e in examples if not CURL.search(e)] == []
    assert set(SKIPPED) <= set(examples), "a skipped example is no longer in the README"
    for pattern in DOCUMENTED:
        assert len([e for e in examples if re.search(pattern, request(e))]) == 1, pattern


def test_every_curl_example_of_the_endpoints_section_works(reader: Reader) -> None:
    runs: dict[str, Run] = {}
    for line in curl_examples():  # in the README's order: each example may use what the ones above it made
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

    def answer(pattern: str) -> Any:
        return next(run for line, run in runs.items() if re.search(pattern, request(line))).json()

    # The fields the README's sample answers and the text around the examples name are in the real answers.
    for example, sample in sample_answers():
        named = set(re.findall(r'"(\w+)":', sample))
        assert named <= field_names(runs[example].json()), (example, named - field_names(runs[example].json()))
    for pattern, named in DOCUMENTED.items():
        assert named <= field_names(answer(pattern)), (pattern, named - field_names(answer(pattern)))

    # And what they say of these photos.
    verify = answer("image_a=@a.jpg")
    assert verify["match"] is True and verify["distance"] <= verify["threshold"], verify
    identified = answer("8000/identify$")["faces"][0]
    assert identified["match"]["identity_id"] == reader.ids["3f2a..."] and identified["reason"] == "accepted"
    embedded = answer("8000/embed$")  # the sample: three photos, the second without a face
    assert (embedded["n_images"], embedded["n_faces"], embedded["n_errors"]) == (3, 2, 1), embedded
    assert embedded["images"][1]["error"]["code"] == "no_face" and embedded["images"][1]["faces"] is None
    clusters = answer("8000/cluster$")["clusters"]
    assert [sorted(m["photo"] for m in c["members"]) for c in clusters] == [["1.jpg", "3.jpg"]], clusters
    assert (reader.folder / "face.jpg").read_bytes() == (reader.folder / "alice.jpg").read_bytes()
    url = f"{reader.server.url}/identities/{reader.ids['3f2a...']}"
    gone = httpx.get(url, headers={"X-API-Key": reader.keys["KEY"]})
    assert gone.status_code == 404  # the last Identities example deleted her


def test_the_examples_run_with_the_keys_they_show(reader: Reader) -> None:
    """The scopes the README gives `$KEY` (write) and `$ADMIN_KEY` (admin) are the ones each example needs: an
    admin example sent with `$KEY` is refused, so the test above did not pass only because keys are ignored."""
    admin_only = next(e for e in curl_examples() if "/admin/index" in e)
    run = reader.run(admin_only.replace("$ADMIN_KEY", "$KEY"))
    assert run.status == 403, run.body
    identify = next(e for e in curl_examples() if e.endswith("8000/identify"))
    anonymous = reader.run(identify.replace(' -H "X-API-Key: $KEY"', ""))
    assert anonymous.status == 401, anonymous.body


def test_a_broken_example_would_fail(reader: Reader) -> None:
    """The harness catches what it is for: a misspelt field and a wrong path are not 2xx."""
    line = next(e for e in curl_examples() if "image_a=@a.jpg" in e)
    assert reader.run(line.replace("image_a=", "imageA=")).status == 422
    assert reader.run(line.replace("/verify", "/verfy")).status == 404


def test_shell_quoting_of_the_examples_is_valid() -> None:
    for line in curl_examples() + readme_curl_lines():
        shlex.split(line, comments=True)  # an unbalanced quote would raise


def readme_curl_lines() -> list[str]:
    """Every command of the README's shell blocks that runs curl, wherever it is."""
    return [c for c in shell_commands(README) if CURL.search(c)]


def test_every_curl_line_of_the_readme_is_run() -> None:
    """Outside the Endpoints section the README has three curl lines, run below: the Quick start's, and those of
    the API keys and CORS sections. A new one must be run too."""
    others = [line for line in readme_curl_lines() if line not in curl_examples()]
    run_below = [line for line in QUICK_START + API_KEYS + CORS if "curl " in line]
    assert len(run_below) == 3 and others == run_below, others


def test_the_quick_start_example_works(reader: Reader) -> None:
    """The Quick start's enrolment, with the keys its lines above made (after the Endpoints examples, which
    deleted their Alice at the end)."""
    line = next(c for c in QUICK_START if "curl " in c)
    answer = reader.run(line)
    assert answer.status == 201, answer.body[:600]
    assert (answer.json()["name"], answer.json()["created"]) == ("Alice Example", True)


def _facegate(reader: Reader, line: str) -> subprocess.CompletedProcess[str]:
    """A `facegate ...` line of the README, run as written with the server's settings (its database)."""
    env = reader.server.env() | {"PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", "-c", line], cwd=reader.folder, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_api_keys_example_works(reader: Reader) -> None:
    """The API keys section's commands as written: a read key made for a door, listed without its secret, let in
    by /identify with either header, and refused once revoked (within the key cache's 5 s)."""
    create, listing, revoke, curl_line = API_KEYS
    assert create.startswith("facegate keys create --name door-7 --scope read"), API_KEYS
    made = _facegate(reader, create)
    key = made.stdout.strip()
    assert made.returncode == 0 and re.fullmatch(r"fg_[0-9a-f]{8}_\S{43}", key), made.stdout + made.stderr
    prefix = key.split("_")[1]
    listed = _facegate(reader, listing)
    assert listed.returncode == 0 and "door-7" in listed.stdout and prefix in listed.stdout, listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout  # never the secret
    placeholder = re.search(r"fg_1a2b3c4d_\.\.\.", curl_line)
    assert placeholder is not None, curl_line
    with_key = curl_line.replace(placeholder.group(), key)
    answer = reader.run(with_key)
    assert answer.status == 200 and answer.json()["faces"][0]["reason"], answer.body[:600]
    bearer = with_key.replace("X-API-Key: ", "Authorization: Bearer ")  # "or Authorization: Bearer"
    assert reader.run(bearer).status == 200
    assert reader.run(with_key.replace("/identify", "/enroll")).status == 403  # a read key does not enrol
    revoked = _facegate(reader, revoke.replace("1a2b3c4d", prefix))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    deadline = time.monotonic() + 15
    while (status := reader.run(with_key).status) == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == 401


def test_the_cors_example_works(models_dir: Path, reader: Reader, tmp_path: Path) -> None:
    """The CORS section's server command (its settings as written; only the port is the test's) and preflight: the
    page's origin is allowed the POST with its key header."""
    serve, preflight = CORS
    words = shlex.split(serve, comments=True)
    settings = dict(word.split("=", 1) for word in words if "=" in word and word.startswith("FACEGATE_"))
    assert words[len(settings) :] == ["facegate", "serve"] and settings, serve
    server = LiveServer(f"sqlite:///{tmp_path / 'g.db'}", models_dir, tmp_path, workers=1, cli=True,
                        environment=settings)  # fmt: skip
    server.start()
    try:
        answer = Reader(server, reader.folder, {}).run(preflight)
    finally:
        server.stop()
    assert answer.exit_status == 0 and answer.status == 200, answer.body
    headers = {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in answer.body.splitlines()[1:])
        if value
    }
    assert headers["access-control-allow-origin"] == "https://login.example.com", headers
    assert "POST" in headers["access-control-allow-methods"], headers
    assert "x-api-key" in headers["access-control-allow-headers"].lower(), headers

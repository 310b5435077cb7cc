"""The `facegate` command line on the real models: db upgrade, enroll DIR, verify A B, identify IMAGE.

Commands read their settings from the environment (FACEGATE_*), as in production; each test points them at a
fresh SQLite file. Photos are linked (not copied) into a temporary folder-per-person tree.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.interrupts import interrupted_on_call
from tests.system.live import LiveServer

pytestmark = pytest.mark.model

AMY = ["bbt_amy/face-api__amy1.png", "bbt_amy/face-api__amy2.png", "bbt_amy/face-api__amy3.png"]
RAJ = ["bbt_raj/face-api__raj1.png", "bbt_raj/face-api__raj2.png"]


@pytest.fixture
def env(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "cli.db"
    monkeypatch.setenv("FACEGATE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FACEGATE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("FACEGATE_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    return db


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_db_upgrade(env: Path) -> None:
    code, out = run("db", "upgrade")
    assert code == 0, out
    assert env.exists() and "database at revision" in out
    revision = out.split("revision ")[1].split()[0]
    assert f"(head {revision})" in out


def test_verify_exit_status_is_the_decision(env: Path, dev_faces: Path) -> None:
    code, out = run("verify", str(dev_faces / AMY[0]), str(dev_faces / AMY[1]))
    assert code == 0 and out.startswith("MATCH: distance "), out
    code, out = run("verify", "--json", str(dev_faces / AMY[0]), str(dev_faces / RAJ[0]))
    assert code == 1, out
    body = json.loads(out)
    assert body["match"] is False and body["distance"] > body["threshold"] == pytest.approx(0.36)
    code, out = run("verify", "--threshold", "1.5", "--json", str(dev_faces / AMY[0]), str(dev_faces / RAJ[0]))
    assert code == 0 and json.loads(out)["threshold_source"] == "request"


def test_verify_creates_no_gallery_and_reads_an_existing_ones_threshold(
    env: Path, dev_faces: Path, models_dir: Path
) -> None:
    """`verify A B` compares two photos, yet it created an empty SQLite gallery at FACEGATE_DATABASE_URL (by default
    ./facegate.db in whatever folder it ran from). Without one it decides at the configured threshold; a gallery
    that exists still gives its calibrated deployment threshold."""
    from app.gallery import Gallery
    from app.vision.models import load_manifest

    photos = (str(dev_faces / AMY[0]), str(dev_faces / AMY[1]))  # 0.15 apart
    code, out = run("verify", "--json", *photos)
    assert code == 0 and json.loads(out)["threshold_source"] == "settings", out
    assert not env.exists()

    assert run("db", "upgrade")[0] == 0
    version = load_manifest(models_dir, verify=False).model_version
    gallery = Gallery.open(f"sqlite:///{env}", version)
    try:
        gallery.set_setting("threshold", {"threshold": 0.1, "model_version": version}, source="test")
    finally:
        gallery.close()
    code, out = run("verify", "--json", *photos)
    body = json.loads(out)
    assert code == 1 and body["threshold_source"] == "deployment" and body["threshold"] == pytest.approx(0.1), out


def test_verify_reports_errors(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """The error names the file it is about: `verify A B` printed the same line whichever photo was refused."""
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    for photos in ((text, dev_faces / AMY[0]), (dev_faces / AMY[0], text)):
        code, out = run("verify", *map(str, photos))
        assert code == 2 and out.startswith(f"error: {text}: invalid_image: "), out


def test_a_fifo_or_device_is_refused_not_read(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes and /dev/zero never ends: both are refused before being opened."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)

    def unblock() -> None:  # if the command did open the FIFO, end its read so that the test fails, not hangs
        with open(fifo, "wb"):
            pass

    writer = threading.Timer(20.0, unblock)
    writer.start()
    try:
        code, out = run("identify", str(fifo))
    finally:
        writer.cancel()
    assert code == 2 and f"cannot read {fifo}: not a regular file" in out, out
    code, out = run("verify", "/dev/zero", str(dev_faces / AMY[0]))
    assert code == 2 and "cannot read /dev/zero: not a regular file" in out, out


def test_enroll_directory_then_identify(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    people = tmp_path / "people"
    for relative in AMY[:2] + RAJ:
        person = people / relative.split("/")[0]
        person.mkdir(parents=True, exist_ok=True)
        (person / Path(relative).name).symlink_to(dev_faces / relative)
    (people / "broken").mkdir()
    (people / "broken" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    result = CliRunner().invoke(cli, ["enroll", str(people), "--photos", "all"])
    code, out = result.exit_code, result.output
    assert code == 1, out  # one photo failed
    assert "2 identities created, 2 faces added to existing ones, 1 photos failed." in out
    assert "Enrolling" not in result.stdout  # the progress bar is on stderr: stdout is the summary alone
    assert "x.png: invalid_image" in out

    # a second run adds to the same identities instead of duplicating people, and skips the photos they already have
    code, out = run("enroll", str(people), "--photos", "first")
    assert "0 faces added to existing ones, 2 photos already enrolled (skipped), 1 photos failed." in out

    code, out = run("identify", str(dev_faces / AMY[2]), "--json")
    assert code == 0, out
    body = json.loads(out)
    assert len(body["faces"]) == 1
    names = [c["name"] for c in body["faces"][0]["candidates"]]
    assert names == ["bbt_amy", "bbt_raj"]
    assert body["faces"][0]["match"] is not None
    # the decision explained as /identify explains it (the JSON had the reason and candidates only)
    face = body["faces"][0]
    assert (body["gallery_size"], body["identities"], body["target_fpir"]) == (4, 2, 0.01)
    assert face["score"] <= face["score_threshold"] and face["fpir_estimate"] <= body["target_fpir"]
    assert face["candidates"][0]["distance"] <= face["accept_distance"]
    assert face["margin"] == pytest.approx(face["candidates"][1]["distance"] - face["candidates"][0]["distance"])
    assert face["ratio"] == pytest.approx(face["candidates"][0]["distance"] / face["candidates"][1]["distance"])

    code, out = run("identify", str(dev_faces / AMY[2]))
    assert code == 0 and "bbt_amy" in out and "1 face(s), gallery of 4 faces of 2 identities" in out
    assert "target FPIR 1 %" in out and f"score {face['score']:.3f}, named at <= {face['score_threshold']:.3f}" in out


def test_enroll_again_finds_a_folders_person_however_its_name_is_spelt_on_disk(
    env: Path, dev_faces: Path, tmp_path: Path
) -> None:
    """A re-run did not find the identity of a folder named "Amy " (enrolled as "Amy"), nor of "Élodie" once the
    folder came back from a Mac named in decomposed Unicode: it tried to enrol them anew, and each was refused as a
    possible duplicate of itself (with --allow-duplicate, enrolled twice)."""
    people = tmp_path / "people"
    amy, raj = people / "Amy ", people / "\u00c9lodie"  # a trailing space; É as one character
    for folder, photo in ((amy, AMY[0]), (raj, RAJ[0])):
        folder.mkdir(parents=True)
        (folder / "1.png").symlink_to(dev_faces / photo)
    code, out = run("enroll", str(people))
    assert code == 0 and "2 identities created" in out, out
    raj.rename(people / "E\u0301lodie")  # as a Mac's file system names it
    for flags in ((), ("--allow-duplicate",)):
        code, out = run("enroll", str(people), *flags)
        assert code == 0, out
        assert "0 identities created, 0 faces added to existing ones, 2 photos already enrolled (skipped)" in out, out
    code, out = run("identify", str(dev_faces / AMY[1]))
    assert code == 0 and "gallery of 2 faces" in out, out


def test_enroll_again_adds_only_the_new_photos(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """Running `enroll DIR` again (after Ctrl-C, or to retry the photos that failed) added every photo of a person
    already enrolled a second time: the same face twice in the identity, again on every run."""
    amy = tmp_path / "people" / "bbt_amy"
    amy.mkdir(parents=True)
    (amy / "1.png").symlink_to(dev_faces / AMY[0])
    code, out = run("enroll", str(tmp_path / "people"))
    assert code == 0 and "1 identities created, 0 faces added to existing ones, 0 photos failed." in out, out

    (amy / "2.png").symlink_to(dev_faces / AMY[1])
    for _ in range(2):
        code, out = run("enroll", str(tmp_path / "people"), "--photos", "all")
        assert code == 0, out
    assert "0 identities created, 0 faces added to existing ones, 2 photos already enrolled (skipped)" in out, out
    code, out = run("identify", str(dev_faces / AMY[2]))
    assert code == 0 and "gallery of 2 faces" in out, out


def test_a_folder_whose_first_face_is_a_duplicate_stays_out_on_every_run(
    env: Path, dev_faces: Path, tmp_path: Path
) -> None:
    """A new folder whose first face matched another identity was refused for that photo only: its next photo
    created the identity, and running `enroll DIR` again added the refused face to it, unchecked (neither of the
    two ways its message offered), so that amy's photos were then found ambiguous between amy and bob."""
    people = tmp_path / "people"
    for relative, photo in (("amy/1.png", AMY[0]), ("bob/a.png", AMY[1]), ("bob/b.png", RAJ[0])):
        (people / relative).parent.mkdir(parents=True, exist_ok=True)
        (people / relative).symlink_to(dev_faces / photo)
    for summary in ("1 identities created, 0 faces added to existing ones, 2 photos failed.",
                    "0 identities created, 0 faces added to existing ones, 1 photos already enrolled (skipped), "
                    "2 photos failed."):  # fmt: skip
        code, out = run("enroll", str(people), "--photos", "all")
        assert code == 1 and summary in out, out
        assert f"  {people / 'bob' / 'a.png'}: possible_duplicate: this face already matches identity 'amy'" in out
        assert f"  {people / 'bob' / 'b.png'}: possible_duplicate: its folder was skipped: a.png matches another " \
            "identity" in out  # fmt: skip
    code, out = run("identify", str(dev_faces / AMY[2]))
    assert code == 0 and "gallery of 1 faces" in out and ": amy (" in out, out


def test_ctrl_c_during_enroll_says_what_stays_enrolled(
    env: Path, dev_faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C ended enroll with no word (exit status 130). One line now says what stays enrolled, and running the
    command again enrols the rest and skips what was enrolled."""
    from app.cli import people as people_cli
    from app.cli.common import read_bytes as read

    people = tmp_path / "people"
    for relative in AMY[:2] + RAJ:
        (people / relative.split("/")[0]).mkdir(parents=True, exist_ok=True)
        (people / relative).symlink_to(dev_faces / relative)
    monkeypatch.setattr(people_cli, "read_bytes", interrupted_on_call(3, read))  # between two photos
    result = CliRunner().invoke(cli, ["enroll", str(people), "--photos", "all"])
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        "interrupted: 1 identities created and 1 faces added so far stay enrolled; run the same command again to "
        "enrol the rest (photos already enrolled are skipped)"
    )
    monkeypatch.setattr(people_cli, "read_bytes", read)
    code, out = run("enroll", str(people), "--photos", "all")
    assert code == 0 and "1 identities created, 1 faces added to existing ones, 2 photos already enrolled (skipped), " \
        "0 photos failed." in out, out  # fmt: skip
    code, out = run("identify", str(dev_faces / AMY[2]))
    assert code == 0 and "gallery of 4 faces" in out, out


def test_enroll_refuses_a_folder_name_with_a_bidi_override(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """The command line takes names from folder names: the same rule as the API."""
    person = tmp_path / "people" / "Alice\u202egnp.exe"
    person.mkdir(parents=True)
    (person / "a.png").symlink_to(dev_faces / AMY[0])
    code, out = run("enroll", str(tmp_path / "people"))
    assert code == 1, out
    assert "0 identities created, 0 faces added to existing ones, 1 photos failed." in out
    assert "a.png: invalid_request: name must not contain invisible bidirectional controls" in out


def test_a_file_name_with_a_line_break_or_escape_stays_on_its_line(env: Path, tmp_path: Path) -> None:
    """Failure lines printed the path as is: a line break split the line in two, an escape drove the terminal."""
    person = tmp_path / "people" / "bob\nsmith"
    person.mkdir(parents=True)
    (person / "\x1b[2Jx.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out = run("enroll", str(tmp_path / "people"))
    assert code == 1, out
    line = out.splitlines()[-1]
    assert line.endswith("/bob\\nsmith/\\x1b[2Jx.png: invalid_request: name must not contain control characters "
                         "or line breaks"), out
    assert "\x1b" not in out


def test_a_folder_name_that_is_not_utf8_is_called_so(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """A folder named in another encoding (Latin-1 "café": the byte 0xE9) reaches Python as a lone surrogate: it was
    refused as holding "control characters", and its path printed as \\udce9 rather than the byte."""
    people = tmp_path / "people"
    people.mkdir()
    folder = os.fsencode(people) + b"/caf\xe9"
    os.mkdir(folder)
    os.symlink(dev_faces / AMY[0], folder + b"/a.png")
    code, out = run("enroll", str(people))
    assert code == 1, out
    assert out.splitlines()[-1] == f"  {people}/caf\\xe9/a.png: invalid_request: name is not valid UTF-8 (lone " \
        "surrogate U+DCE9 at index 3, as a file or folder name in another encoding gives)"  # fmt: skip


def test_an_unreadable_folder_is_reported_not_a_traceback(
    env: Path, dev_faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder without read permission (simulated: the tests may run as root) ended enroll with a traceback."""
    people = tmp_path / "people"
    for name in ("bbt_amy", "locked"):
        (people / name).mkdir(parents=True)
    (people / "bbt_amy" / "1.png").symlink_to(dev_faces / AMY[0])
    listing = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        if self.name in ("locked", "locked-top"):
            raise PermissionError(13, "Permission denied")
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    code, out = run("enroll", str(people))
    assert code == 1, out
    assert "1 identities created, 0 faces added to existing ones, 1 photos failed." in out
    assert f"  {people / 'locked'}: unreadable: cannot read the folder: Permission denied" in out
    (tmp_path / "locked-top").mkdir()
    code, out = run("enroll", str(tmp_path / "locked-top"))
    assert code == 2 and f"error: cannot read {tmp_path / 'locked-top'}: Permission denied" in out, out


def test_option_help_says_what_raising_or_lowering_does() -> None:
    result = CliRunner().invoke(cli, ["verify", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "Lower it for fewer false accepts" in text and "raise it for the opposite" in text


def test_serve_without_api_keys_stays_on_loopback(env: Path, models_dir: Path, tmp_path: Path) -> None:
    """`facegate serve` runs the app factory under uvicorn; with no API keys and no host asked for, it listens on
    127.0.0.1 only and says so."""
    server = LiveServer(f"sqlite:///{env}", models_dir, tmp_path, workers=1, cli=True)  # no FACEGATE_HOST
    server.start()
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        assert ready.status_code == 200, server.log_text()
        assert ready.json()["ready"] is True
    finally:
        server.stop()
    assert "every route is open, so facegate listens on 127.0.0.1 only" in server.log_text()


def test_several_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """`facegate serve --workers N` gives each process its share of the cores where threads are left at "one per
    core", and leaves alone what the operator set."""
    from app.cli import share_cores
    from app.config import Settings

    for name in ("FACEGATE_RUNTIME__INTRA_OP_THREADS", "FACEGATE_BATCHING__WORKERS"):
        monkeypatch.delenv(name, raising=False)
    assert share_cores(Settings(), 1, 16) == {}
    assert share_cores(Settings(), 4, 16) == {"FACEGATE_RUNTIME__INTRA_OP_THREADS": "4", "FACEGATE_BATCHING__WORKERS": "4"}
    assert share_cores(Settings(), 4, 2) == {"FACEGATE_RUNTIME__INTRA_OP_THREADS": "1", "FACEGATE_BATCHING__WORKERS": "1"}
    monkeypatch.setenv("FACEGATE_BATCHING__WORKERS", "3")
    settings = Settings()
    assert settings.batching.workers == 3
    assert share_cores(settings, 2, 16) == {"FACEGATE_RUNTIME__INTRA_OP_THREADS": "8"}


def test_advice_in_errors_names_the_command_line_options(env: Path, dev_faces: Path, tmp_path: Path) -> None:
    """The service's messages name API fields (face=largest, allow_duplicate=true); the CLI says its options."""
    group = dev_faces / "ariel_sharon/krasserm__Ariel_Sharon_0004.jpg"  # three faces
    code, out = run("verify", str(group), str(dev_faces / AMY[0]))
    assert code == 2 and out.strip().endswith("send a photo with one face or pass --face largest"), out
    people = tmp_path / "people"
    for folder, photo in (("amy", AMY[0]), ("amy again", AMY[1]), ("group", str(group))):
        (people / folder).mkdir(parents=True)
        (people / folder / Path(photo).name).symlink_to(dev_faces / photo)
    code, out = run("enroll", str(people))
    assert code == 1 and "1 identities created, 0 faces added to existing ones, 2 photos failed." in out, out
    assert "name the folder after it to add the face to it, or pass --allow-duplicate" in out
    assert "pass --face largest" in out and "=true" not in out and "face=largest" not in out


def test_identify_says_when_a_crowd_photo_was_capped(
    env: Path, dev_faces: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A photo with more faces than FACEGATE_DETECTOR__MAX_FACES: the text says how many were found, as the JSON's
    faces_detected does, not only the faces it lists."""
    group = str(dev_faces / "ariel_sharon/krasserm__Ariel_Sharon_0004.jpg")  # three faces
    assert run("db", "upgrade")[0] == 0
    code, out = run("identify", group)
    assert code == 0 and out.startswith("3 face(s), "), out
    monkeypatch.setenv("FACEGATE_DETECTOR__MAX_FACES", "2")
    code, out = run("identify", group)
    assert code == 0 and out.startswith("2 of 3 faces found (the most confident; FACEGATE_DETECTOR__MAX_FACES), "), out
    assert out.count("\nface ") == 2
    code, out = run("identify", group, "--json")
    assert code == 0 and json.loads(out)["faces_detected"] == 3

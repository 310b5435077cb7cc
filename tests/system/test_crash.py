"""kill -9 in the middle of a bulk enrolment (many concurrent POST /enroll), restart, repeat. After each restart the
app starts cleanly (migrations, index load) and every enrolment that got a 2xx is present and searchable; no face
row lacks its identity or embedding, no identity is half-written (each enrolment is one identity with one face),
and the change log replays to the face table. PostgreSQL and SQLite (WAL), two workers each; on PostgreSQL one
worker is also killed alone while the other goes on enrolling and uvicorn starts a replacement, which loads its index
while writes continue."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.system.consistency import DatabaseState, assert_workers_agree, identity_names, read_database
from tests.system.live import START_TIMEOUT_S, LiveServer
from tests.system.traffic import CLIENT_TIMEOUT_S, Ledger, enrol_until, top_candidate

pytestmark = [pytest.mark.model, pytest.mark.slow]

CLIENTS = 12  # concurrent enrolments in flight when the kill comes
# Each round kills once the round has this many acknowledged enrolments (drawn per round), so that the kill falls
# while requests are at every stage: upload, detection, embedding, the transaction, the commit, the reply.
ACKS_BEFORE_KILL = (4, 16)
ROUND_LIMIT_S = 60.0


def enrol_until_killed(
    server: LiveServer, ledger: Ledger, acks_wanted: int, round_no: int, *, worker_kill: bool
) -> None:
    """CLIENTS threads enrol new people (a photo and name never sent before) until the server is killed under them.
    With `worker_kill`, one worker is killed first, half-way, and the enrolments go on while its replacement starts."""
    start_acks = len(ledger.faces)
    stop = threading.Event()

    def client(k: int) -> None:
        enrol_until(stop, server.url, ledger, f"r{round_no} c{k}")  # the kill cuts those in flight

    def wait_for_acks(count: int) -> None:
        deadline = time.monotonic() + ROUND_LIMIT_S
        while len(ledger.faces) - start_acks < count:
            assert time.monotonic() < deadline, "enrolments did not get through"
            time.sleep(0.005)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        if worker_kill:
            wait_for_acks(acks_wanted // 2)
            victim = next(iter(server.worker_states()))
            server.kill_worker(victim)
            assert victim not in server.worker_states(timeout=START_TIMEOUT_S), "no new worker replaced the killed one"
            start_acks = len(ledger.faces)
        wait_for_acks(acks_wanted)
    finally:
        stop.set()  # no new request; those in flight are cut by the kill
        server.kill()
        for thread in threads:
            thread.join()


def check_after_restart(server: LiveServer, url: str, ledger: Ledger) -> DatabaseState:
    database = read_database(url)  # invariants: no orphan face, 512-byte embeddings, log replays to the faces
    _, acknowledged = ledger.expected()
    missing = {f: i for f, i in acknowledged.items() if database.faces.get(f) != i}
    assert missing == {}, "acknowledged enrolments lost"
    # Every identity is a whole enrolment (one face) that some request sent: nothing half-written, nothing invented.
    faces_per_identity = {i: 0 for i in database.identities}
    for identity_id in database.faces.values():
        faces_per_identity[identity_id] += 1
    assert set(faces_per_identity.values()) <= {1}
    assert set(identity_names(url).values()) <= ledger.sent_names
    assert_workers_agree(server.worker_states(), database)
    log = server.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-4000:]
    return database


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def test_kill_9_during_bulk_enrolment_loses_no_acknowledged_face(
    backend: str, request: pytest.FixtureRequest, models_dir: Path, lfw_photos: list[Path], tmp_path: Path
) -> None:
    url = request.getfixturevalue("pg_schema_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'g.db'}"
    # Restarts cost a model load per worker: PostgreSQL gets the most rounds, and the single-worker kill.
    kills, worker_kills = (3, 1) if backend == "postgresql" else (2, 0)
    rng = random.Random(backend)
    server = LiveServer(url, models_dir, tmp_path, workers=2)
    ledger = Ledger()
    ledger.use_photos(lfw_photos)
    try:
        for round_no in range(kills):
            server.start()
            if round_no:
                check_after_restart(server, url, ledger)
            enrol_until_killed(
                server, ledger, rng.randint(*ACKS_BEFORE_KILL), round_no, worker_kill=round_no < worker_kills
            )
        server.start()
        database = check_after_restart(server, url, ledger)
        assert ledger.server_errors() == {}
        assert {k for k in ledger.outcomes if k[1] != 201} <= {("enrol", 422, "no_face")}

        # Acknowledged enrolments are searchable again after the restart (the same photo: distance ~0).
        with ledger.lock:
            acknowledged = list(ledger.faces.items())
        for face_id, (identity_id, photo) in rng.sample(acknowledged, 6):
            with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as fresh:
                best = top_candidate(fresh, photo)
            assert best is not None and (best["identity_id"], best["face_id"]) == (identity_id, face_id)
            assert best["distance"] < 1e-3
        readiness = httpx.get(f"{server.url}/readyz", timeout=CLIENT_TIMEOUT_S)
        assert readiness.status_code == 200 and readiness.json()["gallery_size"] == len(database.faces)
        unanswered = len(database.faces) - len(ledger.faces)
        sent = len(ledger.sent_names)
        print(
            f"\n{backend}: {kills} kills of the process group and {worker_kills} of a single worker, "
            f"{sent} enrolments sent, "
            f"{len(ledger.faces)} acknowledged (all present), "
            f"{unanswered} stored without an answer, {sent - len(database.faces)} unanswered and not stored"
        )
    finally:
        server.stop()


"""`facegate serve --workers 2`: /metrics and /metrics/summary describe the whole server whichever worker answers a
scrape (prometheus_client's multiprocess mode in a private directory). Requests spread over both workers are all
counted, counters never go down between scrapes, the gallery size is the gallery's (not a sum over workers), provider
and model info appear once; a worker killed and restarted by uvicorn keeps its counts but takes its gauges with it,
and the directory is gone once the server stops."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.system.live import LiveServer
from tests.system.traffic import ENROL_FORM, upload

pytestmark = [pytest.mark.model, pytest.mark.slow]

ADMIN_INDEX = 'facegate_request_duration_seconds_count{method="GET",route="/admin/index",status="200"}'
PEOPLE = 3
PER_WORKER = 6  # requests each worker must have answered
SAMPLE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$")


def scrape(server: LiveServer) -> dict[str, float]:
    """One /metrics on a fresh connection (whichever worker accepts it): sample -> value."""
    response = httpx.get(f"{server.url}/metrics", timeout=30.0)
    assert response.status_code == 200, response.text
    return {m[1]: float(m[2]) for line in response.text.splitlines() if (m := SAMPLE.match(line))}


def family(samples: dict[str, float], name: str) -> dict[str, float]:
    return {key: value for key, value in samples.items() if key == name or key.startswith(name + "{")}


def admin_index(server: LiveServer) -> int:
    """GET /admin/index on a fresh connection: the pid of the worker that answered."""
    response = httpx.get(f"{server.url}/admin/index", timeout=30.0)
    assert response.status_code == 200, response.text
    return int(response.json()["pid"])


def spread(server: LiveServer, pids: set[int]) -> int:
    """/admin/index until each worker of `pids` has answered PER_WORKER times; how many requests that took."""
    answered: Counter[int] = Counter()
    sent = 0
    deadline = time.monotonic() + 60
    while any(answered[pid] < PER_WORKER for pid in pids):
        answered[admin_index(server)] += 1
        sent += 1
        assert time.monotonic() < deadline, f"not every worker answered: {answered}"
    assert set(answered) == pids, answered
    return sent


def check_scrapes(server: LiveServer, admin_total: int, previous: dict[str, float], times: int = 6) -> dict[str, float]:
    """`times` scrapes: /admin/index counted exactly `admin_total` times, no counter below an earlier scrape's, one
    gallery size equal to the gallery's, one provider per network and one model version."""
    deadline = time.monotonic() + 5  # a worker records a request just after sending its answer
    samples = scrape(server)
    while samples.get(ADMIN_INDEX) != admin_total and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(server)
    for _ in range(times):
        assert samples.get(ADMIN_INDEX) == admin_total, (samples.get(ADMIN_INDEX), admin_total)
        for key, value in previous.items():
            if key.split("{")[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert samples.get(key, 0.0) >= value, (key, value, samples.get(key))
        assert samples["facegate_enrolments_total"] == PEOPLE
        assert family(samples, "facegate_gallery_faces") == {"facegate_gallery_faces": PEOPLE}
        providers = family(samples, "facegate_provider_info")
        assert providers == {
            'facegate_provider_info{network="detector",provider="CPUExecutionProvider"}': 1.0,
            'facegate_provider_info{network="embedder",provider="CPUExecutionProvider"}': 1.0,
        }, providers
        assert list(family(samples, "facegate_model_info").values()) == [1.0]
        previous = samples
        samples = scrape(server)
    return previous


def metrics_dir(pid: int) -> Path:
    """The worker's PROMETHEUS_MULTIPROC_DIR (from its environment, which `facegate serve` set)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert values, "the worker runs without PROMETHEUS_MULTIPROC_DIR"
    return Path(values[0])


def summary(server: LiveServer) -> dict[str, object]:
    response = httpx.get(f"{server.url}/metrics/summary", timeout=30.0)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def admin_in_summary(body: dict[str, object]) -> int:
    routes = body["routes"]
    assert isinstance(routes, list)
    return sum(int(r["count"]) for r in routes if r["route"] == "/admin/index")


def test_metrics_of_two_workers_are_the_servers(models_dir: Path, lfw_photos: list[Path], tmp_path: Path) -> None:
    server = LiveServer(f"sqlite:///{tmp_path / 'g.db'}", models_dir, tmp_path, workers=2, cli=True)
    server.start()
    try:
        pids = set(server.worker_states())
        directory = metrics_dir(next(iter(pids)))
        assert {metrics_dir(pid) for pid in pids} == {directory} and directory.name.startswith("facegate-metrics-")
        with httpx.Client(base_url=server.url, timeout=60.0, headers={"Connection": "close"}) as client:
            for i, photo in enumerate(lfw_photos[:PEOPLE]):
                response = client.post("/enroll", files=upload(photo), data={"name": f"p{i}", **ENROL_FORM})
                assert response.status_code == 201, response.text

        baseline = scrape(server)[ADMIN_INDEX]  # the start-up's probes
        sent = spread(server, pids)
        seen = check_scrapes(server, int(baseline) + sent, {})
        body = summary(server)
        assert body["workers"] == 2 and admin_in_summary(body) == baseline + sent, body

        # uvicorn's supervisor replaces a killed worker; its counts stay, its gauges go.
        dead = next(iter(pids))
        server.kill_worker(dead)
        deadline = time.monotonic() + 60
        while (pid := admin_index(server)) in pids:
            sent += 1
            assert time.monotonic() < deadline, "no new worker"
        sent += 1
        sent += spread(server, (pids - {dead}) | {pid})
        check_scrapes(server, int(baseline) + sent, seen)
        files = {p.name for p in directory.iterdir()}
        assert f"counter_{dead}.db" in files and f"histogram_{dead}.db" in files, files
        assert not [name for name in files if name.startswith("gauge_") and name.endswith(f"_{dead}.db")], files
        assert f"recent_{dead}.bin" not in files
        assert summary(server)["workers"] == 2
    finally:
        server.stop()
    assert not directory.exists(), "the metrics directory outlived the server"

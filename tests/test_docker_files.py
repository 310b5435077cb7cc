"""What can be checked of the Dockerfile, docker-compose.yml and .dockerignore without a Docker daemon (the real run is
`make docker-test`, tests/docker/compose_roundtrip.sh): nothing personal or secret in the build context, no test-only
package in the image, a non-root user under an init, readiness probes, and a stop that leaves the server its shutdown
timeout."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest

from app.config import REPO_ROOT, Settings


@cache
def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex), read with Docker's rules (moby/patternmatcher): `*` and `?` stay within one
    path segment, `**` spans any number of them, a leading `!` re-includes, and the last matching line wins."""
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exclude, re.compile(regex + r"\Z")))
    return patterns


def excluded_from_context(path: str) -> bool:
    """Whether `docker build` leaves `path` (relative, with /) out of the context: a pattern matches the path or one
    of the folders above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exclude, regex in _ignore_patterns():
        if any(regex.match(prefix) for prefix in prefixes):
            result = exclude
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "sub/.venv/lib/site.py",
        "models/dist/manifest.json",
        "models/dist/heads/h1/head.onnx",
        "bench/results/run.json",
        "facegate.db",
        "facegate.db-wal",
        "facegate.db-shm",
        "facegate.db-journal",
        "data/gallery.db",
        "data/gallery.db-wal",
        "var/people.sqlite3",
        "emb.npz",
        "facegate-eval/eval-distances.json",
        ".env",
        ".env.production",
        "app/__pycache__/main.cpython-311.pyc",
        "tests/conftest.py",
    ],
)
def test_the_build_context_leaves_out_local_state_and_personal_data(path: str) -> None:
    assert excluded_from_context(path), path


def test_the_build_context_has_every_file_the_image_is_built_from() -> None:
    """Everything the builder stage uses: pyproject.toml and its readme, the Makefile, the package, the model
    builder and the migrations, as tracked by git."""
    tracked = subprocess.run(
        ["git", "ls-files", "app", "models", "migrations", "pyproject.toml", "Makefile", "README.md"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert {"pyproject.toml", "Makefile", "README.md", "app/main.py", "models/build.py", "migrations/env.py"} <= set(
        tracked
    )
    assert [path for path in tracked if excluded_from_context(path)] == []


def test_the_image_installs_no_test_training_or_report_packages() -> None:
    """The Dockerfile installs the dependencies and the `build`, `ann` and `heic` extras (and uninstalls `build` after
    `make models`): dlib-bin, playwright, pytest, torch or matplotlib must not creep into those, nor pillow-heif, the
    tests' HEIC encoder (it bundles x265, GPL; the image's pi-heif only decodes)."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "EXTRAS=build,ann,heic" in dockerfile
    assert re.search(
        r'optional-dependencies"\]\["build"\] \+ p\["optional-dependencies"\]\["ann"\]'
        r' \+ p\["optional-dependencies"\]\["heic"\]',
        dockerfile,
    )
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    shipped = project["dependencies"] + extras["build"] + extras["ann"] + extras["heic"]
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in shipped}
    assert "pi-heif" in names
    assert names.isdisjoint(
        {"dlib-bin", "dlib", "playwright", "pytest", "schemathesis", "torch", "matplotlib", "httpx2", "pillow-heif"}
    )


def _runtime_stage() -> str:
    return (REPO_ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]


def test_the_image_runs_as_a_user_under_an_init_and_probes_readiness() -> None:
    runtime = _runtime_stage()
    user = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]', runtime, flags=re.M)
    assert re.search(r"install .*\btini\b", runtime)
    assert re.search(r'^CMD \["facegate", "serve"', runtime, flags=re.M)
    healthcheck = runtime[runtime.index("\nHEALTHCHECK") :].split("\n\n")[0]
    assert "/readyz" in healthcheck and "/healthz" not in healthcheck
    # Nothing is fetched at run time: the models are built into the image and found there.
    assert "FACEGATE_MODELS_DIR=/opt/facegate/models" in runtime
    assert "COPY --from=builder /opt/facegate/models /opt/facegate/models" in runtime


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_compose_waits_for_the_database_probes_readiness_and_stops_gracefully() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    api, db = compose["services"]["api"], compose["services"]["db"]
    assert api["depends_on"]["db"]["condition"] == "service_healthy" and "healthcheck" in db
    assert api["restart"] == db["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    timeout = float(api["environment"].get("FACEGATE_SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default))
    # the lifespan shutdown (models, connections) and the interpreter's exit need a few seconds more
    assert _seconds(api["stop_grace_period"]) >= timeout + 5
    # Secrets come from the environment at `up`, never a literal in the file (which the image does not contain).
    assert api["environment"]["FACEGATE_AUTH__BOOTSTRAP_KEY"].startswith("${")
    assert excluded_from_context("docker-compose.yml")


def test_docker_test_tears_down_and_shows_the_logs_when_the_build_fails(tmp_path: Path) -> None:
    """`make docker-test` cleans up whatever way it ends: a failed build (or `up`, or a Ctrl-C during either) still
    gets the compose logs printed and `docker-compose down -v`. Run against stand-ins for docker and docker-compose
    on PATH (this machine's docker is not used): they record their arguments, and the build fails."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    (stubs / "docker").write_text("#!/bin/sh\nexit 0\n")  # `docker info`, `docker image inspect`: present
    (stubs / "docker-compose").write_text(
        f'#!/bin/sh\necho "$*" >>{calls}\ncase " $* " in *" build "*) echo "build broke" >&2; exit 1 ;; esac\nexit 0\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    photos = tmp_path / "faces" / "dev"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"not read before the build")
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "FACEGATE_FACES_DIR": str(tmp_path / "faces"),
        "ENROLL_PHOTO": "a.jpg",
        "SAME_PHOTO": "a.jpg",
        "OTHER_PHOTO": "a.jpg",
        "FACEGATE_PUBLISH_PORT": "1",  # not bound: nothing is started
    }
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "tests" / "docker" / "compose_roundtrip.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "unbound variable" not in result.stderr, result.stderr
    commands = calls.read_text().splitlines()
    build = next(i for i, c in enumerate(commands) if c.endswith(" build api"))
    after = commands[build + 1 :]
    assert any(" logs " in f" {c} " for c in after), commands
    assert any(c.endswith("down -v --remove-orphans") for c in after), commands

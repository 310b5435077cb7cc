"""Browser fixtures: the real app served by uvicorn in a thread on a free port, and Debian's Chromium driven by
Playwright (no browser download: `executable_path` points at the system's Chromium, which `make test` installs).

Screenshots of every page go to FACEGATE_UI_SCREENSHOTS (default /tmp/facegate-ui-screenshots), outside the
repository: they show real people's faces and are never committed.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from app.api.request_timeouts import TimedH11Protocol
from app.config import Settings
from app.main import create_app
from tests.system.live import free_port

CHROMIUM = os.environ.get("FACEGATE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(os.environ.get("FACEGATE_UI_SCREENSHOTS", "/tmp/facegate-ui-screenshots"))


@dataclass
class LiveServer:
    url: str
    settings: Settings
    app: FastAPI


def serve(settings: Settings) -> Iterator[LiveServer]:
    """Run the app (lifespan included: models, migrations, index) until the generator is closed, under the HTTP
    protocol `facegate serve` uses (its request time limits at the settings' values)."""
    port = free_port()
    protocol = type(
        "ServedProtocol",
        (TimedH11Protocol,),
        {"request_timeout": settings.request_timeout, "request_idle_timeout": settings.request_idle_timeout},
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=protocol
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def ui_settings(models_dir: Path, db: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": models_dir,
        "database_url": f"sqlite:///{db}",
        "runtime": {"providers": ["CPUExecutionProvider"]},
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server per test module on an empty SQLite gallery, auth off (no keys)."""
    yield from serve(ui_settings(models_dir, tmp_path_factory.mktemp("ui") / "gallery.db"))


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (`make test` installs Debian's chromium; FACEGATE_TEST_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@dataclass
class Console:
    """Everything the page printed to its console, and uncaught exceptions."""

    messages: list[tuple[str, str]] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [text for kind, text in self.messages if kind in ("error", "pageerror")]


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, Console]]:
    """A fresh browser context (own sessionStorage) on a desktop-sized window, with its console collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    console = Console()
    p.on("console", lambda m: console.messages.append((m.type, m.text)))
    p.on("pageerror", lambda e: console.messages.append(("pageerror", str(e))))
    yield p, console
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

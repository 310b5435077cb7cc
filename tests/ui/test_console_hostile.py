"""Hostile data in the console: names, metadata, file names, error messages and links carrying HTML or script are
shown as text and never run; long names, right-to-left text and emoji do not widen the page on a phone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ui.conftest import Console, LiveServer
from tests.ui.test_console import AMY, RAJ, failed_loads, open_page

pytestmark = [pytest.mark.model, pytest.mark.slow]

# Each would set window.__xss or open a dialog if it reached the page as HTML (or as a URL).
NAMES = [
    '<img src=x onerror="window.__xss=1;alert(1)">',
    '"><svg onload="window.__xss=2">',
    "</td><script>window.__xss=3</script>",
    "javascript:window.__xss=4//",
    "ליאור כהן 🙂 عائشة",
    "W" * 200,  # the longest name the API takes, with nowhere to break it
]
METADATA = {"note": "<b onmouseover=alert(1)>bold</b>", "list": ["<script>window.__xss=5</script>"], "n": 42}
# A script run, a dialog opened, or an element made from the text (its attributes) shows the data went in as HTML.
INJECTED = (
    "window.__xss !== undefined || !!document.querySelector('[onerror], [onload], [onmouseover], script:not([src])')"
)


@pytest.fixture
def watched(page: tuple[Any, Console]) -> Iterator[tuple[Any, Console, list[str]]]:
    p, console = page
    dialogs: list[str] = []

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    p.on("dialog", dismiss)
    yield p, console, dialogs
    assert p.evaluate(INJECTED) is False and dialogs == []


def test_names_metadata_and_messages_are_shown_as_text(
    watched: tuple[Any, Console, list[str]], live: LiveServer, dev_faces: Path
) -> None:
    p, console, dialogs = watched
    photo = (dev_faces / AMY[0]).read_bytes()
    with httpx.Client(base_url=live.url, timeout=60) as api:
        ids = []
        for name in NAMES:
            r = api.post(
                "/enroll",
                files={"image": ("face.png", photo, "image/png")},
                data={"name": name, "allow_duplicate": "true", "metadata": json.dumps(METADATA)},
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["identity_id"])
        try:
            open_page(p, live, "gallery")
            for name in NAMES:
                p.get_by_role("link", name=name, exact=True).wait_for()
            for identity, name in zip(ids, NAMES, strict=True):
                open_page(p, live, f"identity/{identity}")
                p.locator("#identity-facts dd", has_text=identity).wait_for()
                assert p.locator("#identity-title").inner_text() == name
                assert json.loads(p.locator("#identity-facts dd").nth(4).inner_text()) == METADATA
                p.get_by_role("button", name="Delete person…").click()
                assert p.locator("#delete-question").inner_text() == f"Delete {name} and 1 face?"
                p.get_by_role("button", name="Cancel").click()

            # Through the pages: enrol under a hostile name, from a file with a hostile name; a duplicate's warning names
            # the person it matches; identify lists them; the service's 404 echoes a hostile id from the link.
            open_page(p, live, "enrol")
            p.locator("#enrol-file").set_input_files(
                files=[{"name": NAMES[0] + ".png", "mimeType": "image/png", "buffer": (dev_faces / RAJ).read_bytes()}]
            )
            p.locator("#enrol-name").fill(NAMES[1])
            p.get_by_role("button", name="Enrol").click()
            assert p.locator("#enrol-ok").inner_text() == f"Enrolled {NAMES[1]}. Open {NAMES[1]}"
            p.locator("#enrol-file").set_input_files(dev_faces / AMY[1])
            p.locator("#enrol-name").fill(NAMES[2])
            p.get_by_role("button", name="Enrol").click()
            duplicate = p.locator("#enrol-duplicate")
            duplicate.wait_for()
            assert duplicate.get_by_role("link").inner_text() in NAMES
            open_page(p, live, "test")
            p.locator("#test-file-a").set_input_files(dev_faces / RAJ)
            p.get_by_role("button", name="Test", exact=True).click()
            assert p.locator("#face-1-title").inner_text() == f"Face 1: {NAMES[1]}"
            hostile_id = "<img src=x onerror=window.__xss=6>"
            p.evaluate("(id) => { location.hash = '#identity/' + encodeURIComponent(id); }", hostile_id)
            message = p.locator("#message.error", has_text="unknown_identity")
            message.wait_for()
            assert message.inner_text() == f"unknown identity '{hostile_id}' (unknown_identity, HTTP 404)"
        finally:
            for item in api.get("/identities", params={"limit": 100}).json()["items"]:
                api.delete(f"/identities/{item['id']}")
    assert failed_loads(console.errors()) == [409, 404]


def test_long_right_to_left_and_emoji_names_fit_a_phone(browser: Any, live: LiveServer, dev_faces: Path) -> None:
    photo = (dev_faces / AMY[0]).read_bytes()
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    p = context.new_page()
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    with httpx.Client(base_url=live.url, timeout=60) as api:
        ids = []
        for name in NAMES[-2:]:
            r = api.post(
                "/enroll",
                files={"image": ("face.png", photo, "image/png")},
                data={"name": name, "allow_duplicate": "true"},
            )
            ids.append(r.json()["identity_id"])
        try:
            wide = "document.documentElement.scrollWidth > window.innerWidth"
            open_page(p, live, "gallery")
            p.get_by_role("link", name=NAMES[-1]).wait_for()
            assert p.evaluate(wide) is False
            for identity, name in zip(ids, NAMES[-2:], strict=True):
                open_page(p, live, f"identity/{identity}")
                p.locator("#identity-title", has_text=name).wait_for()
                assert p.evaluate(wide) is False, name
                p.get_by_role("button", name="Delete person…").click()
                assert p.evaluate(wide) is False, name
                p.get_by_role("button", name="Yes, delete").click()
                p.locator("#message", has_text="Nothing of them is kept").wait_for()
                assert p.evaluate(wide) is False, name
        finally:
            context.close()
            for identity in ids:
                api.delete(f"/identities/{identity}")
    assert errors == []

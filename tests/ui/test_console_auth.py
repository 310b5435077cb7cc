"""The web console with API keys on: the key is typed once, kept in the tab's sessionStorage and sent as X-API-Key;
a missing or wrong key shows the 401 message, a key with too small a scope the 403 one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import Scope
from app.auth.keys import generate_key
from app.auth.store import create_key
from app.gallery import db
from tests.ui.conftest import Console, LiveServer, serve, ui_settings
from tests.ui.test_console import AMY, failed_loads, open_page

pytestmark = pytest.mark.model

ADMIN_KEY = generate_key()


@pytest.fixture(scope="module")
def secured(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """A server with a bootstrap admin key (so auth is on) and a read-only key made in its database."""
    path = tmp_path_factory.mktemp("ui-auth") / "gallery.db"
    for live in serve(ui_settings(models_dir, path, auth={"bootstrap_key": ADMIN_KEY})):
        engine = db.make_engine(f"sqlite:///{path}")
        try:
            with db.make_session_factory(engine)() as session, session.begin():
                read_key = create_key(session, name="viewer", scope=Scope.read).key
        finally:
            engine.dispose()
        yield live, read_key


def use_key(p: Any, key: str) -> None:
    p.get_by_label("API key").fill(key)
    p.get_by_role("button", name="Use key").click()


def test_key_is_asked_for_kept_in_the_tab_and_refusals_are_readable(
    page: tuple[Any, Console], secured: tuple[LiveServer, str], dev_faces: Path, screenshots: Path
) -> None:
    p, console = page
    live, read_key = secured
    open_page(p, live, "gallery")
    message = p.locator("#message.error")
    message.get_by_text("Not authorised (401)").wait_for()
    assert "an API key is required" in message.inner_text()
    assert p.evaluate("document.activeElement.id") == "key-input"  # the cursor waits where the key goes

    use_key(p, "fg_0123abcd_" + "x" * 43)  # well-formed, unknown
    p.locator("#message.error", has_text="unknown or revoked API key").wait_for()
    # A refused key is not kept (nor sent again): the tab says so.
    assert p.locator("#key-state").inner_text() == "no key" and p.evaluate("sessionStorage.length") == 0
    p.screenshot(path=screenshots / "auth-401.png", full_page=True)

    # Not a key at all (another script, an invisible character): refused as typed, nothing kept or sent.
    for typed in ("ключ", "fg_0123abcd_" + "x" * 20 + "\u200b" + "x" * 23):
        use_key(p, typed)
        p.locator("#message.error", has_text="That is not an API key").wait_for()
        assert p.locator("#key-state").inner_text() == "no key" and p.evaluate("sessionStorage.length") == 0
        assert p.evaluate("document.activeElement.id") == "key-input"

    # A read key: the gallery opens; enrolling needs write.
    use_key(p, read_key)
    p.get_by_text("The gallery is empty.").wait_for()
    assert p.locator("#key-state").inner_text() == "key in use for this tab"
    p.get_by_role("link", name="Enrol").click()
    p.locator("#enrol-file").set_input_files(dev_faces / AMY[0])
    p.locator("#enrol-name").fill("Amy")
    p.get_by_role("button", name="Enrol").click()
    forbidden = p.locator("#message.error", has_text="Forbidden (403)")
    forbidden.wait_for()
    assert re.search(r"read scope; this route needs write", forbidden.inner_text())
    p.screenshot(path=screenshots / "auth-403.png", full_page=True)

    # The admin key, kept across a reload of the tab but in sessionStorage only (no cookie, no localStorage).
    use_key(p, ADMIN_KEY)
    p.reload()
    open_page(p, live, "health")
    p.locator("dd[data-fact='status']", has_text="ready").wait_for()
    p.locator("#latency-table td", has_text="GET /readyz").wait_for()
    assert p.evaluate("sessionStorage.getItem('facegate.apiKey')") == ADMIN_KEY
    assert p.evaluate("localStorage.length") == 0 and p.evaluate("document.cookie") == ""
    p.get_by_role("button", name="Forget").click()
    p.locator("#message.error", has_text="Not authorised (401)").wait_for()  # the page, reloaded, asks again
    assert p.evaluate("sessionStorage.length") == 0 and p.locator("#key-state").inner_text() == "no key"
    assert failed_loads(console.errors()) == [401, 401, 403, 401]


def test_forget_leaves_nothing_read_with_the_key_on_the_page(
    page: tuple[Any, Console], secured: tuple[LiveServer, str], dev_faces: Path
) -> None:
    p, console = page
    live, read_key = secured
    with httpx.Client(base_url=live.url, headers={"X-API-Key": ADMIN_KEY}) as api:
        photo = (dev_faces / AMY[0]).read_bytes()
        enrolled = api.post("/enroll", files={"image": ("a.png", photo, "image/png")}, data={"name": "Amy Secret"})
        identity = enrolled.json()["identity_id"]
        try:
            open_page(p, live, "gallery")
            use_key(p, read_key)
            p.get_by_role("link", name="Amy Secret").click()
            p.locator("#faces-table tbody tr").first.wait_for()
            p.get_by_role("button", name="Forget").click()
            # The page asks again (401) and shows nothing of her: not her name, id, metadata or faces.
            p.locator("#message.error", has_text="Not authorised (401)").wait_for()
            assert p.locator("#key-state").inner_text() == "no key"
            assert "Amy Secret" not in p.locator("body").inner_text() and identity not in p.content()
            assert p.locator("#faces-table tbody tr").count() == 0
        finally:
            assert api.delete(f"/identities/{identity}").status_code == 200
    assert failed_loads(console.errors()) == [401, 401]


def test_the_key_never_goes_into_a_url_even_without_the_script(browser: Any, secured: tuple[LiveServer, str]) -> None:
    """The key form is sent by the script; if the script has not run (slow, blocked, failed), pressing Enter must not
    submit the key the browser's way, as a query string (address bar, history, access logs): the input has no name,
    and the page's CSP (form-action 'none') blocks the submission, saying where it would have gone."""
    live, read_key = secured
    context = browser.new_context(java_script_enabled=False)
    try:
        p = context.new_page()
        sent: list[str] = []
        p.on("request", lambda request: sent.append(request.url))
        p.goto(f"{live.url}/ui")
        p.get_by_label("API key").fill(read_key)
        with p.expect_console_message(lambda m: "form-action" in m.text) as blocked:
            p.get_by_label("API key").press("Enter", no_wait_after=True)
        assert f"'{live.url}/ui?'" in blocked.value.text and "has been blocked" in blocked.value.text
        assert not any(read_key in url for url in [*sent, p.url])
    finally:
        context.close()

"""The console's state as an operator moves around: paging while other clients enrol and delete people, paging past a
deleted person, answers that come back late, a person deleted or unknown, hand-edited links, and double clicks. People
are enrolled and deleted through the API (same photo, allow_duplicate) to set each scene up quickly."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.ui.conftest import Console, LiveServer
from tests.ui.test_console import AMY, RAJ, failed_loads, open_page, side_by_side

pytestmark = [pytest.mark.model, pytest.mark.slow]

# Counts the JSON answers the page has read; the script's own code after each such read runs in the same task
# (microtasks), so once page.wait_for_function sees the count go up, the page has done all it does with that answer.
COUNT_ANSWERS = """
window.__answers = 0;
const json = Response.prototype.json;
Response.prototype.json = function () {
  return json.call(this).then((value) => { window.__answers++; return value; });
};
"""


class Gallery:
    def __init__(self, live: LiveServer, photo: bytes, another: bytes) -> None:
        self.client = httpx.Client(base_url=live.url, timeout=60)
        self.photo = photo
        self.another = another  # a second photo of the same person: the same photo again would add no face
        self.ids: dict[str, str] = {}

    def enrol(self, name: str) -> str:
        files = {"image": ("face.png", self.photo, "image/png")}
        r = self.client.post("/enroll", files=files, data={"name": name, "allow_duplicate": "true"})
        assert r.status_code == 201, r.text
        self.ids[name] = str(r.json()["identity_id"])
        return self.ids[name]

    def delete(self, *names: str) -> None:
        """Delete these people (by the name they were enrolled with), as another client would."""
        for name in names:
            r = self.client.delete(f"/identities/{self.ids.pop(name)}")
            assert r.status_code == 200, r.text

    def add_face(self, identity: str) -> None:
        r = self.client.post(f"/identities/{identity}/faces", files={"image": ("face.png", self.another, "image/png")})
        assert r.status_code == 201, r.text

    def empty(self) -> None:
        while items := self.client.get("/identities", params={"limit": 100}).json()["items"]:
            for item in items:
                self.client.delete(f"/identities/{item['id']}")


@pytest.fixture
def gallery(live: LiveServer, dev_faces: Path) -> Iterator[Gallery]:
    g = Gallery(live, (dev_faces / AMY[0]).read_bytes(), (dev_faces / AMY[1]).read_bytes())
    g.empty()
    try:
        yield g
    finally:
        g.empty()
        g.client.close()


def open_gallery_of(p: Any, live: LiveServer, gallery: Gallery, people: int) -> Any:
    """`people` people enrolled (Person 01, 02, ...), the gallery's first page open; its summary line."""
    for i in range(people):
        gallery.enrol(f"Person {i + 1:02d}")
    open_page(p, live, "gallery")
    summary = p.locator("#gallery-summary")
    summary.get_by_text(f"1–20 of {people} people").wait_for()
    return summary


def wait_until_held(p: Any, held: list[Any]) -> None:
    """Until the request the test holds reaches its route (the sync API runs route handlers while it waits)."""
    for _ in range(1000):
        if held:
            return
        p.wait_for_timeout(10)
    raise AssertionError("the request never reached its route")


def people(first: int, last: int) -> list[str]:
    """The names open_gallery_of enrols, Person `first` to Person `last`."""
    return [f"Person {i:02d}" for i in range(first, last + 1)]


def names_shown(p: Any) -> list[str]:
    return list(p.locator("#gallery-table tbody tr td:first-child").all_inner_texts())


def asks_after(url: str) -> bool:
    """A request for a page of the gallery after a cursor (any page but the first)."""
    parts = urlsplit(url)
    return parts.path.endswith("/identities") and "after" in parse_qs(parts.query)


def test_next_page_starts_after_the_last_person_shown_whoever_was_deleted_or_enrolled_meanwhile(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    """By offset, Next skipped Person 21-25: another client deleted five people of the first page meanwhile (and
    enrolled five others), which moved them onto it."""
    p, console = page
    summary = open_gallery_of(p, live, gallery, 45)
    assert names_shown(p) == people(1, 20)
    gallery.delete(*people(1, 5))
    for i in range(1, 6):
        gallery.enrol(f"Late {i}")
    p.get_by_role("button", name="Next page").click()
    # Where the page stands counts the people before it now (Person 06-20), not the 20 paged past: the console
    # said "21–40", then "36–45" for the page after it.
    summary.get_by_text("16–35 of 45 people").wait_for()
    assert names_shown(p) == people(21, 40)
    p.get_by_role("button", name="Next page").click()
    summary.get_by_text("36–45 of 45 people").wait_for()
    assert names_shown(p) == people(41, 45) + [f"Late {i}" for i in range(1, 6)]
    assert p.get_by_role("button", name="Next page").is_disabled()
    assert console.errors() == []


def test_previous_page_returns_to_the_people_seen_before_whoever_was_deleted_meanwhile(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    """By offset, Previous from the third page showed Person 26-45 after five people of the first page were deleted:
    not the page seen before."""
    p, console = page
    summary = open_gallery_of(p, live, gallery, 50)
    next_page, previous_page = (p.get_by_role("button", name=n) for n in ("Next page", "Previous page"))
    next_page.click()
    summary.get_by_text("21–40 of 50 people").wait_for()
    next_page.click()
    summary.get_by_text("41–50 of 50 people").wait_for()
    gallery.delete(*people(1, 5))
    previous_page.click()
    summary.get_by_text("16–35 of 45 people").wait_for()  # 15 people before it now
    assert names_shown(p) == people(21, 40)
    assert previous_page.is_enabled() and next_page.is_enabled()
    previous_page.click()
    summary.get_by_text("1–20 of 45 people").wait_for()
    assert names_shown(p) == people(6, 25)  # the first page: from the first person there is now
    assert previous_page.is_disabled()
    # Next from there: after the last person shown (Person 25), not the second page as it was seen.
    next_page.click()
    summary.get_by_text("21–40 of 45 people").wait_for()
    assert names_shown(p) == people(26, 45)
    assert console.errors() == []


def test_pages_are_asked_by_cursor_and_a_search_starts_from_the_first(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    asked: list[dict[str, list[str]]] = []
    p.on("request", lambda r: asked.append(parse_qs(urlsplit(r.url).query)) if "/identities?" in r.url else None)
    summary = open_gallery_of(p, live, gallery, 45)
    first = gallery.client.get("/identities", params={"limit": 20}).json()
    p.get_by_role("button", name="Next page").click()
    summary.get_by_text("21–40 of 45 people").wait_for()
    # The first page with no cursor (nor offset); the second after the first one's `next`.
    assert asked == [{"limit": ["20"]}, {"limit": ["20"], "after": [first["next"]]}]
    p.get_by_label("Name contains").fill("person 4")
    p.get_by_role("button", name="Search").click()
    summary.get_by_text("1–6 of 6 people").wait_for()
    assert names_shown(p) == people(40, 45)
    assert asked[-1] == {"limit": ["20"], "name": ["person 4"]}
    assert p.get_by_role("button", name="Previous page").is_disabled()
    assert p.get_by_role("button", name="Next page").is_disabled()
    p.get_by_label("Name contains").fill("")
    p.get_by_role("button", name="Search").click()
    summary.get_by_text("1–20 of 45 people").wait_for()
    assert names_shown(p) == people(1, 20) and asked[-1] == {"limit": ["20"]}
    assert p.get_by_role("button", name="Previous page").is_disabled()
    assert console.errors() == []


def test_deleting_people_keeps_the_page_and_an_emptied_page_gives_way_to_the_one_before(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    summary = open_gallery_of(p, live, gallery, 45)
    next_page, previous_page = (p.get_by_role("button", name=n) for n in ("Next page", "Previous page"))
    next_page.click()
    summary.get_by_text("21–40 of 45 people").wait_for()
    # Deleted from the console: back on the same page, the next person moved up onto it.
    p.get_by_role("link", name="Person 30").click()
    p.get_by_role("button", name="Delete person…").click()
    p.get_by_role("button", name="Yes, delete").click()
    p.locator("#message", has_text="Deleted Person 30").wait_for()
    summary.get_by_text("21–40 of 44 people").wait_for()
    assert names_shown(p) == people(21, 29) + people(31, 41)
    next_page.click()
    summary.get_by_text("41–44 of 44 people").wait_for()
    assert names_shown(p) == people(42, 45)
    # Everyone from the second page on deleted by another client: coming back, the third page and the second are
    # empty, so the first is shown, whole, with nothing before or after it.
    gallery.delete(*people(21, 29), *people(31, 45))
    p.get_by_role("link", name="Enrol").click()
    p.locator("#page-enrol").wait_for()
    p.get_by_role("link", name="Gallery").click()
    summary.get_by_text("1–20 of 20 people").wait_for()
    assert names_shown(p) == people(1, 20)
    assert next_page.is_disabled() and previous_page.is_disabled()
    assert console.errors() == []


def test_a_late_next_page_does_not_move_the_position_when_previous_was_clicked_meanwhile(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    p.add_init_script(COUNT_ANSWERS)
    summary = open_gallery_of(p, live, gallery, 45)
    next_page, previous_page = (p.get_by_role("button", name=n) for n in ("Next page", "Previous page"))
    next_page.click()
    summary.get_by_text("21–40 of 45 people").wait_for()
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    p.route(asks_after, hold_the_first)
    next_page.click()  # the third page: its answer waits until released
    p.wait_for_function("() => document.querySelector('#gallery-next').disabled")
    previous_page.click()
    summary.get_by_text("1–20 of 45 people").wait_for()
    assert len(held) == 1
    answers = p.evaluate("window.__answers")
    held[0].continue_()
    p.wait_for_function("(seen) => window.__answers > seen", arg=answers)  # the third page's answer has come
    assert summary.inner_text() == "1–20 of 45 people" and names_shown(p) == people(1, 20)
    assert previous_page.is_disabled()
    next_page.click()
    summary.get_by_text("21–40 of 45 people").wait_for()
    assert names_shown(p) == people(21, 40)
    next_page.click()
    summary.get_by_text("41–45 of 45 people").wait_for()
    assert p.locator("#message").is_hidden()
    assert console.errors() == []


def test_a_double_click_on_next_page_turns_one_page(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    summary = open_gallery_of(p, live, gallery, 41)
    asked: list[str] = []
    held: list[Any] = []

    def hold(route: Any) -> None:
        asked.append(route.request.url)
        if held:
            route.continue_()
        else:
            held.append(route)

    p.route(asks_after, hold)
    p.get_by_role("button", name="Next page").dblclick()  # the first click's page waits until released
    wait_until_held(p, held)
    held[0].continue_()
    summary.get_by_text("21–40 of 41 people").wait_for()
    assert names_shown(p) == people(21, 40) and len(asked) == 1
    assert p.get_by_role("button", name="Next page").is_enabled()
    assert console.errors() == []


def test_deleting_the_only_person_of_the_last_page_shows_the_last_full_page(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    summary = open_gallery_of(p, live, gallery, 21)
    p.get_by_role("button", name="Next page").click()
    summary.get_by_text("21–21 of 21 people").wait_for()
    p.get_by_role("link", name="Person 21").click()
    p.get_by_role("button", name="Delete person…").click()
    p.get_by_role("button", name="Yes, delete").click()
    p.locator("#message", has_text="Deleted Person 21").wait_for()
    p.locator("#gallery-summary", has_text=re.compile(r" of 20 people$")).wait_for()
    # Not an empty table "0–20 of 20 people" on page 2: page 1, whole.
    assert summary.inner_text() == "1–20 of 20 people"
    assert p.locator("#gallery-table tbody tr").count() == 20
    assert p.get_by_role("button", name="Next page").is_disabled()
    assert p.get_by_role("button", name="Previous page").is_disabled()
    assert console.errors() == []


def test_a_late_answer_for_the_person_left_does_not_replace_the_person_shown(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    first, second = gallery.enrol("First Person"), gallery.enrol("Second Person")
    p.add_init_script(COUNT_ANSWERS)
    held: list[Any] = []
    p.route(f"**/identities/{first}", lambda route: held.append(route))  # her answer waits until released
    open_page(p, live, f"identity/{first}")
    open_page(p, live, f"identity/{second}")
    p.locator("#identity-title", has_text="Second Person").wait_for()
    p.locator("#identity-facts dd", has_text=second).wait_for()
    assert len(held) == 1
    answers = p.evaluate("window.__answers")
    held[0].continue_()
    # A function, not a string (which Playwright's polling would eval: the page's CSP forbids that).
    p.wait_for_function("(seen) => window.__answers > seen", arg=answers)  # the first person's answer has come
    assert p.locator("#identity-title").inner_text() == "Second Person"
    assert p.locator("#identity-facts dd").first.inner_text() == second
    assert p.locator("#message").is_hidden()
    assert console.errors() == []


def test_a_deleted_person_is_not_shown_again_on_going_back(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    gallery.enrol("Gone Person")
    open_page(p, live, "gallery")
    p.get_by_role("link", name="Gone Person").click()
    p.locator("#faces-table tbody tr").first.wait_for()
    p.get_by_role("button", name="Delete person…").click()
    p.get_by_role("button", name="Yes, delete").click()
    p.get_by_text("The gallery is empty.").wait_for()
    p.go_back()
    message = p.locator("#message.error", has_text="(unknown_identity, HTTP 404)")
    message.wait_for()
    assert p.locator("#identity-title").inner_text() == "Person"
    assert p.locator("#identity-body").is_hidden()
    assert "Gone Person" not in p.locator("body").inner_text()
    assert failed_loads(console.errors()) == [404]


def test_hand_edited_links_to_a_person_say_nobody_has_that_id(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    open_page(p, live, "enrol")
    p.locator("#page-enrol").wait_for()
    # A malformed %-escape: the page still changes (it threw URIError in the hashchange handler and stayed put).
    p.evaluate("location.hash = '#identity/%E0%A4%A'")
    message = p.locator("#message.error", has_text="(unknown_identity, HTTP 404)")
    message.wait_for()
    assert p.locator("#page-identity").is_visible() and p.locator("#identity-body").is_hidden()
    # Dot segments: the URL parser would turn /identities/. into /identities/ (the gallery's list, shown as a person
    # with no name) and /identities/.. into /; an empty id asks /identities/ itself.
    for dots in (".", "%2e", "..", ""):
        open_page(p, live, "enrol")
        p.locator("#page-enrol").wait_for()
        p.evaluate(f"location.hash = '#identity/{dots}'")
        message.wait_for()
        assert p.locator("#identity-title").inner_text() == "Person" and p.locator("#identity-body").is_hidden()
    assert failed_loads(console.errors()) == [404]


def test_a_double_click_on_delete_face_asks_and_does_not_delete(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    identity = gallery.enrol("Two Faces")
    gallery.add_face(identity)
    open_page(p, live, f"identity/{identity}")
    rows = p.locator("#faces-table tbody tr")
    rows.nth(1).wait_for()
    button = rows.first.get_by_role("button")
    button.dblclick()
    # The second click of the double click is not the confirmation: nothing is sent, the question stays.
    assert button.inner_text() == "Really delete?" and button.is_enabled()
    button.click()
    p.locator("#message", has_text=re.compile(r"^Deleted face \w{8} of Two Faces")).wait_for()
    p.locator("#identity-facts dd", has_text=re.compile(r"^1$")).wait_for()
    assert rows.count() == 1
    assert console.errors() == []


def test_a_double_click_on_enrol_enrols_once(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery, dev_faces: Path
) -> None:
    p, console = page
    posts: list[str] = []
    p.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    open_page(p, live, "enrol")
    p.locator("#enrol-file").set_input_files(dev_faces / AMY[0])
    p.locator("#enrol-name").fill("Once")
    p.get_by_role("button", name="Enrol").dblclick()
    p.locator("#enrol-ok").wait_for()
    assert posts == [f"{live.url}/enroll"]
    assert gallery.client.get("/identities").json()["total"] == 1
    assert console.errors() == []


def test_a_failed_next_page_leaves_the_position_where_it_was(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    """Before, Next moved the position before its request: after a failure, trying again skipped a page."""
    p, console = page
    summary = open_gallery_of(p, live, gallery, 41)
    refusal = {"error": {"code": "model_unavailable", "message": "the service is not ready"}}
    p.route(asks_after, lambda route: route.fulfill(status=503, json=refusal))
    p.get_by_role("button", name="Next page").click()
    p.locator("#message.error", has_text="model_unavailable").wait_for()
    assert summary.inner_text() == "" and p.locator("#gallery-table tbody tr").count() == 0
    p.unroute(asks_after)
    p.get_by_role("button", name="Next page").click()
    summary.get_by_text("21–40 of 41 people").wait_for()
    assert p.locator("#gallery-table tbody tr").first.inner_text().startswith("Person 21")
    assert failed_loads(console.errors()) == [503]


def test_a_deletion_answered_after_going_on_names_whom_it_deleted_and_leaves_the_page_shown(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    first, second = gallery.enrol("First Person"), gallery.enrol("Second Person")
    held: list[Any] = []

    def hold_deletion(route: Any) -> None:
        if route.request.method == "DELETE":
            held.append(route)
        else:
            route.continue_()

    p.route(f"**/identities/{first}", hold_deletion)
    open_page(p, live, f"identity/{first}")
    p.locator("#identity-title", has_text="First Person").wait_for()
    p.get_by_role("button", name="Delete person…").click()
    p.get_by_role("button", name="Yes, delete").click()
    wait_until_held(p, held)
    open_page(p, live, f"identity/{second}")
    p.locator("#identity-facts dd", has_text=second).wait_for()
    held[0].continue_()
    p.locator("#message", has_text="Deleted First Person (the person and 1 face").wait_for()
    assert p.locator("#identity-title").inner_text() == "Second Person"
    assert p.url.endswith(f"#identity/{second}")
    assert gallery.client.get(f"/identities/{first}").status_code == 404
    assert gallery.client.get(f"/identities/{second}").status_code == 200
    assert console.errors() == []


def test_a_server_failure_names_the_request_to_report(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500 says only `internal_error`: the message shows its request id (X-Request-ID), which the server's access
    line and the failure's log line name, for the operator to find what happened."""
    p, console = page
    person = gallery.enrol("First Person")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(live.app.state.service, "delete_identity", broken)
    open_page(p, live, f"identity/{person}")
    p.locator("#identity-title", has_text="First Person").wait_for()
    p.get_by_role("button", name="Delete person…").click()
    with p.expect_response(lambda r: r.request.method == "DELETE") as answer:
        p.get_by_role("button", name="Yes, delete").click()
    request_id = answer.value.headers["x-request-id"]
    assert answer.value.status == 500 and re.fullmatch(r"[0-9a-f]{32}", request_id)
    message = p.locator("#message.error", has_text="internal_error")
    message.wait_for()
    assert message.inner_text().endswith(f"(internal_error, HTTP 500, request {request_id})")
    assert failed_loads(console.errors()) == [500]


def test_a_face_added_after_going_on_is_not_shown_on_the_next_persons_page(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    p, console = page
    first, second = gallery.enrol("First Person"), gallery.enrol("Second Person")
    held: list[Any] = []
    p.route(f"**/identities/{first}/faces", lambda route: held.append(route))
    open_page(p, live, f"identity/{first}")
    p.locator("#identity-title", has_text="First Person").wait_for()
    p.locator("#addface-file").set_input_files(
        files=[{"name": "amy2.png", "mimeType": "image/png", "buffer": gallery.another}]
    )
    p.get_by_role("button", name="Add face").click()
    wait_until_held(p, held)
    open_page(p, live, f"identity/{second}")
    p.locator("#identity-facts dd", has_text=second).wait_for()
    assert p.locator("#addface-file").input_value() == ""  # the photo chosen for her is not offered for him
    held[0].continue_()
    p.locator("#message", has_text="Face added to First Person").wait_for()
    assert p.locator("#addface-result").is_hidden()
    assert p.locator("#identity-title").inner_text() == "Second Person"
    assert gallery.client.get(f"/identities/{first}").json()["face_count"] == 2
    assert console.errors() == []


def test_buttons_keep_the_keyboard_focus_through_their_work(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery
) -> None:
    # A button is disabled while its request runs, and the browser then drops the focus to the page's body: a
    # keyboard user pressing Enter on Next page could not press it again without tabbing back from the top.
    p, console = page
    summary = open_gallery_of(p, live, gallery, 41)
    p.get_by_role("button", name="Next page").focus()
    p.keyboard.press("Enter")
    summary.get_by_text("21–40 of 41 people").wait_for()
    assert p.evaluate("document.activeElement.id") == "gallery-next"
    p.keyboard.press("Enter")
    summary.get_by_text("41–41 of 41 people").wait_for()
    assert p.evaluate("document.activeElement.id") == "gallery-prev"  # Next is off on the last page
    p.keyboard.press("Enter")
    summary.get_by_text("21–40 of 41 people").wait_for()
    assert p.evaluate("document.activeElement.id") == "gallery-prev"
    # A form's button: Rename, pressed from the keyboard, keeps the focus too.
    p.get_by_role("link", name="Person 21").click()
    p.locator("#identity-title", has_text="Person 21").wait_for()
    p.locator("#rename-input").fill("Person 21 renamed")
    rename = p.get_by_role("button", name="Rename")
    rename.focus()
    p.keyboard.press("Enter")
    p.locator("#message", has_text="Renamed Person 21 to Person 21 renamed").wait_for()
    p.locator("#identity-title", has_text="Person 21 renamed").wait_for()
    assert p.evaluate("document.activeElement.textContent") == "Rename"
    assert console.errors() == []


def test_a_face_added_from_a_photo_of_several_shows_them_then_takes_the_largest(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery, dev_faces: Path
) -> None:
    p, console = page
    amy = gallery.enrol("Amy")
    open_page(p, live, f"identity/{amy}")
    p.locator("#identity-title", has_text="Amy").wait_for()
    pair = [{"name": "two.png", "mimeType": "image/png", "buffer": side_by_side(dev_faces / AMY[1], dev_faces / RAJ)}]
    p.locator("#addface-file").set_input_files(files=pair)
    p.get_by_role("button", name="Add face").click()
    p.locator("#message.error", has_text="2 faces were found").wait_for()
    p.locator("#addface-result svg g.refused").nth(1).wait_for(state="attached")  # both drawn, refused
    assert p.locator("#addface-result figcaption").inner_text() == "Faces found"
    p.locator("#addface-file").set_input_files(files=pair)
    p.locator("#addface-form").get_by_label("Several faces: take the largest").check()
    p.get_by_role("button", name="Add face").click()
    p.locator("#message", has_text="Face added to Amy").wait_for()
    p.locator("#identity-facts dd", has_text=re.compile(r"^2$")).wait_for()
    assert gallery.client.get(f"/identities/{amy}").json()["face_count"] == 2
    assert failed_loads(console.errors()) == [422]


def test_an_unknown_face_within_the_threshold_says_it_did_not_stand_out(
    page: tuple[Any, Console], live: LiveServer, gallery: Gallery, dev_faces: Path
) -> None:
    """The open-set rule leaves a face unknown whose nearest person is within the threshold when its score fails for
    a gallery of this size. The console said "nobody enrolled is close enough" above a table saying "within
    threshold: yes". The server's own reply for her, with the decision such a face gets."""
    p, console = page
    gallery.enrol("Amy")
    # (route.fetch() would pass the page's request on, but Playwright sends a multipart body's file empty.)
    files = {"image": ("amy.png", (dev_faces / AMY[1]).read_bytes(), "image/png")}
    reply = gallery.client.post("/identify", files=files).json()
    face = reply["faces"][0]
    assert face["reason"] == "accepted" and face["candidates"][0]["distance"] <= reply["threshold"]
    face.update(match=None, reason="unknown", score=face["score_threshold"] + 0.25)
    p.route("**/identify", lambda route: route.fulfill(json=reply))
    open_page(p, live, "test")
    p.locator("#test-file-a").set_input_files(dev_faces / AMY[1])
    p.get_by_role("button", name="Test", exact=True).click()
    decision = p.locator("#face-1 .decision[data-reason='unknown']")
    decision.wait_for()
    said = decision.inner_text()
    assert said.startswith("Unknown: the nearest, Amy at distance 0.") and "is within the threshold" in said, said
    assert "close enough" not in said and "open-set score" in said, said
    assert p.locator("#face-1 table.candidates tbody td").nth(3).inner_text() == "yes"

    p.unroute("**/identify")
    p.locator("#test-file-a").set_input_files(dev_faces / RAJ)  # a stranger beyond the threshold: as before
    p.get_by_role("button", name="Test", exact=True).click()
    p.locator("#face-1 .decision[data-reason='unknown']", has_text="nobody enrolled is close enough").wait_for()
    assert console.errors() == []

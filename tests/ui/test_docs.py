"""/docs in a real browser that can reach nothing but the service: Swagger UI's files come from facegate itself
(the package fastapi-swagger), and it renders the OpenAPI 3.1 document FastAPI writes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.ui.conftest import Console, LiveServer

pytestmark = pytest.mark.model


def test_docs_render_every_route_without_the_internet(live: LiveServer, page: tuple[Any, Console]) -> None:
    p, console = page
    service = urlsplit(live.url).netloc
    elsewhere: list[str] = []

    def only_the_service(route: Any) -> None:
        if urlsplit(route.request.url).netloc == service:
            route.continue_()
        else:  # the default page would fetch Swagger UI from cdn.jsdelivr.net and stay blank here
            elsewhere.append(route.request.url)
            route.abort()

    p.route("**/*", only_the_service)
    p.goto(f"{live.url}/docs")
    p.locator(".opblock-summary-path", has_text="/enroll").first.wait_for()
    paths = set(p.locator(".opblock-summary-path").all_inner_texts())
    assert {"/enroll", "/verify", "/identify", "/identities/{identity_id}"} <= {t.replace("\u200b", "") for t in paths}
    assert p.locator(".version", has_text="OAS 3.1").count() == 1  # Swagger UI 4 could not render 3.1 at all
    # "Try it out" under the page's Content-Security-Policy (a violation is a console error): the request is sent
    # and its answer shown.
    healthz = p.locator(".opblock-get", has=p.locator(".opblock-summary-path", has_text="/healthz")).first
    healthz.locator(".opblock-summary").click()
    healthz.locator("button.try-out__btn").click()
    healthz.locator("button.execute").click()
    healthz.locator(".live-responses-table .response-col_status", has_text="200").first.wait_for()
    assert elsewhere == [] and console.errors() == []

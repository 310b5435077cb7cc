"""The web console at /ui: one HTML page, a script and a style sheet, files of the package (app/ui/).

The page calls the JSON API from the browser with the API key the operator typed (kept in the tab's
sessionStorage), so these files themselves need no key. Nothing is fetched from elsewhere: the Content-Security-
Policy allows only this origin (and data:/blob: images: the photos being tested never leave the browser except to
this service). The API key's input has no name, so even a form submitted without the script would not put it
in a URL (the address bar, history, access logs); form-action 'none' blocks such a submission anyway.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(prefix="/ui", include_in_schema=False)

# name -> media type; the only files served (no path from the request ever reaches the file system).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    # Every form is sent by the script; a native submission (the script not loaded yet, or failing) goes nowhere.
    "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("app") / "ui" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)


@router.api_route("", methods=["GET", "HEAD"])
async def console() -> Response:
    return _serve("index.html")


@router.api_route("/", methods=["GET", "HEAD"])
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)


@router.api_route("/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise HTTPException(status_code=404)
    return _serve(name)

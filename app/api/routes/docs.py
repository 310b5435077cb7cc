"""GET /docs: Swagger UI for the OpenAPI document, served from the installed `fastapi-swagger` package instead of
FastAPI's default CDN (cdn.jsdelivr.net), so that the page works where browsers have no internet and loads nothing
from a third party. Swagger UI 5 (it renders OpenAPI 3.1, which FastAPI writes). The key given to "Authorize" is
kept in the page only (no persistAuthorization), as FastAPI's default page does.

The page is where an operator types an admin key and runs DELETEs, so it gets the console's protections: it may not
be framed (a page of another site could overlay it and have the operator click "Execute"), and its
Content-Security-Policy runs only this origin's script and the page's own inline start-up script (by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

# name -> media type; the only files served (no path from the request ever reaches the file system).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# The files change only with the package: browsers may keep them (NoStoreMiddleware leaves a set Cache-Control).
ASSET_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def page_headers(html: str) -> dict[str, str]:
    """The security headers of the page `html`: its CSP allows its inline scripts by their sha256, nothing else
    inline. Swagger UI sets style attributes and draws its icons from data: URIs."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return {
        "Content-Security-Policy": f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


@cache
def _asset(name: str) -> bytes:
    return (resources.files("fastapi_swagger") / "resources" / name).read_bytes()


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui(request: Request) -> HTMLResponse:
    root = str(request.scope.get("root_path", "")).rstrip("/")  # behind a proxy that strips a prefix
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="facegate API",
        swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/favicon-32x32.png",
    )
    page.headers.update(page_headers(bytes(page.body).decode()))
    return page


@router.api_route("/docs/{name}", methods=["GET", "HEAD"])
async def swagger_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404)
    return Response(_asset(name), media_type=ASSETS[name], headers=ASSET_HEADERS)

"""GET /docs: Swagger UI for the OpenAPI document, served from the installed `fastapi-swagger` package instead of
FastAPI's default CDN (cdn.jsdelivr.net), so that the page works where browsers have no internet and loads nothing
from a third party. Swagger UI 5 (it renders OpenAPI 3.1, which FastAPI writes). The key given to "Authorize" is
kept in the page only (no persistAuthorization), as FastAPI's default page does.
"""

from __future__ import annotations

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


@cache
def _asset(name: str) -> bytes:
    return (resources.files("fastapi_swagger") / "resources" / name).read_bytes()


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui(request: Request) -> HTMLResponse:
    root = str(request.scope.get("root_path", "")).rstrip("/")  # behind a proxy that strips a prefix
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="facegate API",
        swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/favicon-32x32.png",
    )


@router.api_route("/docs/{name}", methods=["GET", "HEAD"])
async def swagger_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404)
    return Response(_asset(name), media_type=ASSETS[name], headers=ASSET_HEADERS)

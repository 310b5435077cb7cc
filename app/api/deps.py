"""Dependencies as `Annotated` aliases: a handler's signature says what it needs.

Everything lives on `app.state` (set by `app.main`'s lifespan), never in module globals, so that several apps
(tests, workers) never share state.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.api.errors import declared_media_type, is_json, listed
from app.api.metrics import Metrics
from app.config import Settings
from app.errors import InvalidRequest
from app.gallery import Gallery
from app.service import FaceService
from app.vision.pipeline import Pipeline


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> FaceService:
    service: FaceService = request.app.state.service
    return service


def get_pipeline(request: Request) -> Pipeline:
    return get_service(request).pipeline


def get_gallery(request: Request) -> Gallery:
    return get_service(request).gallery


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[FaceService, Depends(get_service)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
GalleryDep = Annotated[Gallery, Depends(get_gallery)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def form_fields(*allowed: str, repeatable: tuple[str, ...] = ()) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """A dependency refusing multipart fields other than `allowed` (a misspelt field is an error, not ignored), and
    fields sent more than once (which one would count is a guess) unless they are `repeatable` (lists)."""

    async def check(request: Request) -> None:
        form = await request.form()  # already parsed (and cached) by FastAPI for the route's Form/File parameters
        unknown = sorted({key for key in form if key not in allowed})
        if unknown:
            shown, words = listed(unknown)  # names are the client's: 1,000 names of 4 kB would make an 8 MB reply
            raise InvalidRequest(
                f"unknown field(s) {words}; this endpoint takes {', '.join(allowed)}",
                unknown_fields=shown,
                n_unknown_fields=len(unknown),
                allowed_fields=list(allowed),
            )
        repeated = sorted({key for key in form if key not in repeatable and len(form.getlist(key)) > 1})
        if repeated:
            raise InvalidRequest(f"field(s) sent more than once: {', '.join(repeated)}", repeated_fields=repeated)

    return check


async def query_fields(request: Request) -> None:
    """Refuse query parameters the route does not take, and any sent more than once. Ignored, a misspelt `limt`
    would give the default page size, and a form field put in the URL (`POST /verify?threshold=0.2`) a decision at
    the default threshold instead of the one asked for."""
    route = request.scope.get("route")
    allowed = _query_names(route.dependant) if isinstance(route, APIRoute) else frozenset()
    params = request.query_params
    unknown = sorted(key for key in params if key not in allowed)
    if unknown:
        shown, words = listed(unknown)
        takes = f"this endpoint takes {', '.join(sorted(allowed))}" if allowed else "this endpoint takes none"
        raise InvalidRequest(
            f"unknown query parameter(s) {words}; {takes} (form and JSON fields go in the body)",
            unknown_query_parameters=shown,
            n_unknown_query_parameters=len(unknown),
            allowed_query_parameters=sorted(allowed),
        )
    repeated = sorted(key for key in params if len(params.getlist(key)) > 1)
    if repeated:
        raise InvalidRequest(
            f"query parameter(s) sent more than once: {', '.join(repeated)}", repeated_query_parameters=repeated
        )


async def json_fields(request: Request) -> None:
    """Refuse a JSON body naming one of its fields more than once (`{"target_far": 0.1, ..., "target_far": 0.001}`):
    the parser FastAPI uses keeps the last one without a word, so which value counted would be a guess, as with a
    form field sent twice."""
    if not is_json(declared_media_type(request) or "application/json"):
        # Not read as JSON by FastAPI, which refuses it saying the route takes a JSON body: a repeated key
        # reported first sent the client to fix that, only to be refused again for what was wrong all along.
        return
    body = await request.body()  # cached: the bytes FastAPI has already parsed for the route's body model
    try:
        value = json.loads(body, object_pairs_hook=_JsonFields.of) if body else None
    except (ValueError, RecursionError):
        return  # not JSON: FastAPI has answered it already
    try:
        repeated = _repeated(value)
    except RecursionError:
        return  # nested too deeply to walk: the metadata's own depth limit refuses it
    if repeated:
        shown, words = listed(repeated)
        raise InvalidRequest(f"field(s) sent more than once: {words}", repeated_fields=shown)


class _JsonFields(dict[str, Any]):
    """A JSON object as parsed, with the names it held more than once."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def of(cls, items: list[tuple[str, Any]]) -> _JsonFields:
        fields = cls(items)
        if len(fields) < len(items):
            fields.repeated = tuple(sorted(k for k, n in Counter(k for k, _ in items).items() if n > 1))
        return fields


def _repeated(value: Any, path: str = "") -> list[str]:
    """The keys named twice in one object, anywhere in a value parsed with `_JsonFields.of`, as dotted paths
    ("metadata.team"; list items as "[2]"): inside `metadata` too, where the last of two values was stored."""
    found: list[str] = []
    if isinstance(value, _JsonFields):
        found += [f"{path}.{key}" if path else key for key in value.repeated]
        for key, item in value.items():
            found += _repeated(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _repeated(item, f"{path}[{i}]")
    return found


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route takes: its own and its dependencies'."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def parse_metadata(raw: str | None) -> dict[str, Any] | None:
    """The `metadata` form field: a JSON object, or nothing."""
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_JsonFields.of)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "metadata must be a JSON object (it is not valid JSON, or nested too deeply)", field="metadata"
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object", field="metadata")
    try:
        repeated = _repeated(value, "metadata")
        plain = {key: _plain(item) for key, item in value.items()}
    except RecursionError:  # as deep as the parser allows, deeper than a walk of it can go
        raise InvalidRequest(
            "metadata must be a JSON object (it is not valid JSON, or nested too deeply)", field="metadata"
        ) from None
    if repeated:  # which of two values was meant is a guess, as for a form field sent twice
        shown, words = listed(repeated)
        raise InvalidRequest(f"metadata names a key more than once: {words}", field="metadata", repeated_fields=shown)
    return plain


def _plain(value: Any) -> Any:
    """`value` with plain dicts in place of `_JsonFields` (what the store and the response models expect)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser accepts them; neither database stores them)."""
    raise ValueError(f"{name} is not JSON")

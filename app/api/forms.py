"""Multipart forms whose text must be valid in the request's charset (UTF-8 unless the request says otherwise).

Starlette decodes a form field's name or value that is not valid in the charset as latin-1, silently: a name sent in
another encoding (or raw bytes) would be enrolled garbled. Routes that read forms use `FormRoute`, whose requests
parse multipart bodies with `StrictMultiPartParser`: such a field is refused with 400 `invalid_request` naming it.
File parts (photos) are bytes and are not decoded; their file names are only echoed, never stored, and are left to
Starlette.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, refusing field names and text values that do not decode in the request's charset."""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        if b"name" in options:
            self._check(options[b"name"], "a field name")
        super().on_headers_finished()

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            # A part without a filename is a text field, whatever its Content-Type: say so for binary ones.
            hint = " (a file part needs a filename in its Content-Disposition)" if any(
                name == b"content-type" and not value.lower().startswith(b"text/") for name, value in part.item_headers
            ) else ""
            self._check(part.data, f"field {part.field_name!r}", hint)
        super().on_part_end()

    def _check(self, raw: bytes | bytearray, what: str, hint: str = "") -> None:
        charset = self._charset or "utf-8"
        try:
            raw.decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise MultiPartException(f"{what} is not valid {charset} text{hint}") from None


class StrictFormRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = StrictMultiPartParser(
                        self.headers, stream, max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(status_code=400, detail=exc.message) from None
        # parsed above (or not multipart): Starlette's own code returns the cached form or parses url-encoded forms
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class FormRoute(APIRoute):
    """`APIRouter(route_class=FormRoute)`: the route's handler sees a `StrictFormRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict_handler

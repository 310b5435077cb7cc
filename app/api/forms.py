"""Multipart forms whose text must be valid in the request's charset (UTF-8 unless the request says otherwise).

Starlette decodes a form field's name or value that is not valid in the charset as latin-1, silently: a name sent in
another encoding (or raw bytes) would be enrolled garbled. Routes that read forms use `FormRoute`: before FastAPI
parses a multipart body, `form_problem` reads it once more with python-multipart's own parser (its public
callback API, so no Starlette internals are involved) and such a field is refused with 400 `invalid_request` naming
it. So is a body that ends before its closing boundary, which Starlette reads as the parts it completed. File parts
(photos) are bytes and are not decoded; their file names are only echoed, never stored, and are left to Starlette
(which reads one that is not valid in the charset as latin-1).

The declared charset itself must be a text encoding Python knows: Starlette would read an unknown one as latin-1 (a
name in it would be stored garbled), and Python also registers codecs that are not text encodings at all (`hex`,
`base64`, `rot13`, `zlib`, ...), which `bytes.decode` refuses with LookupError. Either is refused with 400
`invalid_request`, as is a decoder failing with a bare UnicodeError instead of UnicodeDecodeError (`undefined`,
`idna`, `punycode`), on field names and values and on file names alike (Starlette's own latin-1 fallback does not
catch it).

The body is read whole first (`Request.body()`, which Starlette caches for the form parser that follows). The body
limit (`BodyLimitMiddleware`) has bounded it already, and the route decodes the photos in memory anyway.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.exceptions import HTTPException

from app.api.errors import shorten
from app.api.head import HeadRoute

__all__ = ["FormRoute", "form_problem"]


class _Undecodable(Exception):
    pass


class _TextChecker:
    """python-multipart callbacks that raise `_Undecodable` at the first field name or text value that does not
    decode in `charset`. A part without a filename is a text field, as Starlette reads it."""

    def __init__(self, charset: str) -> None:
        self.charset = charset
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers.clear()
        self._data.clear()
        self._is_file = False
        self._name = ""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        # The last one, as Starlette takes it: a part that sends two must be judged by the one it will be read by
        # (by the first, a decoy naming a file made the text field after it skip this check, stored garbled).
        disposition = next((value for name, value in reversed(self._headers) if name == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" in options:
            self._name = self._decode(options[b"name"], "a field name")
        self._is_file = b"filename" in options
        if self._is_file:
            try:
                options[b"filename"].decode(self.charset)
            except UnicodeDecodeError:
                pass  # Starlette reads it as latin-1; a file name is only echoed
            except UnicodeError:
                raise _Undecodable(f"a file name cannot be read as {self.charset} text") from None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            return
        # A part without a filename is a text field, whatever its Content-Type: say so for binary ones.
        binary = any(name == b"content-type" and not value.lower().startswith(b"text/") for name, value in self._headers)
        hint = " (a file part needs a filename in its Content-Disposition)" if binary else ""
        self._decode(bytes(self._data), f"field {shorten(self._name)!r}", hint)

    def _decode(self, raw: bytes, what: str, hint: str = "") -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeError:  # UnicodeDecodeError, or the bare UnicodeError of `idna`, `punycode`, `undefined`
            raise _Undecodable(f"{what} is not valid {self.charset} text{hint}") from None


class _UnusableCharset(Exception):
    pass


def _charset(params: dict[bytes, bytes]) -> str:
    """The request's charset as Starlette resolves it (UTF-8 by default). Raises `_UnusableCharset` for one Python
    does not know, or a codec that is not a text encoding."""
    declared = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        info = codecs.lookup(declared)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        raise _UnusableCharset(f"unknown charset {shorten(declared)!r}; send UTF-8 (or no charset)") from None
    # What `bytes.decode` checks: `hex`, `base64`, `zlib`, ... are codecs between bytes, not text encodings.
    if not getattr(info, "_is_text_encoding", True):
        raise _UnusableCharset(f"charset {shorten(declared)!r} is not a text encoding; send UTF-8 (or no charset)")
    return info.name


def form_problem(body: bytes, content_type: str | None) -> str | None:
    """Why this multipart body must be refused (an unusable charset, a field name or text value not valid in its
    charset, a body cut off before its closing boundary), else None.

    A body that is not well-formed multipart otherwise is left to Starlette's parser, which refuses it with its own
    message."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        return None
    try:
        charset = _charset(params)
    except _UnusableCharset as exc:
        return str(exc)
    checker = _TextChecker(charset)
    try:
        parser = MultipartParser(params[b"boundary"], checker.callbacks())  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except _Undecodable as exc:
        return str(exc)
    except (MultipartParseError, ValueError):
        return None
    # Starlette's parser keeps the parts a cut-off body completed and drops the one it was cut in, silently: a photo
    # upload cut short (a client or proxy giving up, a wrong Content-Length) was answered 422 "image: Field required".
    if parser.state not in (MultipartState.START, MultipartState.END):  # START: nothing but whitespace was sent
        return "the multipart body ends before its closing boundary: the upload was cut short"
    return None


class FormRoute(HeadRoute):
    """`APIRouter(route_class=FormRoute)`: multipart bodies with undecodable text are refused before the handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            content_type = request.headers.get("Content-Type")
            if content_type and content_type.lower().startswith("multipart/form-data"):
                problem = form_problem(await request.body(), content_type)
                if problem is not None:
                    raise HTTPException(status_code=400, detail=problem)
            return await handler(request)

        return strict_handler

"""Time limits on a request's arrival, which uvicorn does not have (it waits for a request's headers and body as long
as the connection stays open: its keep-alive timeout only runs between requests).

Without them a client that stops sending, or vanishes without closing (a phone leaving coverage mid-upload, a NAT
forgetting the connection), holds its connection, a file descriptor and whatever of its body arrived forever; a few
thousand such connections, made on purpose or not, use up the worker's file descriptors and it stops accepting any.

`TimedH11Protocol` is uvicorn's HTTP/1.1 protocol with two limits, both on what the client sends:
  - `request_idle_timeout`: no byte for this long while a request is arriving (or since the connection opened);
  - `request_timeout`: the request, headers and body, not whole this long after its first byte (a client trickling a
    byte a second defeats the first limit, not this one).
Either cuts the connection; a request not answered yet gets 408 `request_timeout` first. The clocks stop while the
server itself has stopped reading (the app has not taken the body so far yet), and between requests uvicorn's own
keep-alive timeout applies. `facegate serve` runs uvicorn with it (`http=`). It reads H11Protocol's state
(`RELIED_ON`); a uvicorn without it gets plain uvicorn behaviour and a warning, not a failure on every request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, cast

import h11
from starlette.types import Scope
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.errors import TIMED_OUT, error_response
from app.api.request_id import HEADER, new_request_id, request_id_of
from app.errors import InvalidRequest, RequestTimeout

log = logging.getLogger(__name__)

# A lingering close (`TimedH11Protocol._close`) drops the client's bytes for at most this long in all, and stops once
# none came for the second: long enough for a client on a slow link to send the rest of a refused photo and read the
# answer, short enough that a client that keeps sending holds the connection only a little longer.
LINGER_SECONDS = 10.0
LINGER_IDLE_SECONDS = 2.0
_ARRIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11's state machine while a request is on its way
# What of H11Protocol's own state the limits read (attribute -> its attributes): uvicorn's internals, not its API.
# A uvicorn without them serves without the limits (logged) rather than failing every request.
RELIED_ON: dict[str, tuple[str, ...]] = {
    "conn": ("their_state", "trailing_data"),
    "flow": ("read_paused",),
    "cycle": (),
    "loop": ("time", "call_at", "call_later"),
}


@functools.cache
def configured_limits() -> tuple[float, float]:
    """(request_timeout, request_idle_timeout) from the settings: read once per process, as the app reads them
    (uvicorn's workers get the environment, not the objects)."""
    from app.config import Settings

    settings = Settings()
    return settings.request_timeout, settings.request_idle_timeout


class TimedH11Protocol(H11Protocol):
    # None: from the settings; a subclass may set them (the tests run uvicorn with a fraction of a second).
    request_timeout: float | None = None
    request_idle_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.request_timeout is not None and self.request_idle_timeout is not None:
            self._timeout, self._idle = self.request_timeout, self.request_idle_timeout
        else:
            self._timeout, self._idle = configured_limits()
        self._enabled = False  # known once connected (uvicorn makes `flow` then)
        self._started: float | None = None  # when the request now arriving began to (None: none is)
        self._last = 0.0  # when its last byte came (or the server last resumed reading)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enabled = _fits(self)
        self._lingering: asyncio.TimerHandle | None = None  # set while the rest of a refused body is read and dropped
        if self._enabled:
            self._started = self._last = self.loop.time()
            self._arm()
            # uvicorn's request cycles close the connection through this: see `_close`.
            self.transport = cast(asyncio.Transport, _ClosingThrough(transport, self))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._last = self.loop.time()  # the rest of a body already answered: dropped unread
            return
        super().data_received(data)
        if not self._enabled:
            return
        if self.transport.is_closing() or self.conn.their_state not in _ARRIVING:
            self._disarm()  # the request is whole (the app has it), or the connection is done with
            return
        now = self.loop.time()
        if self._started is None:  # the first bytes of the next request on a kept-alive connection
            self._started = now
        self._last = now
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        assert self._started is not None
        due = min(self._started + self._timeout, self._last + self._idle)
        self._timer = self.loop.call_at(due, self._check)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._started = None

    def _check(self) -> None:
        self._timer = None
        if self._started is None or self.transport.is_closing() or self.conn.their_state not in _ARRIVING:
            self._started = None
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # uvicorn stopped reading (the body already read waits for the app): the client is not late. Both
            # clocks restart once the server reads again.
            self._started = self._last = now
            self._timer = self.loop.call_later(min(self._idle, self._timeout), self._check)
            return
        if now - self._started >= self._timeout:
            self._expire(f"the request did not arrive whole within {self._timeout:g} s (FACEGATE_REQUEST_TIMEOUT)")
        elif now - self._last >= self._idle:
            self._expire(f"no data came for {self._idle:g} s while the request was arriving (FACEGATE_REQUEST_IDLE_TIMEOUT)")
        else:
            self._arm()

    def _expire(self, reason: str) -> None:
        self._started = None
        # The request's own cycle once its headers are in; before that, self.cycle is the previous request's.
        cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
        answered = cycle is not None and cycle.response_started
        began = cycle is not None or self._buffered()
        # The id the app gave the request (its access line names it), else a fresh one, named by the line below.
        request_id = (request_id_of(cast(Scope, cycle.scope)) if cycle is not None else None) or new_request_id()
        if not answered and began:
            # Our own bytes, not h11's: h11 cannot answer a request whose headers are not all in. The connection
            # closes right after, so the two cannot get out of step.
            self.transport.write(_timeout_answer(reason, request_id))
        if cycle is not None:
            cycle.scope.setdefault("state", {})[TIMED_OUT] = True  # the app logs this request as the 408 it got
            cycle.disconnected = True  # the app's receive() now says the client left, and its answer goes nowhere
            cycle.message_event.set()
        log.info("connection closed: %s", reason, extra={"fields": {"request_id": request_id} if began else {}})
        # At once, not lingering: a client too slow or stalled is what these limits cut.
        cast(_ClosingThrough, self.transport).close_now()

    def _close(self, transport: asyncio.Transport) -> None:
        """Close the connection; while the client is still sending a request (answered before its body was read: a
        413 for a body over the limit, a 503 busy, a 401) stop writing and drop what comes for a while first (a 408
        of these limits does not come here: `_expire` cuts at once). Closed with the client's bytes unread, the
        kernel answers them with a reset, and the client's kernel throws away the answer its program has not read
        yet: most clients read only once they have sent everything, so they saw "connection reset" instead of the
        413 (nginx's lingering close does the same)."""
        state = self.conn.their_state
        still_sending = state is h11.SEND_BODY or (state is h11.IDLE and self._buffered())
        if self._lingering is not None or transport.is_closing() or not still_sending or not transport.can_write_eof():
            transport.close()
            return
        self._disarm()
        transport.write_eof()  # the answer goes out, then a FIN: the client reads it once it has sent its body
        transport.resume_reading()  # uvicorn paused reading while the app had not taken the body
        self._last = now = self.loop.time()
        self._linger(now + LINGER_SECONDS)

    def _linger(self, until: float) -> None:
        """Go on dropping the client's bytes until it closes, sends nothing for LINGER_IDLE_SECONDS, or `until`."""
        now = self.loop.time()
        if now >= until or now - self._last >= LINGER_IDLE_SECONDS:
            self.transport.close()
            return
        self._lingering = self.loop.call_later(min(LINGER_IDLE_SECONDS, until - now), self._linger, until)

    def _buffered(self) -> bool:
        """Whether any part of a request arrived (a connection opened and left silent gets no answer)."""
        return bool(self.conn.trailing_data[0])

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a malformed request line or header, a negative or doubled Content-Length, an
        unknown Transfer-Encoding, headers arriving past h11's size limit): uvicorn answers 400 in plain text; the
        API's errors are JSON (`{"error": {...}}`), these too. The connection closes after it, as uvicorn's own
        does."""
        self.transport.write(_raw_answer(400, "Bad Request", InvalidRequest.code, _MALFORMED, new_request_id()))
        self.transport.close()


class _ClosingThrough:
    """The connection's transport as uvicorn's request cycles see it: `close()` goes through the protocol's `_close`
    (a lingering close), and while the connection lingers it reads as closing, so nothing more is written to it."""

    def __init__(self, transport: asyncio.Transport, protocol: TimedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        if self._protocol._lingering is not None:
            self._transport.close()  # a second close (a shutdown, the linger's end): now
        else:
            self._protocol._close(self._transport)

    def close_now(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol._lingering is not None or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _fits(protocol: H11Protocol) -> bool:
    """Whether this uvicorn's H11Protocol has what the limits read (`RELIED_ON`); if not, says so once."""
    missing = [
        f"{name}.{attribute}" if attribute else name
        for name, attributes in RELIED_ON.items()
        for attribute in attributes or ("",)
        if not hasattr(protocol, name) or (attribute and not hasattr(getattr(protocol, name), attribute))
    ]
    if missing:
        _warn_unfitted(tuple(missing))
    return not missing


@functools.cache
def _warn_unfitted(missing: tuple[str, ...]) -> None:
    from uvicorn import __version__

    log.warning(
        "request timeouts are off: uvicorn %s's H11Protocol has no %s (FACEGATE_REQUEST_TIMEOUT and "
        "FACEGATE_REQUEST_IDLE_TIMEOUT are not enforced; facegate was tested with uvicorn 0.30 to 0.54)",
        __version__,
        ", ".join(missing),
    )


_MALFORMED = (
    "the HTTP request is malformed: its request line, a header (or the headers' size), or how its body's length is "
    "given (Content-Length, Transfer-Encoding)"
)


def _timeout_answer(reason: str, request_id: str) -> bytes:
    return _raw_answer(408, "Request Timeout", RequestTimeout.code, reason, request_id)


def _raw_answer(status: int, phrase: str, code: str, message: str, request_id: str) -> bytes:
    """An error answer as bytes, for a connection that closes right after it (h11 cannot send it: it is past, or not
    yet at, the point of answering). Written past the app's middlewares: the X-Request-ID every answer carries is
    put on here."""
    headers = {"Connection": "close", "Cache-Control": "no-store", HEADER: request_id}
    response = error_response(status, code, message, headers=headers)
    head = f"HTTP/1.1 {status} {phrase}\r\n".encode() + b"".join(
        name + b": " + value + b"\r\n" for name, value in response.raw_headers
    )
    return head + b"\r\n" + bytes(response.body)

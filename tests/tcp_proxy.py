"""A TCP forwarder between the app and a database server, which a test cuts and restores: a database outage
(restart, failover, network cut) without touching the server, which other tests share.

- `cut()`: every forwarded connection is closed at once (the client sees the server hang up) and new connections
  are refused (the port is closed), as while a server restarts.
- `silence()`: every forwarded connection is closed and new ones are accepted but never answered, as a server that
  hangs or a failover address nobody holds yet: a client without a connect timeout waits for ever.
- `freeze()`: nothing is forwarded any more, and nothing is closed: the connections stay up (this side's kernel
  acknowledges what the client sends), as a server that stalled whole (its host paused, its storage hung, a pooler
  whose backend died). Nothing answers, not even the server's own timeouts.
- `restore()`: forwarding again, on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from types import TracebackType

from sqlalchemy.engine import make_url


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # every socket of a forwarded or held connection
        self._mode = "forward"  # forward | silent | frozen
        self._flowing = threading.Event()  # cleared by freeze(): the pumps hold what they read
        self._flowing.set()
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()

    # ------------------------------------------------------------------------------------------- control

    def cut(self) -> None:
        """Close every connection and the port (new connections are refused)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        self._drop_all()

    def silence(self) -> None:
        """Close every connection; new ones are accepted and then never answered."""
        with self._lock:
            self._mode = "silent"
        self._drop_all()
        if self._listener is None:
            self._listen()

    def freeze(self) -> None:
        """Forward nothing and close nothing; new connections are accepted and never answered."""
        with self._lock:
            self._mode = "frozen"
            self._flowing.clear()

    def restore(self) -> None:
        """Forward again; connections held unanswered by `silence` or `freeze` are closed."""
        with self._lock:
            held, self._mode = self._mode != "forward", "forward"
        if held:
            self._drop_all()
        self._flowing.set()
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy-accept", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            with self._lock:
                mode = self._mode
                self._sockets.add(client)
            if mode != "forward":
                continue  # held open, never answered
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._forget(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.add(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), name="tcp-proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        self._forget(source)
        self._forget(sink)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close(sock)

    def _drop_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def proxied(url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the server of database URL `url`, and the same URL through it."""
    parsed = make_url(url)
    with TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
        yield proxy, parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)

"""A TCP proxy in front of a broker, for outages that only this test's clients see.

The shared Redis and RabbitMQ may not be stopped; a client that reaches them
through :class:`TcpProxy` can still lose its broker for seconds, or lose its
connection in the middle of a command, while everyone else is untouched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]


class TcpProxy:
    """A TCP forwarder in front of a broker, for outages that only this test's clients see.

    Clients given :meth:`url` reach the broker through it. :meth:`outage`
    closes every connection and, for its duration, closes each new one as
    soon as it is accepted: the broker is gone for them, while the shared
    server and everyone else's connections are untouched.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[parts.scheme])
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._down_until = 0.0
        self._cut_next = False
        self._closed = False
        threading.Thread(target=self._accept, name="drill-proxy", daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` pointing at this proxy instead of the broker (credentials, path kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def outage(self, seconds: float) -> int:
        """Close every connection and refuse new ones for ``seconds``; return how many closed."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            doomed = list(self._open)
            self._open.clear()
        for sock in doomed:
            _close(sock)
        return len(doomed) // 2

    def cut_next_request(self) -> None:
        """Close the connection that sends the next bytes, before they reach the broker.

        The client sees its connection drop in the middle of a command: what
        a dropped connection does to whoever was using it at that moment.
        """
        self._cut_next = True

    @property
    def down(self) -> bool:
        """Whether an outage is under way."""
        return time.monotonic() < self._down_until

    def wait_until_up(self) -> None:
        """Sleep until the outage is over."""
        while self.down:
            time.sleep(0.05)

    def close(self) -> None:
        """Stop forwarding and close everything."""
        self._closed = True
        _close(self._listener)
        self.outage(0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, target, asks in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump,
                    args=(source, target, asks),
                    name="drill-proxy-pump",
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, asks: bool) -> None:
        try:
            while data := source.recv(65536):
                if asks and self._cut_next:
                    self._cut_next = False
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(target)
            _close(source)
            _close(target)


_DEFAULT_PORTS = {"redis": 6379, "amqp": 5672}


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

"""The companion server's network side: the ``websockets`` threaded server around a Hub.

Rules:

* One handler thread per connection (the library's model); the handler owns
  its connection. Other threads only call ``Connection.send``/``close``, which
  the library makes thread-safe.
* Authentication happens after the WebSocket handshake, exactly as the
  platform guide does it: a bad token gets an ``error`` with ``AUTH_FAILED``,
  then close code 4000.
* The library enforces the size limit (close 1009) and the heartbeat: a ping
  every ``ping_interval`` seconds, and a connection that has not answered
  within ``ping_timeout`` is closed (1011).
* ``stop()`` follows this order: stop accepting, close every client with
  1000 (all at once), wait for the handler threads, close the store. It is
  idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from .. import protocol as p
from ..errors import AuthError
from . import tokens
from .hub import Hub, HubSettings, Outgoing

log = logging.getLogger("nexus.server")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str = ":memory:"
    ping_interval_s: float = 30.0
    ping_timeout_s: float = 30.0
    rate_limit_per_minute: int = 100
    max_message_bytes: int = p.MAX_MESSAGE_BYTES
    close_timeout_s: float = 2.0
    tls_cert: Optional[str] = None  # PEM certificate chain; with tls_key, serve wss://
    tls_key: Optional[str] = None


class _Peer:
    """A connection as the Hub sees it: sends that fail on a closed socket are dropped."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn

    def send(self, text: str) -> None:
        try:
            self.conn.send(text)
        except (ConnectionClosed, OSError):
            pass  # the handler thread sees the close and unregisters the client

    def close(self, code: int, reason: str) -> None:
        try:
            self.conn.close(code, reason)
        except (ConnectionClosed, OSError):
            pass


def _tls_context(settings: ServerSettings) -> Any:
    if not settings.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _deliver(out: Outgoing) -> None:
    for peer, text in out:
        peer.send(text)


def _token_from(conn: ServerConnection) -> Optional[str]:
    """The JWT from ``Authorization: Bearer`` or, failing that, ``?token=``."""
    assert conn.request is not None
    header = conn.request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and header[7:].strip():
        return header[7:].strip()
    values = parse_qs(urlsplit(conn.request.path).query).get("token")
    return values[0] if values else None


class CompanionServer:
    """A running companion server; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, settings: ServerSettings, secret: bytes) -> None:
        self.settings = settings
        self._secret = secret
        self.hub = Hub(settings.db, HubSettings(settings.rate_limit_per_minute))
        self._stop = threading.Event()
        self._stopped = False
        self._server: Server = serve(
            self._handle, settings.host, settings.port,
            process_request=self._check_path,
            max_size=settings.max_message_bytes,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=settings.close_timeout_s,
            compression=None,  # a compression bomb would bypass max_size accounting
            ssl=_tls_context(settings),
        )
        self.port: int = self._server.socket.getsockname()[1]
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="nexus-server-accept",
                             daemon=True),
            threading.Thread(target=self._ticker, name="nexus-server-tick", daemon=True),
        ]

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://{self.settings.host}:{self.port}{p.PATH}"

    def start(self) -> CompanionServer:
        for thread in self._threads:
            thread.start()
        log.info("listening on %s", self.url)
        return self

    def _check_path(self, conn: ServerConnection, request: Any) -> Any:
        if urlsplit(request.path).path != p.PATH:
            return conn.respond(404, f"the Nexus endpoint is {p.PATH}\n")
        return None

    def _ticker(self) -> None:
        while not self._stop.wait(1.0):
            _deliver(self.hub.tick(time.time()))

    def _handle(self, conn: ServerConnection) -> None:
        try:
            token = _token_from(conn)
            if token is None:
                raise AuthError("Missing authentication token")
            identity = tokens.verify(token, self._secret)
        except AuthError as exc:
            log.info("auth failed from %s: %s", conn.remote_address, exc)
            error = p.make_error(p.AUTH_FAILED, str(exc), time.time())
            _Peer(conn).send(p.encode(error))
            _Peer(conn).close(p.CLOSE_AUTH_FAILED, "Authentication failed")
            return
        peer = _Peer(conn)
        client, welcome = self.hub.connect(identity, peer, time.time())
        log.info("%s connected: %s %s", client.client_id, identity.role, identity.subject)
        try:
            peer.send(welcome)
            for frame in conn:
                _deliver(self.hub.handle(client, frame, time.time()))
        except ConnectionClosed:
            pass
        finally:
            self.hub.disconnect(client)
            rcvd = conn.close_code if conn.close_code is not None else "none"
            log.info("%s disconnected (close code %s)", client.client_id, rcvd)

    def stop(self) -> None:
        """Close every client with 1000, stop serving, close the store. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._server.socket.close()  # no new connections from here on
        # Each close waits for the client's answer (up to close_timeout): in parallel, so a
        # crowd of unresponsive clients costs one timeout, not one each.
        closers = [threading.Thread(target=peer.close, args=(p.CLOSE_NORMAL,
                                                             "Server shutting down"), daemon=True)
                   for peer in self.hub.peers()]
        for thread in closers:
            thread.start()
        deadline = time.monotonic() + self.settings.close_timeout_s + 1.0
        for thread in closers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._server.shutdown()
        self.hub.close()
        log.info("stopped")

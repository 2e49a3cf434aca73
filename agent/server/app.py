"""The companion server's network side: the ``websockets`` asyncio server around a Hub.

Rules:

* One event loop in one daemon thread serves every connection; no thread per
  connection. The Hub is called only from that loop (``hub.telemetry()`` may
  also be called from other threads: the Hub keeps its lock).
* Each client has a bounded send queue (:class:`SendQueue`). The Hub's
  answers go out without waiting: written at once while the client keeps up,
  queued (and drained by a writer task) while it does not, so a client that
  does not read delays nobody but itself. When a queue would pass
  ``send_queue_messages`` or ``send_queue_bytes``, what it holds is dropped
  and the client is closed with 1013 (try again later), logged once.
* Authentication happens after the WebSocket handshake, exactly as the
  platform guide does it: a bad token gets an ``error`` with ``AUTH_FAILED``,
  then close code 4000; so does a connection whose token's ``exp`` passes
  (a timer on the loop's monotonic clock). An identity over its rate budget
  is closed with 1008 right after the handshake, and a client closed with
  1008 is read no more.
* Identity (docs/design.md, "Device identity"): a verified client certificate (this
  node's TLS with ``client_ca``, or a trusted terminator's header) names a device; else
  the token does, checked with the one algorithm the node's keys allow. The deny file
  refuses an identity whatever its credential. A claim token never reaches the hub: its
  connection makes one claim (``_serve_claim``) and closes. A device token is renewed
  once per connection at ``renew_at`` of its lifetime when this node can mint.
* A big batch is stored in steps (``Hub.resume``), one per turn of the loop;
  the connection keeps the frames that follow it (``DirectConnection.hold``)
  until its ack is out, so answers keep their order.
* Memory is bounded before authentication: at most ``MAX_HEADERS`` request
  headers of ``MAX_HEADER_LINE`` bytes, a handshake finished within
  ``handshake_timeout_s``, and at most ``max_unauthenticated`` connections
  holding at most ``unauthenticated_bytes`` between them until their token is
  checked (:class:`Admission`); past either, a new connection is dropped at
  once. After it, a message may be 64 KiB (close 1009 past it), except from a
  device on a node that offers batches (the offer's ``max_bytes``).
* The library enforces the size limit (close 1009) and the heartbeat: a ping
  every ``ping_interval`` seconds, and a connection that has not answered
  within ``ping_timeout`` is closed (1011). Compression is off: it would cost
  about 64 KiB per connection and let a compression bomb around ``max_size``.
* Every close is bounded: a client that does not take the close frame within
  ``close_timeout`` is aborted (TCP closed under it).
* ``stop()`` follows this order: stop accepting, flush and close every client
  with 1000 (all at once, bounded by ``close_timeout``), close what is left
  (connections still authenticating), stop the loop, close the store. It is
  idempotent and may be called from any thread but the loop's.
* The event loop is uvloop's when it is installed (the ``server`` extra asks for it;
  less CPU per message) unless ``loop`` says ``asyncio``; without it, asyncio's
  own loop serves exactly the same (``loop_name`` says which).
* With ``redis_url`` the node joins a cluster (``cluster.py``): frames go
  through the cluster layer, which calls the hub; without it nothing changes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Set, Tuple, Union, cast
from urllib.parse import parse_qs, urlsplit

import websockets.http11
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from .. import protocol as p
from ..errors import AuthError
from . import certs, page, tokens
from . import hub as hub_mod
from .denylist import DenyList
from .hub import Hub, HubSettings, Answers

log = logging.getLogger("nexus.server")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    db: str = ":memory:"
    ping_interval_s: float = 30.0
    ping_timeout_s: float = 30.0
    rate_limit_per_minute: int = 100  # messages, per identity (hub.Budget)
    samples_per_minute: int = 40_000  # telemetry samples (batch items), per device identity
    max_operator_connections: int = 8  # per operator identity
    max_rows: int = 100_000  # telemetry rows in the store, as a last resort
    max_rows_per_device: int = 10_000  # rows each device keeps (its oldest go first)
    max_message_bytes: int = p.MAX_MESSAGE_BYTES
    offer_batches: bool = True  # telemetry.batch in the welcome (docs/protocol.md)
    close_timeout_s: float = 2.0
    tls_cert: Optional[str] = None  # PEM certificate chain; with tls_key, serve wss://
    tls_key: Optional[str] = None
    # Client certificates (certs.py): verified against client_ca whenever one is presented
    # (in the TLS handshake, or a terminator's header: issued directly by one of its CAs);
    # a device then needs no token. require_client_cert refuses devices that come with a
    # token only (operators keep their tokens).
    client_ca: Optional[str] = None
    require_client_cert: bool = False
    # A TLS terminator in front (nginx) passes the verified certificate in this header,
    # taken only from trusted_proxies (addresses or networks); None: the header is ignored.
    client_cert_header: Optional[str] = None
    trusted_proxies: Tuple[str, ...] = certs.TRUSTED_PROXIES
    # Token renewal (docs/protocol.md section 9): past this share of a device token's
    # lifetime the server sends a fresh one; offered only when this node can mint.
    renew_at: Optional[float] = 0.8
    # A renewed token keeps its lifetime up to this: a token minted with a careless iat
    # (0, or far in the past) would otherwise be renewed for decades.
    max_token_lifetime_s: float = 365 * 86400.0
    # Provisioning by claim (docs/protocol.md section 10): the device CA that signs a
    # claimed device's certificate request, and for how long; None takes no claims.
    claim_ca_cert: Optional[str] = None
    claim_ca_key: Optional[str] = None
    claim_days: int = 365
    deny_file: Optional[str] = None  # identities refused, re-read on change (denylist.py)
    # Per-client send queue, on top of the library's write buffer (write_limit_bytes):
    # about 4,000 telemetry broadcasts, a few seconds of a whole fleet for an operator.
    send_queue_messages: int = 4096
    send_queue_bytes: int = 1 << 20
    write_limit_bytes: int = 64 * 1024
    # Several nodes, one fleet (cluster.py): None serves as a single node.
    redis_url: Optional[str] = None
    node_id: str = ""  # default host-pid
    dedupe_s: int = 600  # how long a stored telemetry id is remembered cluster-wide
    loop: str = "auto"  # "auto" (uvloop when installed), "uvloop" or "asyncio"
    # Before authentication (docs/performance.md, "Worst case per connection"):
    handshake_timeout_s: float = 5.0  # TCP accept to the end of the WebSocket handshake
    max_unauthenticated: int = 1024  # connections whose token is not checked yet
    unauthenticated_bytes: int = 4 << 20  # what they may have sent, between them


LOOPS = ("auto", "uvloop", "asyncio")


def new_loop(choice: str) -> Tuple[asyncio.AbstractEventLoop, str]:
    """A new event loop and its name; ImportError when uvloop is asked for by name and
    missing. uvloop is optional: "auto" falls back to asyncio's loop and says so."""
    if choice not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
            log.info("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.new_event_loop(), f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop(), "asyncio"


# The request the handshake reads: the library's defaults (128 headers of 8 KiB, taken from
# WEBSOCKETS_MAX_NUM_HEADERS / WEBSOCKETS_MAX_LINE_LENGTH) let one stranger park 1 MiB
# before sending a token. A device or a browser sends about 15 short headers; a token in
# the request line (?token=) is a few hundred bytes. websockets.http11 reads these two
# module constants at each request, so they are set once for the process, here.
MAX_HEADERS = 32
MAX_HEADER_LINE = 4096
websockets.http11.MAX_NUM_HEADERS = MAX_HEADERS
websockets.http11.MAX_LINE_LENGTH = MAX_HEADER_LINE


class Admission:
    """Connections not authenticated yet: counted from TCP accept to the token's verdict,
    with every byte they sent meanwhile. Past ``max_count`` connections or ``max_bytes``
    between them, a new connection (or the one whose bytes went over) is dropped at once:
    strangers that never finish a handshake cannot hold more than that, whatever their
    number, and they are dropped at ``handshake_timeout_s`` anyway."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.waiting: Set[GuardedConnection] = set()  # counted now (stop() aborts them)
        self.bytes = 0
        self.dropped = 0
        self._logged = -math.inf

    @property
    def count(self) -> int:
        return len(self.waiting)

    def enter(self, conn: GuardedConnection) -> bool:
        if self.count >= self.max_count:
            self._drop("connections")
            return False
        if self.bytes >= self.max_bytes:
            # Full of requests that never end: drop at accept, before reading a byte
            # (reading what each sends first costs more than the whole check).
            self._drop("bytes")
            return False
        self.waiting.add(conn)
        return True

    def received(self, size: int) -> bool:
        """``size`` more bytes from a connection still counted; False when over the budget."""
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._drop("bytes")
            return False
        return True

    def leave(self, conn: GuardedConnection, size: int) -> None:
        self.waiting.discard(conn)
        self.bytes -= size

    def _drop(self, what: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._logged >= 10.0:  # a flood is logged every 10 s, not per connection
            self._logged = now
            log.warning("too many connections not authenticated yet (%d, %d bytes; the "
                        "limit on %s was reached): dropping new ones (%d so far)",
                        self.count, self.bytes, what, self.dropped)


class GuardedConnection(ServerConnection):
    """A connection counted by an :class:`Admission` until :meth:`admitted` (its token was
    checked) or until it ends."""

    def __init__(self, *args: Any, admission: Admission, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admission = admission
        self._counted = False
        self._refused = False
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counted = self._admission.enter(self)
        if not self._counted:
            # Before the library sets the connection up (its handshake task, its buffers):
            # a refused connection costs an accept and a close, nothing more.
            self._refused = True
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._counted:
            self._received += len(data)
            if not self._admission.received(len(data)):
                self.admitted()
                self.transport.abort()
                return
        super().data_received(data)

    def admitted(self) -> None:
        """The token was checked (either way): no longer counted. Idempotent."""
        if self._counted:
            self._counted = False
            self._admission.leave(self, self._received)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._refused:
            return  # never set up (connection_made)
        self.admitted()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if not self._refused:
            super().eof_received()


class SendQueue:
    """A client as the Hub sees it: a bounded queue of texts, drained by a writer task
    only while the client is behind.

    ``send`` and ``close`` never wait; they are called on the loop thread only.

    A text goes straight to the transport when nothing is queued and the transport's
    buffer is under ``write_limit_bytes`` (a client that reads keeps it near empty): the
    frame is built by the connection's sans-I/O protocol and written at once, with no task
    wake-up and no coroutine (about a fifth of the CPU a message used to cost). Otherwise
    it is queued, and a writer task sends the queue through ``conn.send``, which waits
    while the buffer stays over the limit. Order is kept: nothing is written directly
    while anything is queued, and ``conn.send`` writes its frame before it can wait.
    """

    def __init__(self, conn: ServerConnection, settings: ServerSettings, name: str) -> None:
        self.conn = conn
        self.name = name
        self._settings = settings
        self._texts: Deque[str] = collections.deque()
        self._bytes = 0
        self._writer: Optional[asyncio.Task[None]] = None
        self._closer: Optional[asyncio.Task[None]] = None

    def send(self, text: str) -> None:
        if self._closer is not None:
            return  # closing: nothing more goes out
        if not self._texts and self._writable():
            self._write_now(text)
            return
        size = len(text)
        if (len(self._texts) >= self._settings.send_queue_messages
                or self._bytes + size > self._settings.send_queue_bytes):
            log.warning("%s does not read: its send queue is full (%d messages, %d bytes); "
                        "closing it with %d", self.name, len(self._texts), self._bytes,
                        p.CLOSE_TRY_AGAIN)
            self._texts.clear()
            self._bytes = 0
            self._begin_close(p.CLOSE_TRY_AGAIN, "send queue full", flush=False)
            return
        self._texts.append(text)
        self._bytes += size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close with ``code``; the first call wins."""
        self._begin_close(code, reason, flush=True)

    async def closed(self) -> None:
        """Wait until a close that was begun has finished (at most about 2 close timeouts)."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    def cancel(self) -> None:
        """The connection is gone: stop the writer."""
        if self._writer is not None:
            self._writer.cancel()

    def _writable(self) -> bool:
        """Open, and the transport's buffer under the limit (the library's own test before
        it makes ``send`` wait)."""
        transport = self.conn.transport
        return (self.conn.protocol.state is State.OPEN and not transport.is_closing()
                and transport.get_write_buffer_size() < self._settings.write_limit_bytes)

    def _write_now(self, text: str) -> None:
        # What conn.send does, minus the coroutine: the sans-I/O protocol frames the text,
        # the transport takes the bytes (it buffers what the socket does not take at once).
        protocol = self.conn.protocol
        protocol.send_text(text.encode())
        for data in protocol.data_to_send():
            self.conn.transport.write(data)

    @property
    def closing(self) -> bool:
        """A close was begun: what the client sends from now on is not served (a revoked
        or expired identity, a replaced connection, a flood, a shutdown). It is not acked
        either, so a client resends it on its next connection."""
        return self._closer is not None

    def _begin_close(self, code: int, reason: str, flush: bool) -> None:
        if self._closer is None:
            if code == p.CLOSE_POLICY:
                # A flood: read no more of it (its close answer included; the close
                # timeout ends it), so what it keeps sending costs nothing.
                self.conn.transport.pause_reading()
            if isinstance(self.conn, DirectConnection):
                # A client that ignores the close frame would otherwise be served until the
                # close timeout aborts it (a revoked device storing telemetry meanwhile).
                self.conn.stop()
            self._closer = asyncio.ensure_future(self._close(code, reason, flush))

    async def _write(self) -> None:
        try:
            while self._texts:
                text = self._texts.popleft()
                self._bytes -= len(text)
                # Waits only while the library's write buffer is over write_limit, that
                # is, while this client does not read; other clients are not involved.
                await self.conn.send(text)
        except ConnectionClosed:
            pass  # the handler sees the close and unregisters the client

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        timeout = self._settings.close_timeout_s
        writer = self._writer
        if writer is not None and not writer.done():
            if flush:
                # asyncio.wait, not wait_for: a timeout must not cancel the writer yet.
                await asyncio.wait([writer], timeout=timeout)
            writer.cancel()  # stuck in a send to a client that does not read
        try:
            # close() waits for the client to take the close frame and answer it; a
            # client that does not read would hold it forever.
            await asyncio.wait_for(self.conn.close(code, reason), timeout + 0.5)
        except asyncio.TimeoutError:
            self.conn.transport.abort()


HEALTH_PATH = "/healthz"  # for a load balancer: 200, or 503 while cut off from the cluster
Message = Union[str, bytes]
CLAIM_TIMEOUT_S = 10.0  # from a claim token's welcome to its device.claim
EARLY_FRAMES = 4  # frames held for a client still being authenticated; then reading pauses
# DirectConnection overrides process_event, an internal method of websockets' asyncio
# Connection (13 and later). A release without it gets the library's own path: slower,
# the same behaviour.
DIRECT_READS = callable(getattr(ServerConnection, "process_event", None))


class DirectConnection(GuardedConnection):
    """A connection that hands every whole message to ``sink`` as soon as it is parsed,
    inside ``data_received``: no message queue, no task wake-up per message.

    * Frames that arrive before :meth:`start` (the client is being authenticated) are
      kept, in order, and handed over first; past ``EARLY_FRAMES`` of them the connection
      stops reading until then, as the library's own queue would.
    * A fragmented message, or a text frame that is not UTF-8, switches the connection
      to the library's path for good (its queue, ``async for`` in the handler, 1007 for
      bad UTF-8), so order and the library's checks stay as they are. Clients do not
      fragment messages of a few hundred bytes; this is for correctness only.
    * ``sink`` must not raise and must not wait (``Hub.handle`` and ``SendQueue.send``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink: Optional[Callable[[Message], None]] = None
        self.direct = True
        self._early: List[Message] = []  # before start(), and while held, in order
        self._holding = False
        self._paused = False

    def start(self, sink: Callable[[Message], None]) -> None:
        self.sink = sink
        self.release()

    def hold(self) -> None:
        """Keep the frames that arrive, in order, until :meth:`release` (the message before
        them is still being worked on: a big batch); reading pauses meanwhile."""
        self._holding = True
        self._pause()

    def release(self) -> None:
        """Hand over what was kept, in order (a frame may hold again), then read on."""
        self._holding = False
        while self._early and not self._holding and self.sink is not None:
            self.sink(self._early.pop(0))
        if not self._holding and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def stop(self) -> None:
        self.sink = None

    def process_event(self, event: Any) -> None:
        if (not self.direct or self.request is None or not isinstance(event, Frame)
                or event.opcode not in (Opcode.TEXT, Opcode.BINARY)):
            super().process_event(event)  # control frames, and everything once switched
            return
        message: Message
        if not event.fin:
            self.direct = False
            super().process_event(event)
            return
        if event.opcode is Opcode.TEXT:
            try:
                message = str(event.data, "utf-8")
            except UnicodeDecodeError:
                self.direct = False  # the library closes with 1007, as it always did
                super().process_event(event)
                return
        else:
            message = bytes(event.data)
        if self.sink is None or self._holding:
            if self.sink is None and self.protocol.state in (State.CLOSING, State.CLOSED):
                return  # closing before it was served (bad token): nobody will read these
            self._early.append(message)
            if len(self._early) >= EARLY_FRAMES:
                self._pause()
            return
        self.sink(message)


def _tls_context(settings: ServerSettings) -> Any:
    if not settings.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.client_ca:
        # OPTIONAL: a certificate, when presented, must verify against client_ca (else the
        # TLS handshake fails); clients without one (operators, the page, devices still on
        # tokens) go on to the token check. require_client_cert is enforced there.
        context.load_verify_locations(settings.client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _end_auth(peer: hub_mod.Peer, reason: str) -> None:
    """End a served connection whose credential no longer holds (expired, revoked):
    ``AUTH_FAILED`` with ``reason``, then close 4000, as for one refused at connect."""
    peer.send(p.encode(p.make_error(p.AUTH_FAILED, reason, time.time())))
    peer.close(p.CLOSE_AUTH_FAILED, reason)


def _deliver(out: Answers) -> None:
    for peer, text in out:
        peer.send(text)


def _token_from(conn: ServerConnection) -> Optional[str]:
    """The JWT from ``Authorization: Bearer`` or, failing that, ``?token=``."""
    assert conn.request is not None
    headers = conn.request.headers.get_all("Authorization")
    if len(headers) > 1:
        raise AuthError("Authorization sent more than once")
    header = headers[0] if headers else ""
    if header.startswith("Bearer ") and header[7:].strip():
        return header[7:].strip()
    values = parse_qs(urlsplit(conn.request.path).query).get("token")
    return values[0] if values else None


class CompanionServer:
    """A running companion server; ``port`` is the bound port (useful with port 0).

    The constructor binds the port (OSError if it cannot); ``start()`` runs the
    event loop in a daemon thread; ``stop()`` ends it.
    """

    def __init__(self, settings: ServerSettings,
                 keys: Union[bytes, tokens.TokenKeys]) -> None:
        self.settings = settings
        # bytes: the guide's HS256 secret; or keys loaded from a PEM file (tokens.py)
        self._keys = keys if isinstance(keys, tokens.TokenKeys) else \
            tokens.TokenKeys.from_secret(keys)
        self._renew_share = settings.renew_at if self._keys.can_mint else None
        self._trusted = certs.parse_networks(settings.trusted_proxies)
        self._header_issuers = certs.load_bundle(settings.client_ca) \
            if settings.client_ca and settings.client_cert_header else None
        self.denylist = DenyList(settings.deny_file)
        self._claim_ca = None if not settings.claim_ca_cert else certs.ClaimCA(
            settings.claim_ca_cert, settings.claim_ca_key or "", settings.claim_days)
        self.hub = Hub(settings.db, HubSettings(
            settings.rate_limit_per_minute, settings.samples_per_minute,
            settings.max_operator_connections,
            batch=hub_mod.DEFAULT_BATCH_OFFER if settings.offer_batches else None,
            group_commit=not settings.redis_url, max_rows=settings.max_rows,
            max_rows_per_device=settings.max_rows_per_device))
        self._commit_scheduled = False
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._loop, self.loop_name = new_loop(settings.loop)
        self._tasks: Set[asyncio.Task[None]] = set()  # strong references to background tasks
        self.admission = Admission(settings.max_unauthenticated, settings.unauthenticated_bytes)
        self.cluster: Any = None
        if settings.redis_url:
            from .cluster import Cluster, ClusterSettings  # the 'cluster' extra (redis-py)

            self.cluster = Cluster(ClusterSettings(settings.redis_url, settings.node_id,
                                                   settings.dedupe_s), self.hub, _deliver)
        try:
            # Bound here, on this thread, before the loop runs: a busy port fails the
            # constructor, as callers expect.
            self._server: Server = self._loop.run_until_complete(self._serve())
        except BaseException:
            self._loop.close()
            self.hub.close()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="nexus-server-loop", daemon=True)

    async def _serve(self) -> Server:
        return await serve(
            self._handle, self.settings.host, self.settings.port,
            process_request=self._check_path,
            # Until the token says "device" on a node that offers batches (_serve_client).
            max_size=self.settings.max_message_bytes,
            # A stranger gets this long from accept to the end of its handshake (TLS's own
            # handshake included): an idle or trickling one is dropped then.
            open_timeout=self.settings.handshake_timeout_s,
            # Frames held for a client that is being served (a cluster node awaits Redis
            # per message): few, each up to max_size.
            max_queue=EARLY_FRAMES,
            ping_interval=self.settings.ping_interval_s,
            ping_timeout=self.settings.ping_timeout_s,
            close_timeout=self.settings.close_timeout_s,
            # Off: permessage-deflate keeps about 64 KiB of zlib state per connection,
            # telemetry is small, and a compression bomb would get around max_size.
            compression=None,
            write_limit=self.settings.write_limit_bytes,
            ssl=_tls_context(self.settings),
            backlog=1024,  # a reconnect storm arrives all at once
            # One node: messages go to the hub as they are parsed. A cluster node awaits
            # Redis per message, so it reads through the library's queue.
            # (A factory: websockets only calls it; its annotation asks for a class.)
            create_connection=cast(Any, functools.partial(
                DirectConnection if self.cluster is None and DIRECT_READS
                else GuardedConnection, admission=self.admission)),
        )

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://{self.settings.host}:{self.port}{p.PATH}"

    def start(self) -> CompanionServer:
        self._thread.start()
        log.info("listening on %s (event loop: %s)", self.url, self.loop_name)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._spawn(self._ticker())
        if self.cluster is not None:
            self._spawn(self.cluster.run())
        self._loop.run_forever()

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def health(self) -> Tuple[bool, str]:
        """(healthy, why), as ``GET /healthz`` answers it: a cluster node cut off from Redis
        (or whose reader stopped) is not healthy; a single node always is while it serves."""
        if self.cluster is None:
            return True, "serving as a single node"
        healthy, why = self.cluster.health()
        return healthy, why

    def _check_path(self, conn: ServerConnection, request: Any) -> Any:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            healthy, why = self.health()
            return page.plain(200 if healthy else 503,
                              "OK" if healthy else "Service Unavailable",
                              f"{'ok' if healthy else 'unhealthy'}: {why}\n")
        if path != p.PATH:
            # The fleet page's static files (page.py); no data, so no token needed.
            return page.response(path) or conn.respond(404, f"the Nexus endpoint is {p.PATH}\n")
        return None

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            _deliver(self.hub.tick(time.time(), time.monotonic()))
            for role, subject in self.denylist.refresh():
                for peer in self.hub.peers_of(role, subject):
                    log.warning("%s %s is revoked (deny file): closing its connection with "
                                "%d", role, subject, p.CLOSE_AUTH_FAILED)
                    _end_auth(peer, "Revoked")

    async def _handle(self, conn: ServerConnection) -> None:
        try:
            identity = self._authenticate(conn)
        except AuthError as exc:
            if isinstance(conn, GuardedConnection):
                conn.admitted()  # its close is bounded by close_timeout
            log.info("auth failed from %s: %s", conn.remote_address, exc)
            error = p.make_error(p.AUTH_FAILED, str(exc), time.time())
            try:
                await conn.send(p.encode(error))
            except ConnectionClosed:
                return
            await conn.close(p.CLOSE_AUTH_FAILED, "Authentication failed")
            return
        if isinstance(conn, GuardedConnection):
            conn.admitted()
        if identity.role == tokens.CLAIM:  # never the hub's: it would take it for an operator
            await self._serve_claim(conn, identity)
            return
        if identity.is_device and self.settings.offer_batches:
            # Read at the start of each frame: the next frame may be a batch. Everyone else
            # keeps max_message_bytes (websockets: protocol.max_message_size).
            conn.protocol.max_message_size = max(self.settings.max_message_bytes,
                                                 p.MAX_BATCH_BYTES)
        await self._serve_client(conn, identity)

    def _authenticate(self, conn: ServerConnection) -> tokens.Identity:
        """Who ``conn`` is, unless the deny file names it (AuthError "Revoked")."""
        identity = self._identify(conn)
        if self.denylist.refused(identity.role, identity.subject):
            log.warning("%s %s is revoked (deny file): refused", identity.role,
                        identity.subject)
            raise AuthError("Revoked")
        return identity

    def _identify(self, conn: ServerConnection) -> tokens.Identity:
        """Who ``conn`` is: its client certificate's device when it presented one (a token
        beside it that verifies must name the same device), else its token's identity."""
        by_cert = self._certificate_identity(conn)
        token = _token_from(conn)
        if by_cert is not None:
            if token is not None:
                try:
                    by_token: Optional[tokens.Identity] = self._keys.verify(token)
                except AuthError:
                    by_token = None  # the certificate authenticates; a stale token is moot
                if by_token is not None and (not by_token.is_device
                                             or by_token.subject != by_cert.subject):
                    raise AuthError("Token and client certificate name different identities")
            return by_cert
        if token is None:
            raise AuthError("Missing authentication token")
        identity = self._keys.verify(token)
        if identity.is_device and self.settings.require_client_cert:
            raise AuthError("Devices must present a client certificate on this server")
        return identity

    async def _serve_claim(self, conn: ServerConnection, identity: tokens.Identity) -> None:
        """One claim on a claim token's connection: ``connected`` offering ``device.claim``,
        one ``device.claim`` within CLAIM_TIMEOUT_S, answered with ``device.claimed`` (the
        certificate) or an ``error`` naming why, then close 1000."""
        now = time.time()
        if self._claim_ca is None:
            await self._refuse(conn, "This server takes no claims")
            return
        payload = p.welcome_payload(p.new_id("client"), now, None)
        payload["capabilities"] = {p.DEVICE_CLAIM: {"days": self.settings.claim_days}}
        if isinstance(conn, DirectConnection):
            conn.direct = False  # read through the library's queue: one message, awaited
        try:
            await conn.send(p.encode(p.make("connected", now, payload)))
            text = await asyncio.wait_for(conn.recv(), CLAIM_TIMEOUT_S)
            if self.denylist.refused(identity.role, identity.subject):
                # Revoked while it waited: claim connections are not the hub's, so the
                # ticker did not close it.
                await self._refuse(conn, "Revoked")
                return
            answer = self._claim(identity, text, time.time())
            await conn.send(answer)
            await conn.close(p.CLOSE_NORMAL, "claim answered")
        except asyncio.TimeoutError:
            await conn.close(p.CLOSE_POLICY, "no device.claim in time")
        except ConnectionClosed:
            pass

    def _claim(self, identity: tokens.Identity, text: Union[str, bytes], now: float) -> str:
        """The answer to a claim message: ``device.claimed`` or an ``error``."""
        from ..config import DEVICE_ID

        msg_id = None
        try:
            env = p.decode(text)
            msg_id = env.id
            if env.type != p.DEVICE_CLAIM or not isinstance(env.payload, dict):
                raise p.RemoteProtocolError(p.INVALID_MESSAGE, f"must be {p.DEVICE_CLAIM} "
                                            "with a payload", "type", env.id)
            device_id, csr = env.payload.get("device_id"), env.payload.get("csr")
            if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
                raise p.RemoteProtocolError(p.INVALID_MESSAGE, "must be 1 to 128 letters, "
                                            "digits or . _ : -", "payload.device_id", env.id)
            if not isinstance(csr, str) or len(csr) > p.MAX_CSR_CHARS:
                raise p.RemoteProtocolError(p.INVALID_MESSAGE, "must be a PEM certificate "
                                            f"request of at most {p.MAX_CSR_CHARS} characters",
                                            "payload.csr", env.id)
        except p.RemoteProtocolError as exc:
            return p.encode(p.make_error(exc.code, exc.message, now, exc.msg_id or msg_id,
                                         exc.field))
        if not device_id.startswith(identity.claim_prefix):
            return p.encode(p.make_error(p.FORBIDDEN, f"this claim token claims only ids "
                                         f"starting with {identity.claim_prefix!r}", now,
                                         msg_id))
        ca = self._claim_ca
        assert ca is not None
        try:
            public = ca.request_key(csr)
        except ValueError as exc:
            return p.encode(p.make_error(p.INVALID_MESSAGE, str(exc), now, msg_id, "payload.csr"))
        # Recorded before anything is signed (a leaked token past its max costs no
        # signature), with the key: the same device may repeat a claim whose answer it lost.
        refused = self.hub.claim(device_id, identity.subject, identity.claim_max, now,
                                 certs.key_id(public))
        if refused:
            log.warning("claim %s: %s", identity.subject, refused)
            return p.encode(p.make_error(p.FORBIDDEN, refused, now, msg_id))
        certificate = ca.sign(public, device_id, now)
        log.info("claim %s: device %s claimed; its certificate is valid for %d days",
                 identity.subject, device_id, self.settings.claim_days)
        return p.encode(p.make(p.DEVICE_CLAIMED, now, {"device_id": device_id,
                                                       "certificate": certificate}, msg_id))

    async def _refuse(self, conn: ServerConnection, reason: str) -> None:
        """AUTH_FAILED with ``reason``, then close 4000."""
        try:
            await conn.send(p.encode(p.make_error(p.AUTH_FAILED, reason, time.time())))
            await conn.close(p.CLOSE_AUTH_FAILED, "Authentication failed")
        except ConnectionClosed:
            pass

    def _certificate_identity(self, conn: ServerConnection) -> Optional[tokens.Identity]:
        """The device of a verified client certificate: from this node's TLS, or from the
        trusted terminator's header; None when there is none."""
        ssl_object = conn.transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:  # only with client_ca (CERT_OPTIONAL): verified by the handshake
                return certs.identity_from_der(der)
        name = self.settings.client_cert_header
        if not name:
            return None
        assert conn.request is not None
        values = conn.request.headers.get_all(name)
        if not values:
            return None
        if not certs.trusted(conn.remote_address, self._trusted):
            log.warning("%s sent %s but is not a trusted proxy (--trusted-proxy): refused",
                        conn.remote_address, name)
            raise AuthError(f"{name} is taken only from a trusted proxy")
        if len(values) > 1:
            raise AuthError(f"{name} sent {len(values)} times")
        return certs.identity_from_header(values[0], self._header_issuers)

    async def _serve_client(self, conn: ServerConnection, identity: tokens.Identity) -> None:
        if self.hub.exhausted(identity, time.monotonic()):
            # A token that flooded and reconnects: no welcome, no takeover of its other
            # connection; closed as its last connection was (1008), until its budget refills.
            log.info("%s %s is over its rate budget: connection refused with %d",
                     identity.role, identity.subject, p.CLOSE_POLICY)
            conn.transport.pause_reading()
            try:
                await asyncio.wait_for(conn.close(p.CLOSE_POLICY, "rate limit exceeded"),
                                       self.settings.close_timeout_s)
            except asyncio.TimeoutError:
                conn.transport.abort()
            return
        peer = SendQueue(conn, self.settings, f"{identity.role} {identity.subject}")
        renew_time = (identity.renew_time(self._renew_share)
                      if self._renew_share is not None else None)
        client, welcome = self.hub.connect(
            identity, peer, time.time(), time.monotonic(),
            renew_at=self._renew_share if renew_time is not None else None)
        peer.name = f"{client.client_id} ({peer.name})"
        log.info("%s connected", peer.name)
        peer.send(welcome)
        _deliver(self.hub.online(client, time.time()))  # events.update for the fleet page
        if isinstance(conn, DirectConnection):
            conn.start(functools.partial(self._on_direct, client, conn))
        # The token's exp is wall-clock time; the wait for it is on the loop's monotonic
        # clock, so a step of the wall clock neither ends a session early nor extends it.
        expiry = self._loop.call_later(max(0.0, identity.expires - time.time()),
                                       self._expired, peer, identity)
        renewal = None
        if renew_time is not None:  # before expires: the share is under 1
            renewal = self._loop.call_later(max(0.0, renew_time - time.time()),
                                            self._renew, peer, identity)
        try:
            # With a DirectConnection this sees only what it leaves to the library (a
            # fragmented message), and the end of the connection.
            async for frame in conn:
                if peer.closing:
                    continue  # see SendQueue.closing
                if self.cluster is None:
                    if self._on_message(client, frame):
                        await self._finish_job(client)
                else:
                    await self.cluster.handle(client, frame)
        except ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            if renewal is not None:
                renewal.cancel()
            if isinstance(conn, DirectConnection):
                conn.stop()
            _deliver(self.hub.disconnect(client, time.time()))
            if self.cluster is not None:
                self.cluster.disconnected(client)
            # A close we began (1008, 1013, 1000) must finish before this handler returns:
            # the library would otherwise close the connection itself, with its own code.
            await peer.closed()
            peer.cancel()
            rcvd = conn.close_code if conn.close_code is not None else "none"
            log.info("%s disconnected (close code %s)", client.client_id, rcvd)

    def _expired(self, peer: SendQueue, identity: tokens.Identity) -> None:
        """The token's exp (or the certificate's notAfter) has passed: AUTH_FAILED, then
        4000, as for a credential refused at connect (the client needs a new one)."""
        what = "Client certificate" if identity.certificate else "Token"
        log.info("%s: its %s expired; closing it with %d", peer.name, what.lower(),
                 p.CLOSE_AUTH_FAILED)
        _end_auth(peer, f"{what} expired")

    def _renew(self, peer: SendQueue, identity: tokens.Identity) -> None:
        """The device's token passed the renewal share of its lifetime: send a fresh one for
        the same subject and role with the same lifetime (docs/protocol.md section 9). The
        connection stays under the token it was opened with; a renewal lost on the way
        costs nothing (the old token still works; the next connection gets another)."""
        assert identity.issued is not None
        now = time.time()
        lifetime = min(identity.expires - identity.issued, self.settings.max_token_lifetime_s)
        try:
            token = self._keys.mint(identity.subject, identity.role, lifetime, now)
        except Exception:  # noqa: BLE001 - the connection goes on under its token; say why
            log.exception("could not mint a renewal for %s", peer.name)
            return
        log.info("%s: token renewed (the old one expires in %.0f s)", peer.name,
                 identity.expires - now)
        peer.send(p.encode(p.make(p.TOKEN_RENEWED, now, {"token": token})))

    def _on_direct(self, client: hub_mod.Client, conn: DirectConnection,
                   message: Message) -> None:
        """One message, inside the transport's data_received (DirectConnection). A big batch
        goes on in later turns of the loop; the connection keeps what follows until then."""
        if self._on_message(client, message):
            conn.hold()
            self._spawn(self._finish_job(client, conn))

    def _on_message(self, client: hub_mod.Client, message: Message) -> bool:
        """One message to the hub, its answers sent; True when it left work for
        :meth:`_finish_job` (``client.job``)."""
        try:
            _deliver(self.hub.handle(client, message, time.time(), mono=time.monotonic()))
            self._schedule_commit()
        except Exception:  # noqa: BLE001 - never into the transport: it would drop the link
            log.exception("internal error delivering the answers to %s", client.client_id)
        return client.job is not None

    async def _finish_job(self, client: hub_mod.Client,
                          conn: Optional[DirectConnection] = None) -> None:
        """The rest of a big batch, one step per turn of the event loop (other clients are
        served in between); then what ``conn`` kept meanwhile, in order."""
        try:
            while client.job is not None:
                await asyncio.sleep(0)
                _deliver(self.hub.resume(client, time.time()))
                self._schedule_commit()
        except Exception:  # noqa: BLE001 - the connection goes on; say why
            log.exception("internal error storing a batch from %s", client.client_id)
            client.job = None
        finally:
            if conn is not None:
                conn.release()

    def _schedule_commit(self) -> None:
        if self.hub.uncommitted and not self._commit_scheduled:
            # After every message read in this loop step: they share one commit.
            self._commit_scheduled = True
            self._loop.call_soon(self._commit)

    def _commit(self) -> None:
        """The store's group commit (with --db), then the answers that waited for it."""
        self._commit_scheduled = False
        out, closes = self.hub.commit()
        _deliver(out)
        for peer, code, reason in closes:
            peer.close(code, reason)

    async def _shutdown(self) -> None:
        self._server.close(close_connections=False)  # no new connections from here on
        self._commit()  # the last acks go out before the closes below
        # All at once, so a crowd of unresponsive clients costs one close timeout, not one
        # each. Each flushes what is queued for it first (the last acks).
        peers = [peer for peer in self.hub.peers() if isinstance(peer, SendQueue)]
        for peer in peers:
            peer.close(p.CLOSE_NORMAL, "Server shutting down")
        if peers:
            await asyncio.gather(*(peer.closed() for peer in peers))
        # Connections still authenticating; the library closes them with the code given.
        for conn in self._server.connections:
            self._spawn(conn.close(p.CLOSE_NORMAL, "Server shutting down"))
        for guarded in list(self.admission.waiting):  # a handshake not finished: no close code
            if guarded.request is None or guarded.protocol.state is not State.OPEN:
                guarded.transport.abort()
        try:
            await asyncio.wait_for(self._server.wait_closed(), self.settings.close_timeout_s + 1)
        except asyncio.TimeoutError:
            log.warning("some connections did not close in time")
        for task in list(self._tasks):
            task.cancel()
        if self.cluster is not None:
            await self.cluster.close()

    def stop(self) -> None:
        """Close every client with 1000, stop serving, close the store. Safe to call twice."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                done.result(3 * self.settings.close_timeout_s + 5.0)
            except Exception:  # noqa: BLE001 - stopping anyway; say why
                log.exception("shutdown did not finish cleanly")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        else:  # never started
            self._loop.run_until_complete(self._shutdown())
        if not self._thread.is_alive():
            self._loop.close()
        self.hub.close()
        log.info("stopped")

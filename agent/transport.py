"""The only code that talks to the server: connect, send, read, reconnect.

The rules of a connection (welcome, ack window, pace, pings, ack timeout,
RATE_LIMITED, rejects, commands) live in ``session.py``, sans I/O. This module
is the I/O around them:

* One thread (the one running :meth:`Transport.run`) owns the socket and all
  per-connection state. Other threads reach it only through the outbox (new
  messages) and :meth:`Transport.wake` (a byte on a pipe, so ``select`` returns
  at once instead of polling).
* What is sent comes from the outbox, oldest first; a message leaves the
  outbox only on its ``ack``; whatever is in flight when a connection drops is
  sent again, with the same id, on the next one.
* Backlog and live messages are interleaved (``SendPlan``): the messages that
  were waiting at connect time (the backlog) are sent in order, alternating
  with those sampled since, so a long backlog never starves live data. Each
  stream is in order.
* Reconnects go on forever: full-jitter exponential backoff capped at
  ``max_delay_s``, reset only after a connection that worked (welcome received,
  at least one ack or pong) and stayed up for ``STABLE_S``: a server that acks
  once and closes sees the delays grow like any other failure. A refused token
  (close 4000, HTTP 401/403; also when it expires during a connection) backs
  off at the cap and is logged once until it changes, unless the token file
  already holds another token (a provisioning script rotated it): that one is
  tried after the base delay.
* What the server sends is bounded: a frame over ``MAX_INCOMING_MESSAGE`` is
  refused before its payload is read, and so is a fragmented message whose
  parts add up to more. Frames are read one at a time with a timeout that ends
  at the session's next deadline, so a peer that trickles bytes or fragments
  cannot hold the loop: pings, ack timeouts and sends go on.
* A message the server refuses for good is set aside in the outbox (see
  ``Outbox.set_aside``), never retried forever in front of the others: one
  answered with ``INVALID_MESSAGE``; one over the protocol's size limit; and
  one that was the oldest in flight when the server closed the connection
  with a refusing code (1003, 1007, 1009, 1011) ``STRIKES`` times in a row.
* Stopping: no new sends; wait up to ``DRAIN_S`` for in-flight acks (cut
  short by :meth:`Transport.hurry`); close with 1000. Nothing is lost by a
  stop: unacked messages stay in the outbox.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import quote

from . import auth
from . import protocol as p
from .config import Config
from .errors import AuthError, ProtocolError
from .logsetup import redact
from .outbox import Outbox, Record
from .session import (  # noqa: F401 - TokenBucket: re-exported for callers and tests
    AuthRefused,
    BatchesRefused,
    ConnectionLost,
    Outgoing,
    Session,
    SessionConfig,
    TokenBucket,
)

log = logging.getLogger("nexus.transport")

MAX_INCOMING_MESSAGE = 1 << 20  # a frame, or a fragmented message all together
# What we send in one telemetry.batch, whatever is offered: each batch is built, encoded
# and masked in memory (a few copies of it at once), and a Pi's RAM is not ours. 256 KiB
# still moves a day at 1 s (86,400 samples) in under 4 minutes at 30 spare messages a minute.
MAX_BATCH_BYTES = 256 * 1024
BATCH_ENVELOPE_BYTES = 512  # type, id, timestamp, device id and punctuation
# One batch in flight at a time: each is up to hundreds of KB held until its ack, and on
# a link where acks take longer than the pace's interval more would not go faster anyway.
BATCHES_IN_FLIGHT = 1
BATCH_READ_ROWS = 100  # rows read from the outbox at a time while a batch is put together
DRAIN_S = 2.0
SAFETY_WAKE_S = 10.0  # the longest the loop sleeps with nothing due (wake-ups come by pipe)
MAX_FRAMES_PER_READ = 64
# Close codes that say "I will not take what you sent" (not "I am going away").
REFUSING_CLOSE_CODES = (1003, 1007, p.CLOSE_TOO_BIG, p.CLOSE_INTERNAL)
STRIKES = 3  # refusing closes in a row with the same oldest message before it is set aside
STABLE_S = 10.0  # a connection must last this long (and get an ack) to reset the backoff


def import_websocket(url: str) -> Any:
    """Import websocket-client; for a ``ws://`` URL, without loading ``ssl`` (about 3 MB).

    websocket-client imports ssl only if it can (``HAVE_SSL``); hiding the module
    for the duration of that import keeps it out of a plain-TCP agent. A later
    switch to ``wss://`` then needs a restart, which ``service`` says.
    """
    if "websocket" in sys.modules or not url.startswith("ws://") or "ssl" in sys.modules:
        import websocket

        return websocket
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import websocket
    finally:
        del sys.modules["ssl"]
    return websocket


def tls_options(url: str, ca_file: Optional[str]) -> Optional[Dict[str, Any]]:
    """websocket-client's ``sslopt`` for ``url``: verify the server, against ``ca_file`` if
    given (a private CA), else the system store. None for ``ws://`` (no ssl import)."""
    if not url.startswith("wss://"):
        return None
    import ssl

    options: Dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True}
    if ca_file:
        options["ca_certs"] = ca_file
    return options


# --------------------------------------------------------------------------- shared state


@dataclass
class Health:
    """Connection facts other threads read (``status``, the sampler). Writes: transport only."""

    connected: bool = False
    reconnects: int = 0
    last_ack_at: Optional[float] = None
    clock_offset_s: Optional[float] = None
    token_expires: Optional[float] = None
    last_error: str = ""
    sent: int = 0  # messages (a batch is one)
    sent_items: int = 0  # stored messages sent, resends included (a batch counts its items)
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Called (on the writer's thread) when a fact changes: connected, last_error, or a
    # message set aside. The service uses it to rewrite the status file at once, while
    # counters (sent, acked...) wait for its slower pace.
    on_fact: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    FACTS = ("connected", "last_error")

    def update(self, **changes: Any) -> None:
        with self.lock:
            fact = any(getattr(self, key) != changes[key] for key in self.FACTS
                       if key in changes)
            for key, value in changes.items():
                setattr(self, key, value)
        if fact:
            self.fact_changed()

    def add(self, key: str, amount: int = 1, **more: int) -> None:
        """Add to counters: ``add("sent")``, or several under one lock:
        ``add("sent", sent_items=3)``."""
        with self.lock:
            setattr(self, key, getattr(self, key) + amount)
            for other, value in more.items():
                setattr(self, other, getattr(self, other) + value)

    def acked_now(self, count: int, at: float) -> None:
        with self.lock:
            self.acked += count
            self.last_ack_at = at

    def fact_changed(self) -> None:
        if self.on_fact is not None:
            self.on_fact()

    def snapshot(self) -> Health:
        with self.lock:
            return replace(self, lock=threading.Lock())


# --------------------------------------------------------------------------- pacing


class Jitter:
    """Uniform random numbers for the backoff's jitter, from ``os.urandom``: the ``random``
    module (and ``secrets``, which imports it) cost about 0.15 MB of RSS in the daemon for
    a call or two a reconnect (docs/performance.md, "Footprint"). Tests may pass a
    ``random.Random`` instead: anything with ``uniform(low, high)``."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * (int.from_bytes(os.urandom(7), "big") / 2.0 ** 56)


def backoff_delays(base: float, cap: float, rng: Any) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**n)]."""
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))
        attempt += 1


# --------------------------------------------------------------------------- opening


def tcp_socket(ws_mod: Any, url: str, timeout: float) -> Optional[socket.socket]:
    """The TCP connection for a ``ws://`` URL with an ASCII host and no proxy, opened here
    the way websocket-client opens its own (every address in turn, its socket options:
    TCP_NODELAY and keepalive); None when websocket-client should open it (``wss://``,
    a proxy from the environment, a non-ASCII host name).

    Why: ``socket.getaddrinfo`` encodes a ``str`` host with the ``idna`` codec, which
    loads ``encodings.idna``, ``stringprep`` and ``unicodedata`` (0.3 to 0.45 MB of RSS
    for the whole run) for a host name that is plain ASCII; a ``bytes`` host skips the
    codec.
    """
    if not url.startswith("ws://"):
        return None
    ws_url, ws_socket = ws_mod._url, ws_mod._socket  # its URL parser and socket options

    hostname, port, _, _ = ws_url.parse_url(url)
    try:
        host = hostname.encode("ascii")
    except UnicodeEncodeError:
        return None
    if ws_url.get_proxy_info(hostname, False)[0]:
        return None  # http_proxy applies: websocket-client tunnels through it
    error: Optional[OSError] = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0,
                                                              socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            for option in ws_socket.DEFAULT_SOCKET_OPTION:
                sock.setsockopt(*option)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {hostname}")


def dial(ws_mod: Any, url: str, header: List[str], timeout: float,
         ca_file: Optional[str]) -> Any:
    """``create_connection``, a refused handshake sorted: 401/403 is AuthRefused, any other
    HTTP status ConnectionLost; network errors come through as they are."""
    sock = tcp_socket(ws_mod, url, timeout)
    try:
        return ws_mod.create_connection(url, header=header, timeout=timeout,
                                        sslopt=tls_options(url, ca_file), socket=sock)
    except ws_mod.WebSocketBadStatusException as exc:
        if exc.status_code in (401, 403):
            raise AuthRefused(f"HTTP {exc.status_code} at the handshake") from None
        raise ConnectionLost(f"HTTP {exc.status_code} at the handshake") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def open_welcomed(url: str, token: str, ca_file: Optional[str] = None,
                  timeout: float = 10.0) -> Any:
    """A header-authenticated connection that got its ``connected`` (nexus-ctl, provision).

    AuthRefused when the server refuses the token; ConnectionLost, OSError or a
    websocket-client error when it cannot be reached or answers something else.
    """
    ws = dial(import_websocket(url), url, [f"Authorization: Bearer {token}"], timeout, ca_file)
    try:
        env = p.decode(ws.recv())
        if env.type == "error":
            raise AuthRefused(f"server refused the token: {p.parse_error(env).message}")
        if env.type != "connected":
            raise ConnectionLost(f"unexpected first message {env.type!r}")
    except (AuthRefused, ConnectionLost):
        ws.close()
        raise
    except Exception as exc:  # noqa: BLE001 - a timeout or close of websocket-client's own type
        ws.close()
        raise ConnectionLost(f"no welcome from {url}: {exc}") from None
    return ws


# --------------------------------------------------------------------------- what to send next


class SendPlan:
    """Which stored messages go next on this connection.

    Two cursors over the outbox: ``backlog`` (seq up to ``boundary``, what was
    waiting at connect) and ``live`` (above it). Both read a few rows at a time
    (never the whole backlog). Live goes first, so a sample taken now leaves
    within one interval however long the backlog; the backlog takes what the
    pace leaves. With a ``batch`` offer the backlog's telemetry goes out as
    lists of records (one ``telemetry.batch``) within both of its limits.
    """

    def __init__(self, outbox: Outbox, boundary: int, rows: int,
                 batch: Optional[p.BatchOffer] = None, device_id: str = "") -> None:
        self.outbox = outbox
        self.boundary = boundary
        self.rows = rows
        self.batch = batch
        self.device_id = device_id
        self.backlog_seq = 0
        self.live_seq = boundary
        self.buffers: Dict[str, Deque[Record]] = {"backlog": collections.deque(),
                                                  "live": collections.deque()}
        self.generation = outbox.generation
        # The outbox is read only when it may hold something unread: live rows after a
        # wake-up (every put is followed by one, see ``new_rows``), backlog rows until a
        # read comes back short (nothing is ever added at or below the boundary). An idle
        # or steady connection used to run two empty queries on every pass of the loop.
        self.live_unread = True
        self.backlog_unread = True

    def new_rows(self) -> None:
        """Something may have been put since the last read (the transport was woken)."""
        self.live_unread = True

    def _restart_if_replaced(self) -> None:
        """The outbox replaced a corrupt file: its seqs start again, so do the cursors."""
        if self.outbox.generation != self.generation:
            self.generation = self.outbox.generation
            self.boundary = self.backlog_seq = self.live_seq = 0
            self.live_unread, self.backlog_unread = True, False
            for buf in self.buffers.values():
                buf.clear()

    def _refill(self, stream: str, rows: int) -> bool:
        """True when the stream's buffer holds something."""
        buf = self.buffers[stream]
        if not buf:
            if stream == "backlog":
                if not self.backlog_unread:
                    return False
                got = self.outbox.read_after(self.backlog_seq, rows, upto=self.boundary)
                self.backlog_seq = got[-1].seq if got else self.backlog_seq
                self.backlog_unread = len(got) == rows
            else:
                if not self.live_unread:
                    return False
                # Cleared before the read: a put after it comes with a wake-up of its own.
                got = self.outbox.read_after(self.live_seq, rows)
                self.live_seq = got[-1].seq if got else self.live_seq
                self.live_unread = len(got) == rows
            buf.extend(got)
        return bool(buf)

    def next(self, batch_allowed: bool = True
             ) -> Union[Record, List[Tuple[str, str]], None]:
        """A record to send alone, or a batch as (id, item text) pairs, or None.
        ``batch_allowed`` False (a batch is still in flight): live records only."""
        self._restart_if_replaced()
        if self._refill("live", self.rows):
            return self.buffers["live"].popleft()
        if self.batch is not None and not batch_allowed:
            return None
        if self.batch is None:
            return self.buffers["backlog"].popleft() if self._refill("backlog", self.rows) \
                else None
        items = self._next_batch(self.batch)
        if items:
            return items
        return self.buffers["backlog"].popleft() if self._refill("backlog", self.rows) else None

    def _next_batch(self, offer: p.BatchOffer) -> List[Tuple[str, str]]:
        """Backlog telemetry from the front of the backlog, up to both limits (may be []).
        Only ids and item texts are kept: the records go as soon as they are read."""
        room = min(offer.max_bytes, MAX_BATCH_BYTES) - BATCH_ENVELOPE_BYTES
        items: List[Tuple[str, str]] = []
        buf = self.buffers["backlog"]
        while len(items) < offer.max_items and self._refill("backlog", BATCH_READ_ROWS):
            text = _item_text(buf[0], self.device_id)
            if text is None:
                break  # not telemetry of this device: it goes alone, after this batch
            size = len(text.encode("utf-8")) + 1
            if size > room:
                break
            room -= size
            items.append((buf.popleft().id, text))
        return items


def _item_text(record: Record, device_id: str) -> Optional[str]:
    """The batch item for a stored telemetry message of ``device_id``, else None."""
    if record.type != "telemetry":
        return None
    try:
        payload = json.loads(record.payload)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("device_id") != device_id or \
            set(payload) != {"device_id", "metrics"}:
        return None
    return p.batch_item_text(record.id, record.ts, payload["metrics"])


# --------------------------------------------------------------------------- the transport


CommandHandler = Callable[[p.CommandRequest], None]


class Transport:
    def __init__(self, config: Config, outbox: Outbox, health: Health,
                 on_command: Optional[CommandHandler] = None,
                 rng: Optional[Any] = None) -> None:
        self.config = config
        self.outbox = outbox
        self.health = health
        self.on_command = on_command
        self.rng = rng or Jitter()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._auth_refused_logged = False
        self._token_used = ""  # the token of the last connection attempt
        self._ws_module: Any = None
        self.worked = False
        self._hurry = threading.Event()
        self.batches_allowed = True  # off for good once a server refuses a whole batch
        self._strikes: Tuple[str, int] = ("", 0)  # (oldest in-flight id, refusing closes)

    # ------------------------------------------------------------------ other threads

    def wake(self) -> None:
        """Make the transport look at the outbox now (called after a put)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def hurry(self) -> None:
        """Stopping a second time: do not wait for in-flight acks (main thread only)."""
        self._hurry.set()
        self.wake()

    def set_config(self, config: Config) -> None:
        """Take a reloaded config; it applies from the next connection."""
        self.config = config

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Connect, serve, reconnect, until ``stop`` is set."""
        cfg = self.config.reconnect
        delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
        while not stop.is_set():
            self.worked = False  # set by the session on its first ack or pong
            started = time.monotonic()
            try:
                self._connection(stop)
            except AuthRefused as exc:
                self._note_auth_refused(str(exc))
                cap = self.config.reconnect.max_delay_s
                self._after_connection(str(exc))
                if self._token_rotated():
                    log.info("the token file holds a new token; trying it")
                    stop.wait(self.config.reconnect.base_delay_s)
                else:
                    stop.wait(self.rng.uniform(cap / 2, cap))
                continue
            except (ConnectionLost, OSError, ProtocolError) as exc:
                self._after_connection(str(exc))
            except Exception as exc:  # noqa: BLE001 - websocket-client raises its own tree
                self._after_connection(_describe(exc))
            if stop.is_set():
                break
            if self.worked and time.monotonic() - started >= STABLE_S:
                # However it ended, this connection worked for a while: start over at base.
                cfg = self.config.reconnect
                delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
            delay = next(delays)
            log.info("reconnecting in %.1f s", delay)
            stop.wait(delay)
        self.health.update(connected=False)

    def _after_connection(self, reason: str) -> None:
        reason = redact(reason)  # a library's message may quote the URL, ?token= and all
        was_connected = self.health.connected
        self.health.update(connected=False, last_error=reason)
        self.health.add("reconnects")
        if was_connected:
            log.warning("connection lost: %s", reason)
        else:
            log.info("cannot connect: %s", reason)

    def set_aside(self, record_id: str, reason: str) -> None:
        """Take a message the server will never accept out of the queue (logged, counted)."""
        if self.outbox.set_aside(record_id, reason):
            self.health.fact_changed()
            log.error("set aside message %s: %s; it is kept in the outbox's set_aside table "
                      "and not sent again", record_id, reason)

    def _strike(self, oldest: Optional[str], code: Optional[int], reason: str) -> None:
        """A connection ended: if the server refused it, count against the oldest in flight."""
        if code not in REFUSING_CLOSE_CODES or oldest is None:
            return
        count = self._strikes[1] + 1 if self._strikes[0] == oldest else 1
        self._strikes = (oldest, count)
        if count >= STRIKES:
            self._strikes = ("", 0)
            self.set_aside(oldest, f"the server closed the connection {count} times in a row "
                           f"while it was the oldest message in flight ({reason})")

    def _token_rotated(self) -> bool:
        """The token file (or NEXUS_TOKEN) holds another token than the one refused."""
        try:
            return auth.read_token(self.config.server.token_file) != self._token_used
        except AuthError:
            return False

    def _note_auth_refused(self, reason: str) -> None:
        if not self._auth_refused_logged:
            log.error("the server refused the token (%s); retrying about every %.0f s; check "
                      "server.token_file or NEXUS_TOKEN (logged once until it changes)", reason,
                      self.config.reconnect.max_delay_s)
            self._auth_refused_logged = True

    # ------------------------------------------------------------------ one connection

    def _open(self) -> Any:
        server = self.config.server
        token = auth.read_token(server.token_file)  # re-read on every connect (rotation)
        self._token_used = token
        self.health.update(token_expires=auth.expiry(token))
        if self._ws_module is None:
            self._ws_module = import_websocket(server.url)
        ws_mod = self._ws_module
        url, header = server.url, []
        if server.auth == "query":
            url += ("&" if "?" in url else "?") + "token=" + quote(token, safe="")
        else:
            header.append(f"Authorization: Bearer {token}")
        ws = dial(ws_mod, url, header, server.connect_timeout_s, server.ca_file)
        _limit_frames(ws, MAX_INCOMING_MESSAGE)
        return ws

    def _connection(self, stop: threading.Event) -> None:
        """One connection from open to close (or to the exception that ended it)."""
        try:
            ws = self._open()
        except AuthError as exc:
            raise ConnectionLost(f"no usable token: {exc}") from None
        connection = _Connection(self, ws)
        try:
            connection.serve(stop)
        except BatchesRefused as exc:
            self.batches_allowed = False
            log.error("%s", exc)
            raise
        except ConnectionLost as exc:
            self._strike(connection.session.oldest_in_flight(), exc.code, str(exc))
            raise
        finally:
            connection.close()


class _Connection:
    """One connection's I/O: the socket, ``select`` and the outbox around a
    :class:`~agent.session.Session`, which holds every rule. Transport thread only."""

    def __init__(self, transport: Transport, ws: Any) -> None:
        self.t = transport
        self.ws = ws
        cfg = transport.config
        self.session = Session(SessionConfig(
            cfg.device_id, cfg.server.connect_timeout_s, cfg.server.ping_interval_s,
            cfg.server.ping_timeout_s, cfg.server.ack_timeout_s, cfg.server.ack_window,
            cfg.server.max_messages_per_minute, transport.on_command is not None,
            batches=transport.batches_allowed), time.monotonic())
        self.plan: Optional[SendPlan] = None
        self.message = _Reassembly(MAX_INCOMING_MESSAGE)
        self.read_timeout = cfg.server.connect_timeout_s  # what a send may block for

    # ------------------------------------------------------------------ main loop

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            self._fill(now)
            self.session.tick(now, time.time())
            self._apply()
            # Every wake-up comes by pipe (a put, a command result, stop, hurry) or is a
            # session deadline; SAFETY_WAKE_S is only a net under that, long enough not to
            # cost CPU when idle at a 5 s interval (it used to be 1 s).
            self._wait_and_read(min(self.session.deadline(now), now + SAFETY_WAKE_S) - now)
        self._drain()

    def _fill(self, now: float) -> None:
        """Send stored messages while the session allows (window, rate, pause)."""
        if self.plan is None:
            return
        while self.session.may_send(now):
            message = self.session.next_retry() or self._next_stored()
            if message is None:
                return
            self.session.send(message, now)
            self.t.health.add("sent", sent_items=len(message.items) or 1)
        self._apply()

    def _next_stored(self) -> Optional[Outgoing]:
        assert self.plan is not None
        # Only with a batch offer can a batch be in flight (singles skip the count: it ran
        # over the whole window for every message of a drain).
        batches = 0 if self.plan.batch is None else \
            sum(1 for message, _ in self.session.inflight.values() if message.items)
        while True:
            record = self.plan.next(batch_allowed=batches < BATCHES_IN_FLIGHT)
            if record is None:
                return None
            if isinstance(record, list):  # a telemetry.batch
                batch_id = p.new_id("batch")
                text = p.batch_text(batch_id, time.time(), self.t.config.device_id,
                                    [item for _, item in record])
                return Outgoing(batch_id, text, tuple(msg_id for msg_id, _ in record))
            try:
                return Outgoing(record.id, record.envelope_text())
            except p.LocalProtocolError as exc:  # stored by an older version, or a bug
                self.t.set_aside(record.id, f"over the protocol's size limit ({exc.message})")

    def _apply(self) -> None:
        """Carry out what the session decided: write, delete, set aside, hand over."""
        s = self.session
        if s.open and self.plan is None:
            self._welcomed(s)
        sends, s.sends = s.sends, []
        for text in sends:
            self.ws.send(text)
        if s.acks:
            # One transaction (one fsync) for a burst of acks instead of one each.
            acked, s.acks = s.acks, []
            self.t.outbox.ack(acked)
            self.t.health.acked_now(len(acked), time.time())
        aside, s.set_aside = s.set_aside, []
        for msg_id, reason in aside:
            self.t.set_aside(msg_id, reason)
        commands, s.commands = s.commands, []
        for request in commands:
            assert self.t.on_command is not None
            self.t.on_command(request)
        if s.worked:
            self.t.worked = True

    def _welcomed(self, s: Session) -> None:
        assert s.welcome is not None
        t = self.t
        self.plan = SendPlan(t.outbox, t.outbox.stats().last_seq, self.session.cfg.ack_window,
                             s.batch_offer, t.config.device_id)
        offset = s.welcome.server_time - time.time()
        t.health.update(connected=True, clock_offset_s=round(offset, 3))
        if t._auth_refused_logged:
            log.warning("the server accepts the token again")
            t._auth_refused_logged = False
        log.info("connected as %s (clock offset to the server %+.3f s%s)", s.welcome.client_id,
                 offset, "; telemetry.batch offered" if s.batch_offer else "")

    def _wait_and_read(self, timeout: float) -> None:
        sock = self.ws.sock
        if sock is None:
            raise ConnectionLost("socket closed")
        if not _has_unread(sock, self.ws):
            readable, _, _ = select.select([sock, self.t._wake_r], [], [], max(0.0, timeout))
            if self.t._wake_r in readable:
                _drain_pipe(self.t._wake_r)
                if self.plan is not None:
                    self.plan.new_rows()
            if sock not in readable:
                return
        # Read every frame already waiting, then apply them together. Each read may wait
        # only until the next timer: a peer that trickles a frame must not hold this thread.
        now = time.monotonic()
        sock.settimeout(max(0.05, min(self.session.deadline(now), now + 1.0) - now))
        try:
            for _ in range(MAX_FRAMES_PER_READ):
                self._read_frame()
                if not _has_unread(sock, self.ws) and not select.select([sock], [], [], 0)[0]:
                    break
        except self.t._ws_module.WebSocketTimeoutException:
            pass  # part of a frame came; websocket-client keeps it and goes on next time
        finally:
            sock.settimeout(self.read_timeout)
            self._apply()  # even when the connection drops mid-burst

    def _read_frame(self) -> None:
        """Read one frame (not one message: fragments are put together here, bounded)."""
        abnf = self.t._ws_module.ABNF
        frame = self.ws.recv_frame()
        opcode = frame.opcode
        self.session.frame_seen(time.monotonic())
        if opcode == abnf.OPCODE_PING:
            self.ws.pong(frame.data)  # websocket-client checked it is a valid control frame
        elif opcode == abnf.OPCODE_CLOSE:
            _closed_by_server(frame.data)
        elif opcode in (abnf.OPCODE_TEXT, abnf.OPCODE_BINARY, abnf.OPCODE_CONT):
            data = self.message.add(opcode == abnf.OPCODE_CONT, frame.fin, frame.data)
            if data is not None:
                self.session.receive(data, time.monotonic(), time.time())

    # ------------------------------------------------------------------ closing

    def _drain(self) -> None:
        """Stopping: wait briefly for the acks of what is in flight, then close with 1000."""
        deadline = time.monotonic() + DRAIN_S
        while self.session.inflight and time.monotonic() < deadline and \
                not self.t._hurry.is_set():
            self._wait_and_read(deadline - time.monotonic())

    def close(self) -> None:
        try:
            self.ws.close(status=p.CLOSE_NORMAL, timeout=1.0)
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            pass
        if self.session.inflight:
            log.info("%d messages were in flight; they stay queued and are sent again",
                     len(self.session.inflight))


def _closed_by_server(data: bytes) -> None:
    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    reason = data[2:].decode("utf-8", "replace")
    if code == p.CLOSE_AUTH_FAILED:
        raise AuthRefused(f"close {code} {reason}".strip(), code)
    raise ConnectionLost(f"server closed the connection with {code} {reason}".strip(), code)


def _has_unread(sock: Any, ws: Any) -> bool:
    """Bytes already read from the socket but not yet parsed: TLS's decrypted buffer, and
    websocket-client's own (it reads up to 16 KiB at a time, so a burst of acks sits there
    after the first is parsed, invisible to ``select``)."""
    pending = getattr(sock, "pending", None)
    return bool((pending and pending()) or ws.frame_buffer.recv_buffer)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


class _Reassembly:
    """Puts a fragmented message together, refusing one over ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: List[bytes] = []
        self.size = 0
        self.open = False

    def add(self, continuation: bool, fin: bool, data: bytes) -> Optional[bytes]:
        """The whole message once its last frame is in, else None."""
        if continuation != self.open:
            what = "a continuation frame without a start" if continuation else \
                "a new message inside a fragmented one"
            raise ConnectionLost(f"the server broke the fragmentation rules: {what}", 1002)
        self.size += len(data)
        if self.size > self.limit:
            raise ConnectionLost(f"the server sent a message of over {self.limit} bytes "
                                 "(in fragments)", p.CLOSE_TOO_BIG)
        if fin and not self.parts:
            self.size = 0
            return data
        self.parts.append(data)
        self.open = not fin
        if not fin:
            return None
        whole = b"".join(self.parts)
        self.parts, self.size = [], 0
        return whole


def _limit_frames(ws: Any, limit: int) -> None:
    """Refuse frames over ``limit`` bytes before their payload is read into memory.

    websocket-client has no such limit; its frame buffer reads the length, then
    the payload. We check in between.
    """
    buffer = ws.frame_buffer
    read_length = buffer.recv_length

    def checked_recv_length() -> None:
        read_length()
        if buffer.length is not None and buffer.length > limit:
            raise ConnectionLost(f"the server sent a frame of {buffer.length} bytes "
                                 f"(limit {limit})", p.CLOSE_TOO_BIG)

    buffer.recv_length = checked_recv_length


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


"""The only code that talks to the server: connect, send, read, heartbeat, reconnect.

Rules and guarantees:

* One thread (the one running :meth:`Transport.run`) owns the socket and all
  per-connection state. Other threads reach it only through the outbox (new
  messages) and :meth:`Transport.wake` (a byte on a pipe, so ``select`` returns
  at once instead of polling).
* What is sent comes from the outbox, oldest first, at most ``ack_window``
  messages unacknowledged at a time, and never faster than
  ``max_messages_per_minute`` (a token bucket that pings share), so the
  server's rate limit is never hit. A message leaves the outbox only on its
  ``ack``; whatever is in flight when a connection drops is sent again, with
  the same id, on the next one.
* Backlog and live messages are interleaved: the messages that were waiting at
  connect time (the backlog) are sent in order, alternating with those sampled
  since, so a long backlog never starves live data. Each stream is in order.
* A dead peer is noticed even when TCP stays silent: a ``ping`` goes out after
  ``ping_interval_s`` without traffic, and no answer within ``ping_timeout_s``
  ends the connection. An ack that does not come within ``ack_timeout_s`` does
  the same.
* Reconnects go on forever: full-jitter exponential backoff capped at
  ``max_delay_s``, reset only after a connection that worked (welcome received,
  at least one ack or pong) and stayed up for ``STABLE_S``: a server that acks
  once and closes sees the delays grow like any other failure. A refused token
  (close 4000, HTTP 401/403) backs off at the cap and is logged once until it
  changes.
* What the server sends is bounded: a frame over ``MAX_INCOMING_MESSAGE`` is
  refused before its payload is read, and so is a fragmented message whose
  parts add up to more. Frames are read one at a time with a timeout that ends
  at the next timer, so a peer that trickles bytes or fragments cannot hold
  the loop: pings, ack timeouts and sends go on.
* A message the server refuses for good is set aside in the outbox (see
  ``Outbox.set_aside``), never retried forever in front of the others: one
  answered with ``INVALID_MESSAGE``; one over the protocol's size limit; and
  one that was the oldest in flight when the server closed the connection
  with a refusing code (1003, 1007, 1009, 1011) ``STRIKES`` times in a row.
* Stopping: no new sends; wait up to ``drain_s`` for in-flight acks (cut
  short by :meth:`Transport.hurry`); close with 1000. Nothing is lost by a
  stop: unacked messages stay in the outbox.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import select
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

from . import auth
from . import protocol as p
from .config import Config
from .errors import AuthError, ProtocolError
from .logsetup import redact
from .outbox import Outbox, Record

log = logging.getLogger("nexus.transport")

MAX_INCOMING_MESSAGE = 1 << 20  # a frame, or a fragmented message all together
DRAIN_S = 2.0
MAX_FRAMES_PER_READ = 64
REJECTING_CODES = (p.INVALID_MESSAGE,)  # the server will never accept that message as it is
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
    sent: int = 0
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self, key, value)

    def add(self, key: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, key, getattr(self, key) + amount)

    def snapshot(self) -> Health:
        with self.lock:
            return replace(self, lock=threading.Lock())


# --------------------------------------------------------------------------- pacing


def backoff_delays(base: float, cap: float, rng: random.Random) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**n)]."""
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))
        attempt += 1


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, min(10.0, per_minute / 10.0))
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until a token is available."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


# --------------------------------------------------------------------------- errors


class ConnectionLost(Exception):
    """This connection is over; ``code`` is the close code when the server sent one."""

    def __init__(self, reason: str, code: Optional[int] = None) -> None:
        super().__init__(reason)
        self.code = code


class AuthRefused(ConnectionLost):
    """The server refused our token (close 4000, or 401/403 at the handshake)."""


# --------------------------------------------------------------------------- opening


def dial(ws_mod: Any, url: str, header: List[str], timeout: float,
         ca_file: Optional[str]) -> Any:
    """``create_connection``, a refused handshake sorted: 401/403 is AuthRefused, any other
    HTTP status ConnectionLost; network errors come through as they are."""
    try:
        return ws_mod.create_connection(url, header=header, timeout=timeout,
                                        sslopt=tls_options(url, ca_file))
    except ws_mod.WebSocketBadStatusException as exc:
        if exc.status_code in (401, 403):
            raise AuthRefused(f"HTTP {exc.status_code} at the handshake") from None
        raise ConnectionLost(f"HTTP {exc.status_code} at the handshake") from None


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
    """Which stored message goes next on this connection.

    Two cursors over the outbox: ``backlog`` (seq up to ``boundary``, what was
    waiting at connect) and ``live`` (above it). Both read a few rows at a time
    (never the whole backlog); ``retry`` holds messages the server asked us to
    send again (RATE_LIMITED), which go first.
    """

    def __init__(self, outbox: Outbox, boundary: int, batch: int) -> None:
        self.outbox = outbox
        self.boundary = boundary
        self.batch = batch
        self.backlog_seq = 0
        self.live_seq = boundary
        self.buffers: Dict[str, Deque[Record]] = {"backlog": collections.deque(),
                                                  "live": collections.deque()}
        self.retry: Deque[Record] = collections.deque()
        self.turn = "backlog"

    def _refill(self, stream: str) -> None:
        buf = self.buffers[stream]
        if buf:
            return
        if stream == "backlog":
            rows = self.outbox.read_after(self.backlog_seq, self.batch, upto=self.boundary)
        else:
            rows = self.outbox.read_after(self.live_seq, self.batch)
        if rows:
            if stream == "backlog":
                self.backlog_seq = rows[-1].seq
            else:
                self.live_seq = rows[-1].seq
            buf.extend(rows)

    def next(self) -> Optional[Record]:
        if self.retry:
            return self.retry.popleft()
        for stream in (self.turn, "live" if self.turn == "backlog" else "backlog"):
            self._refill(stream)
            if self.buffers[stream]:
                self.turn = "live" if stream == "backlog" else "backlog"
                return self.buffers[stream].popleft()
        return None


# --------------------------------------------------------------------------- the transport


CommandHandler = Callable[[p.CommandRequest], None]


class Transport:
    def __init__(self, config: Config, outbox: Outbox, health: Health,
                 on_command: Optional[CommandHandler] = None,
                 rng: Optional[random.Random] = None) -> None:
        self.config = config
        self.outbox = outbox
        self.health = health
        self.on_command = on_command
        self.rng = rng or random.Random()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._auth_refused_logged = False
        self._ws_module: Any = None
        self.worked = False
        self._hurry = threading.Event()
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
            log.error("set aside message %s: %s; it is kept in the outbox's set_aside table "
                      "and not sent again", record_id, reason)

    def _strike(self, session: _Session, code: Optional[int], reason: str) -> None:
        """A connection ended: if the server refused it, count against the oldest in flight."""
        if code not in REFUSING_CLOSE_CODES or not session.inflight:
            return
        oldest = next(iter(session.inflight))
        count = self._strikes[1] + 1 if self._strikes[0] == oldest else 1
        self._strikes = (oldest, count)
        if count >= STRIKES:
            self._strikes = ("", 0)
            self.set_aside(oldest, f"the server closed the connection {count} times in a row "
                           f"while it was the oldest message in flight ({reason})")

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
        session = _Session(self, ws)
        try:
            session.serve(stop)
        except ConnectionLost as exc:
            self._strike(session, exc.code, str(exc))
            raise
        finally:
            session.close()


class _Session:
    """The state of one connection; lives and dies on the transport thread."""

    def __init__(self, transport: Transport, ws: Any) -> None:
        self.t = transport
        self.ws = ws
        self.cfg = transport.config.server
        self.inflight: collections.OrderedDict[str, Tuple[Record, float]] = \
            collections.OrderedDict()
        now = time.monotonic()
        self.bucket = TokenBucket(self.cfg.max_messages_per_minute, now)
        self.last_rx = now
        self.ping_sent: Optional[float] = None
        self.pause_until = 0.0
        self.throttled = False
        self.welcomed = False
        self.plan: Optional[SendPlan] = None
        self.acked: List[str] = []
        self.message = _Reassembly(MAX_INCOMING_MESSAGE)

    # ------------------------------------------------------------------ main loop

    def serve(self, stop: threading.Event) -> None:
        self._await_welcome()
        t = self.t
        self.plan = SendPlan(t.outbox, t.outbox.stats().last_seq, self.cfg.ack_window)
        if t.on_command is not None:
            self._send_text(p.encode(p.make("subscribe", time.time(), {
                "channel": "commands", "filters": {"device_id": t.config.device_id}})))
        while not stop.is_set():
            now = time.monotonic()
            self._fill(now)
            self._check_timers(now)
            self._wait_and_read(self._next_deadline(now) - now)
        self._drain()

    def _await_welcome(self) -> None:
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while not self.welcomed:
            if time.monotonic() > deadline:
                raise ConnectionLost("no 'connected' message from the server")
            self._wait_and_read(deadline - time.monotonic())

    def _fill(self, now: float) -> None:
        """Send stored messages while the window has room and the rate allows.

        Sets ``throttled`` when messages may be waiting but the rate (or a RATE_LIMITED
        pause) holds them back: only then is there a reason to wake before a frame, a
        wake-up or a timer. An empty outbox must not spin the loop.
        """
        assert self.plan is not None
        self.throttled = False
        while len(self.inflight) < self.cfg.ack_window:
            if now < self.pause_until or self.bucket.wait(now) > 0:
                self.throttled = True
                return
            record = self.plan.next()
            if record is None:
                return
            try:
                text = record.envelope_text()
            except p.LocalProtocolError as exc:  # stored by an older version, or a bug
                self.t.set_aside(record.id, f"over the protocol's size limit ({exc.message})")
                continue
            self.bucket.take(now)
            self._send_text(text)
            self.inflight[record.id] = (record, now)
            self.t.health.add("sent")

    def _check_timers(self, now: float) -> None:
        if self.ping_sent is not None and now - self.ping_sent > self.cfg.ping_timeout_s:
            raise ConnectionLost(f"no answer to ping within {self.cfg.ping_timeout_s:g} s")
        if self.ping_sent is None and now - self.last_rx >= self.cfg.ping_interval_s:
            self.bucket.take(now)  # pings count against the server's rate limit too
            self._send_text(p.encode(p.make("ping", time.time())))
            self.ping_sent = now
        if self.inflight:
            _, sent_at = next(iter(self.inflight.values()))
            if now - sent_at > self.cfg.ack_timeout_s:
                raise ConnectionLost(f"no ack within {self.cfg.ack_timeout_s:g} s")

    def _next_deadline(self, now: float) -> float:
        deadlines = [self.last_rx + self.cfg.ping_interval_s, now + 1.0]
        if self.ping_sent is not None:
            deadlines.append(self.ping_sent + self.cfg.ping_timeout_s)
        if self.inflight:
            deadlines.append(next(iter(self.inflight.values()))[1] + self.cfg.ack_timeout_s)
        if self.throttled:
            deadlines.append(max(self.pause_until, now + self.bucket.wait(now)))
        return max(now, min(deadlines))

    def _wait_and_read(self, timeout: float) -> None:
        sock = self.ws.sock
        if sock is None:
            raise ConnectionLost("socket closed")
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes
        if not (pending and pending()):
            readable, _, _ = select.select([sock, self.t._wake_r], [], [], max(0.0, timeout))
            if self.t._wake_r in readable:
                _drain_pipe(self.t._wake_r)
            if sock not in readable:
                return
        # Read every frame already waiting, then delete all their acks in one transaction
        # (one fsync for a burst of acks instead of one each). Each read may wait only until
        # the next timer: a peer that trickles a frame must not hold this thread.
        now = time.monotonic()
        sock.settimeout(max(0.05, self._next_deadline(now) - now))
        try:
            for _ in range(MAX_FRAMES_PER_READ):
                self._read_frame()
                if not _readable_now(sock):
                    break
        except self.t._ws_module.WebSocketTimeoutException:
            pass  # part of a frame came; websocket-client keeps it and goes on next time
        finally:
            sock.settimeout(self.cfg.connect_timeout_s)  # what sends may block for
            self._flush_acks()  # even when the connection drops mid-burst

    def _flush_acks(self) -> None:
        if self.acked:
            self.t.outbox.ack(self.acked)
            self.t.health.update(last_ack_at=time.time())
            self.t.health.add("acked", len(self.acked))
            self.acked = []

    def _read_frame(self) -> None:
        """Read one frame (not one message: fragments are put together here, bounded)."""
        abnf = self.t._ws_module.ABNF
        frame = self.ws.recv_frame()
        opcode = frame.opcode
        self.last_rx = time.monotonic()
        self.ping_sent = None  # any frame proves the peer alive (even an error for our ping)
        if opcode == abnf.OPCODE_PING:
            self.ws.pong(frame.data)  # websocket-client checked it is a valid control frame
        elif opcode == abnf.OPCODE_CLOSE:
            self._closed_by_server(frame.data)
        elif opcode in (abnf.OPCODE_TEXT, abnf.OPCODE_BINARY, abnf.OPCODE_CONT):
            data = self.message.add(opcode == abnf.OPCODE_CONT, frame.fin, frame.data)
            if data is not None:
                self._handle(data)

    def _closed_by_server(self, data: bytes) -> None:
        code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
        reason = data[2:].decode("utf-8", "replace")
        if code == p.CLOSE_AUTH_FAILED:
            raise AuthRefused(f"close {code} {reason}".strip(), code)
        raise ConnectionLost(f"server closed the connection with {code} {reason}".strip(), code)

    # ------------------------------------------------------------------ messages

    def _handle(self, data: Any) -> None:
        try:
            env = p.decode(data.decode("utf-8") if isinstance(data, bytes) else data)
        except (ProtocolError, UnicodeDecodeError) as exc:
            log.warning("ignored a malformed message from the server: %s", exc)
            return
        handler = _HANDLERS.get(env.type)
        if handler is None:
            if not env.type.endswith(".update"):
                log.debug("ignored a message of type %r", env.type[:64])
            return
        try:
            handler(self, env)
        except ProtocolError as exc:
            log.warning("ignored a %s message: %s", env.type, exc)

    def _on_connected(self, env: p.Envelope) -> None:
        welcome = p.parse_welcome(env)
        offset = welcome.server_time - time.time()
        self.t.health.update(connected=True, clock_offset_s=round(offset, 3))
        self.welcomed = True
        if self.t._auth_refused_logged:
            log.warning("the server accepts the token again")
            self.t._auth_refused_logged = False
        log.info("connected as %s (clock offset to the server %+.3f s)", welcome.client_id,
                 offset)

    def _on_ack(self, env: p.Envelope) -> None:
        if env.id is None or env.id not in self.inflight:
            return  # an ack for a message we no longer track (e.g. dropped): harmless
        del self.inflight[env.id]
        self.acked.append(env.id)  # deleted from the outbox by _flush_acks
        self.t.worked = True

    def _on_pong(self, env: p.Envelope) -> None:
        self.ping_sent = None
        self.t.worked = True

    def _on_error(self, env: p.Envelope) -> None:
        error = p.parse_error(env)
        entry = self.inflight.pop(error.msg_id, None) if error.msg_id else None
        if error.code == p.RATE_LIMITED and entry is not None:
            assert self.plan is not None
            self.plan.retry.append(entry[0])
            self.pause_until = time.monotonic() + 5.0
            log.warning("server rate limit hit; pausing sends for 5 s")
        elif error.code in REJECTING_CODES and entry is not None:
            self.t.set_aside(entry[0].id, f"the server rejected it: {error.code}: "
                             f"{error.message}" + (f" (field {error.field})" if error.field
                                                   else ""))
        elif error.code == p.AUTH_FAILED:
            raise AuthRefused(f"{error.code}: {error.message}")
        else:
            # Kept in the outbox: it is sent again on the next connection.
            log.error("server error %s: %s%s", error.code, error.message,
                      f" (message {error.msg_id})" if error.msg_id else "")

    def _on_command(self, env: p.Envelope) -> None:
        if self.t.on_command is None:
            return
        request = p.parse_command_delivery(env)
        if request.device_id != self.t.config.device_id:
            log.warning("ignored command %s addressed to %s", request.command_id,
                        request.device_id)
            return
        self.t.on_command(request)

    # ------------------------------------------------------------------ sending and closing

    def _send_text(self, text: str) -> None:
        self.ws.send(text)

    def _drain(self) -> None:
        """Stopping: wait briefly for the acks of what is in flight, then close with 1000."""
        deadline = time.monotonic() + DRAIN_S
        while self.inflight and time.monotonic() < deadline and not self.t._hurry.is_set():
            self._wait_and_read(deadline - time.monotonic())

    def close(self) -> None:
        try:
            self.ws.close(status=p.CLOSE_NORMAL, timeout=1.0)
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            pass
        if self.inflight:
            log.info("%d messages were in flight; they stay queued and are sent again",
                     len(self.inflight))


_HANDLERS: Dict[str, Callable[[_Session, p.Envelope], None]] = {
    "connected": _Session._on_connected,
    "ack": _Session._on_ack,
    "pong": _Session._on_pong,
    "error": _Session._on_error,
    "commands.update": _Session._on_command,
}


def _readable_now(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    if pending and pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


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


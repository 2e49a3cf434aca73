"""The rules of one connection, sans I/O: messages, wake-ups and ``now`` in; what to
send, what to delete, when to wake and when to end, out.

No socket, no thread, no clock, no database here (the house rule for protocol
code): the transport (``transport.py``) owns the socket, ``select``, dialling
and backoff, reads stored messages from the outbox and passes ``now`` in. The
tests drive this class against an in-memory fake server.

The rules, all of them:

* **Welcome.** Nothing is sent before the server's ``connected``; none within
  ``connect_timeout_s`` ends the connection. Then, when the agent runs
  commands, one ``subscribe`` to channel ``commands`` for its own device id.
* **Window and pace.** At most ``ack_window`` messages unacknowledged, and no
  more than ``max_messages_per_minute`` sent (a token bucket; pings take from
  it too), so the server's rate limit is never hit.
* **Batches.** Only when the welcome offers ``telemetry.batch`` (and the
  config allows it) does :attr:`batch_offer` say so; the transport then sends
  the backlog as batches within the offered limits. A batch is one message for
  the window and the pace.
* **Acks.** An ``ack`` for a message in flight moves its id to ``acks`` (the
  transport deletes them from the outbox, a burst in one transaction); for a
  batch, the ids of all its items, except those the ack lists as
  ``rejected``, which are set aside with the server's reason. An ack for
  anything else is ignored.
* **Errors.** ``RATE_LIMITED`` for a message in flight: it goes first again,
  after a 5 s pause of all sends. ``INVALID_MESSAGE`` or ``UNKNOWN_MESSAGE_TYPE``
  for one: it is set aside
  (``set_aside``), never sent again; for a whole batch (or
  ``UNKNOWN_MESSAGE_TYPE`` for one) the connection ends with
  :class:`BatchesRefused` instead and nothing is set aside: the transport
  sends single messages from then on. ``AUTH_FAILED``: the connection ends as
  refused. Any other: logged; the message stays queued for the next connection.
* **Liveness.** Any frame proves the peer alive. After ``ping_interval_s``
  without one, a ``ping``; no frame within ``ping_timeout_s`` of it ends the
  connection. The oldest message in flight without an ack for
  ``ack_timeout_s`` ends it too.
* **Commands.** A ``commands.update`` for this device becomes a
  :class:`~agent.protocol.CommandRequest` in ``commands``; one addressed to
  another device is logged and dropped.
* **Worked.** The first ack or pong marks the connection as one that worked
  (the transport's backoff uses it).
* **Ending.** The connection ends by :class:`ConnectionLost` (or its subclass
  :class:`AuthRefused`) raised from the call that found the reason, with the
  server's close code when there was one.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import protocol as p
from .errors import ProtocolError

log = logging.getLogger("nexus.transport")

RATE_LIMIT_PAUSE_S = 5.0
# The server will never accept that message as it is. UNKNOWN_MESSAGE_TYPE for a single
# stored message (a type damaged on disk, or one this server does not take) is one too:
# kept, it would stay the oldest in flight and end every connection at the ack timeout.
REJECTING_CODES = (p.INVALID_MESSAGE, p.UNKNOWN_MESSAGE_TYPE)


class ConnectionLost(Exception):
    """This connection is over; ``code`` is the close code when the server sent one."""

    def __init__(self, reason: str, code: Optional[int] = None) -> None:
        super().__init__(reason)
        self.code = code


class AuthRefused(ConnectionLost):
    """The server refused our token (close 4000, AUTH_FAILED, or 401/403 at the handshake)."""


class AckTimeout(ConnectionLost):
    """The oldest message in flight got no ack within ``ack_timeout_s``."""


class BatchesRefused(ConnectionLost):
    """The server offered telemetry.batch but refused one as a whole: use single messages."""


@dataclass(frozen=True)
class Outgoing:
    """What goes out for stored messages: its id and wire text; for a ``telemetry.batch``,
    ``items`` are the ids of the stored messages it carries (its ack covers them all)."""

    id: str
    text: str
    items: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionConfig:
    device_id: str
    connect_timeout_s: float
    ping_interval_s: float
    ping_timeout_s: float
    ack_timeout_s: float
    ack_window: int
    max_messages_per_minute: int
    subscribe_commands: bool = False
    batches: bool = True  # take the server's telemetry.batch offer when there is one


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


class Session:
    """One connection's state. ``now`` is monotonic seconds; ``wall`` (for message
    timestamps and the clock offset) is seconds since the epoch."""

    def __init__(self, cfg: SessionConfig, now: float,
                 make_id: Callable[[], str] = p.new_id) -> None:
        self.cfg = cfg
        self.make_id = make_id
        self.started = now
        self.welcome: Optional[p.Welcome] = None
        self.inflight: collections.OrderedDict[str, Tuple[Outgoing, float]] = \
            collections.OrderedDict()
        self.retry: Deque[Outgoing] = collections.deque()
        self.bucket = TokenBucket(cfg.max_messages_per_minute, now)
        self.last_rx = now
        self.ping_sent: Optional[float] = None
        self.pause_until = 0.0
        self.throttled = False
        self.worked = False
        # What the caller takes after each call (and empties):
        self.sends: List[str] = []  # texts to write, in order
        self.acks: List[str] = []  # ids the server acknowledged: delete from the outbox
        self.set_aside: List[Tuple[str, str]] = []  # (id, reason): refused for good
        self.commands: List[p.CommandRequest] = []  # command requests for this device

    # ------------------------------------------------------------------ state

    @property
    def open(self) -> bool:
        """Welcomed: stored messages may go."""
        return self.welcome is not None

    @property
    def batch_offer(self) -> Optional[p.BatchOffer]:
        """The server's telemetry.batch limits, when offered and allowed."""
        if self.welcome is None or not self.cfg.batches:
            return None
        return self.welcome.batch

    # ------------------------------------------------------------------ inputs

    def frame_seen(self, now: float) -> None:
        """Any frame from the peer, complete message or not, control or data."""
        self.last_rx = now
        self.ping_sent = None  # any frame proves the peer alive (even an error for our ping)

    def receive(self, text: str | bytes, now: float, wall: float) -> None:
        """One complete message from the server."""
        try:
            env = p.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
        except (ProtocolError, UnicodeDecodeError) as exc:
            log.warning("ignored a malformed message from the server: %s", exc)
            return
        handler = _HANDLERS.get(env.type)
        if handler is None:
            if not env.type.endswith(".update"):
                log.debug("ignored a message of type %r", env.type[:64])
            return
        try:
            handler(self, env, now, wall)
        except ProtocolError as exc:
            log.warning("ignored a %s message: %s", env.type, exc)

    def may_send(self, now: float) -> bool:
        """True when one more stored message may go now (window, pause, rate).

        Sets ``throttled`` when messages may be waiting but the rate (or a RATE_LIMITED
        pause) holds them back: only then is there a reason to wake before a frame, a
        wake-up or a timer. An empty outbox must not spin the loop.
        """
        self.throttled = False
        if not self.open or len(self.inflight) >= self.cfg.ack_window:
            return False
        if now < self.pause_until or self.bucket.wait(now) > 0:
            self.throttled = True
            return False
        return True

    def next_retry(self) -> Optional[Outgoing]:
        """A message the server asked us to send again: it goes before anything else."""
        return self.retry.popleft() if self.retry else None

    def send(self, message: Outgoing, now: float) -> None:
        """Send a stored message (the caller checked :meth:`may_send`)."""
        self.bucket.take(now)
        self.sends.append(message.text)
        self.inflight[message.id] = (message, now)

    def tick(self, now: float, wall: float) -> None:
        """Timers: raise ConnectionLost when one ran out; queue a ping when it is time."""
        if not self.open:
            if now - self.started > self.cfg.connect_timeout_s:
                raise ConnectionLost("no 'connected' message from the server")
            return
        if self.ping_sent is not None and now - self.ping_sent > self.cfg.ping_timeout_s:
            raise ConnectionLost(f"no answer to ping within {self.cfg.ping_timeout_s:g} s")
        if self.ping_sent is None and now - self.last_rx >= self.cfg.ping_interval_s:
            self.bucket.take(now)  # pings count against the server's rate limit too
            self.sends.append(p.encode(p.make("ping", wall, msg_id=self.make_id())))
            self.ping_sent = now
        if self.inflight:
            _, sent_at = next(iter(self.inflight.values()))
            if now - sent_at > self.cfg.ack_timeout_s:
                raise AckTimeout(f"no ack within {self.cfg.ack_timeout_s:g} s")

    def deadline(self, now: float) -> float:
        """When the caller must call :meth:`tick` again at the latest (monotonic)."""
        if not self.open:
            return self.started + self.cfg.connect_timeout_s
        # While a ping is out, its timeout is the deadline, not the (past) time to send one:
        # the loop must not spin waiting for the pong.
        deadlines = [self.last_rx + self.cfg.ping_interval_s if self.ping_sent is None
                     else self.ping_sent + self.cfg.ping_timeout_s]
        if self.inflight:
            deadlines.append(next(iter(self.inflight.values()))[1] + self.cfg.ack_timeout_s)
        if self.throttled:
            deadlines.append(max(self.pause_until, now + self.bucket.wait(now)))
        return max(now, min(deadlines))

    def oldest_in_flight(self) -> Optional[str]:
        return next(iter(self.inflight)) if self.inflight else None

    def batch_in_flight(self) -> Optional[Outgoing]:
        """A telemetry.batch sent and not yet acked, if any."""
        return next((m for m, _ in self.inflight.values() if m.items), None)

    # ------------------------------------------------------------------ messages

    def _on_connected(self, env: p.Envelope, now: float, wall: float) -> None:
        self.welcome = p.parse_welcome(env)
        if self.cfg.subscribe_commands:
            self.sends.append(p.encode(p.make("subscribe", wall, {
                "channel": "commands", "filters": {"device_id": self.cfg.device_id}},
                msg_id=self.make_id())))

    def _on_ack(self, env: p.Envelope, now: float, wall: float) -> None:
        if env.id is None or env.id not in self.inflight:
            return  # an ack for a message we no longer track (e.g. dropped): harmless
        message, _ = self.inflight.pop(env.id)
        self.worked = True
        if not message.items:
            self.acks.append(env.id)
            return
        rejected = _rejected_items(env.payload, message.items)
        for index, item_id in enumerate(message.items):
            if index in rejected:
                self.set_aside.append((item_id, f"the server rejected it in a batch: "
                                       f"{rejected[index]}"))
            else:
                self.acks.append(item_id)

    def _on_pong(self, env: p.Envelope, now: float, wall: float) -> None:
        self.ping_sent = None
        self.worked = True

    def _on_error(self, env: p.Envelope, now: float, wall: float) -> None:
        error = p.parse_error(env)
        entry = self.inflight.pop(error.msg_id, None) if error.msg_id else None
        if error.code == p.RATE_LIMITED and entry is not None:
            self.retry.append(entry[0])
            self.pause_until = now + RATE_LIMIT_PAUSE_S
            log.warning("server rate limit hit; pausing sends for %g s", RATE_LIMIT_PAUSE_S)
        elif entry is not None and entry[0].items and error.code in REJECTING_CODES:
            raise BatchesRefused(f"the server refused a telemetry.batch ({error.code}: "
                                 f"{error.message}); sending single messages from now on")
        elif error.code in REJECTING_CODES and entry is not None:
            self.set_aside.append((entry[0].id, f"the server rejected it: {error.code}: "
                                   f"{error.message}" + (f" (field {error.field})"
                                                         if error.field else "")))
        elif error.code == p.AUTH_FAILED:
            raise AuthRefused(f"{error.code}: {error.message}")
        else:
            # Kept in the outbox: it is sent again on the next connection.
            log.error("server error %s: %s%s", error.code, error.message,
                      f" (message {error.msg_id})" if error.msg_id else "")

    def _on_command(self, env: p.Envelope, now: float, wall: float) -> None:
        if not self.cfg.subscribe_commands:
            return
        request = p.parse_command_delivery(env)
        if request.device_id != self.cfg.device_id:
            log.warning("ignored command %s addressed to %s", request.command_id,
                        request.device_id)
            return
        self.commands.append(request)


def _rejected_items(payload: Any, items: Tuple[str, ...]) -> Dict[int, str]:
    """index -> reason, for the items a batch's ack lists as rejected (by index and id)."""
    listed = payload.get("rejected") if isinstance(payload, dict) else None
    out: Dict[int, str] = {}
    for entry in listed if isinstance(listed, list) else []:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, int) and 0 <= index < len(items) and \
                entry.get("id") in (None, items[index]):
            out[index] = f"{entry.get('field', '')}: {entry.get('message', '')}"[:300]
    return out


_HANDLERS: Dict[str, Callable[[Session, p.Envelope, float, float], None]] = {
    "connected": Session._on_connected,
    "ack": Session._on_ack,
    "pong": Session._on_pong,
    "error": Session._on_error,
    "commands.update": Session._on_command,
}

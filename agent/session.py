"""The rules of one connection, sans I/O: messages, frames and ``now`` in; typed events
out (what to send, what the server took, what it refused for good, a command to run,
when and why the connection ends).

No socket, no thread, no clock, no database here (the house rule for protocol
code): the transport (``transport.py``) owns the socket, ``select``, dialling
and backoff, reads stored messages from the outbox and passes ``now`` in. Every
call that can change something returns the list of :data:`Event` it caused, in
order, and the caller acts on each in one loop (h11's ``next_event``, without a
list kept here for callers to empty). The tests drive this class against the
companion server's own hub in memory and read the events.

The rules, all of them:

* **Welcome.** Nothing is sent before the server's ``connected``
  (:class:`Opened`); none within ``connect_timeout_s`` ends the connection.
  Then, when the agent runs commands, one ``subscribe`` to channel
  ``commands`` for its own device id.
* **Window and pace.** At most ``ack_window`` messages unacknowledged, and no
  more than ``max_messages_per_minute`` sent (a token bucket; pings take from
  it too), so the server's rate limit is never hit.
* **Batches.** Only when the welcome offers ``telemetry.batch`` (and the
  config allows it) does :attr:`batch_offer` say so; the transport then sends
  the backlog as batches within the offered limits. A batch is one message for
  the window and the pace.
* **Acks.** An ``ack`` for a message in flight is :class:`Acked` with its id;
  for a batch, with the ids of all its items but those the ack lists as
  ``rejected``, each of which is :class:`Refused` with the server's reason. An
  ack for anything else is ignored.
* **Errors.** ``RATE_LIMITED`` for a message in flight: it goes first again,
  after a 5 s pause of all sends. ``INVALID_MESSAGE`` or
  ``UNKNOWN_MESSAGE_TYPE`` for a single message: :class:`Refused`, never sent
  again; for a whole batch the connection ends (:class:`Ended`,
  ``BATCHES_REFUSED``) and nothing is refused: the transport sends single
  messages from then on. ``AUTH_FAILED``: the connection ends as refused. Any
  other: logged; the message stays queued for the next connection.
* **Liveness.** Any frame proves the peer alive. After ``ping_interval_s``
  without one, a ``ping``; no frame within ``ping_timeout_s`` of it ends the
  connection. The oldest message in flight without an ack for
  ``ack_timeout_s`` ends it too.
* **Token renewal.** When the welcome offers ``token.renew`` and the config
  takes renewals (``renew_tokens``: the agent keeps them in its state directory),
  the first ``token.renewed`` of a connection is a :class:`TokenRenewed`;
  otherwise, and after it, it is ignored.
* **Commands.** A ``commands.update`` for this device is a
  :class:`CommandArrived`; one addressed to another device is logged and
  dropped.
* **Worked.** The first ack or pong is :class:`Worked` (the transport's backoff
  uses it).
* **Ending.** :class:`Ended` says why (an :class:`End`), with the server's close
  code when there was one, the oldest message in flight and the size of a batch
  in flight (the transport's strikes and batch halving use them). It is the
  last event: after it every call returns nothing. The server's close frame
  reaches the session through :meth:`Session.closed`.
"""

from __future__ import annotations

import collections
import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from . import protocol as p
from .errors import ProtocolError

log = logging.getLogger("nexus.session")

RATE_LIMIT_PAUSE_S = 5.0
# The server will never accept that message as it is. UNKNOWN_MESSAGE_TYPE for a single
# stored message (a type damaged on disk, or one this server does not take) is one too:
# kept, it would stay the oldest in flight and end every connection at the ack timeout.
REJECTING_CODES = (p.INVALID_MESSAGE, p.UNKNOWN_MESSAGE_TYPE)


# --------------------------------------------------------------------------- events


class End(enum.Enum):
    """Why a connection ended."""

    NO_WELCOME = "no welcome"
    PING_TIMEOUT = "ping timeout"
    ACK_TIMEOUT = "ack timeout"
    CLOSED = "closed by the server"
    AUTH_REFUSED = "token refused"
    BATCHES_REFUSED = "batches refused"


@dataclass(frozen=True)
class Send:
    """Write this text to the peer."""

    text: str


@dataclass(frozen=True)
class Opened:
    """The server's welcome: stored messages may go from now on."""

    welcome: p.Welcome


@dataclass(frozen=True)
class Acked:
    """The server has these stored messages: take them out of the queue. ``batch``: they
    came in one ``telemetry.batch``."""

    ids: Tuple[str, ...]
    batch: bool = False


@dataclass(frozen=True)
class Refused:
    """The server will never take this stored message: set it aside with the reason."""

    id: str
    reason: str


@dataclass(frozen=True)
class CommandArrived:
    request: p.CommandRequest


@dataclass(frozen=True)
class Worked:
    """The first ack or pong of this connection."""


@dataclass(frozen=True)
class TokenRenewed:
    """A fresh token from the server (``token.renewed``, offered in the welcome): keep it
    for the next connections."""

    token: str


@dataclass(frozen=True)
class Ended:
    """The connection is over. ``oldest``: the oldest message in flight then;
    ``batch_bytes``: the size of a batch in flight then (None without one)."""

    why: End
    reason: str
    code: Optional[int] = None
    oldest: Optional[str] = None
    batch_bytes: Optional[int] = None


Event = Union[Send, Opened, Acked, Refused, CommandArrived, Worked, TokenRenewed, Ended]


@dataclass(frozen=True)
class Outgoing:
    """A stored message to send: its id and wire text; for a ``telemetry.batch``,
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
    renew_tokens: bool = False  # take token.renewed (kept in state_dir/renewed-token)


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


# --------------------------------------------------------------------------- the session


class Session:
    """One connection's state. ``now`` is monotonic seconds; ``wall`` (for message
    timestamps and the clock offset) is seconds since the epoch."""

    def __init__(self, cfg: SessionConfig, now: float,
                 make_id: Callable[[], str] = p.new_id) -> None:
        self.cfg = cfg
        self.make_id = make_id
        self.started = now
        self.welcome: Optional[p.Welcome] = None
        self.ended: Optional[Ended] = None
        self._inflight: collections.OrderedDict[str, Tuple[Outgoing, float]] = \
            collections.OrderedDict()
        self._retry: Deque[Outgoing] = collections.deque()
        self._bucket = TokenBucket(cfg.max_messages_per_minute, now)
        self._last_rx = now
        self._ping_sent: Optional[float] = None
        self._pause_until = 0.0
        self._throttled = False
        self._worked = False
        self._renewed = False  # a token.renewed was taken on this connection

    # ------------------------------------------------------------------ state

    @property
    def open(self) -> bool:
        """Welcomed and not ended: stored messages may go."""
        return self.welcome is not None and self.ended is None

    @property
    def batch_offer(self) -> Optional[p.BatchOffer]:
        """The server's telemetry.batch limits, when offered and allowed."""
        if self.welcome is None or not self.cfg.batches:
            return None
        return self.welcome.batch

    @property
    def unacked(self) -> int:
        """Messages sent and not yet acked (stopping waits for them a little)."""
        return len(self._inflight)

    @property
    def batches_unacked(self) -> int:
        return sum(1 for message, _ in self._inflight.values() if message.items)

    # ------------------------------------------------------------------ inputs

    def frame_seen(self, now: float) -> None:
        """Any frame from the peer, complete message or not, control or data."""
        self._last_rx = now
        self._ping_sent = None  # any frame proves the peer alive (even an error for our ping)

    def receive(self, text: str | bytes, now: float, wall: float) -> List[Event]:
        """One complete message from the server."""
        if self.ended is not None:
            return []
        try:
            env = p.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
        except (ProtocolError, UnicodeDecodeError) as exc:
            log.warning("ignored a malformed message from the server: %s", exc)
            return []
        handler = _HANDLERS.get(env.type)
        if handler is None:
            if not env.type.endswith(".update"):
                log.debug("ignored a message of type %r", env.type[:64])
            return []
        try:
            return handler(self, env, now, wall)
        except ProtocolError as exc:
            log.warning("ignored a %s message: %s", env.type, exc)
            return []

    def closed(self, code: Optional[int], reason: str) -> List[Event]:
        """The server's close frame (``code`` None when it carried none)."""
        why = End.AUTH_REFUSED if code == p.CLOSE_AUTH_FAILED else End.CLOSED
        text = f"close {code} {reason}" if why is End.AUTH_REFUSED else \
            f"server closed the connection with {code} {reason}"
        return self._end(why, text.strip(), code)

    def may_send(self, now: float) -> bool:
        """True when one more stored message may go now (window, pause, rate).

        Notes when messages may be waiting but the rate (or a RATE_LIMITED pause) holds
        them back: only then is there a reason to wake before a frame, a wake-up or a
        timer (see :meth:`deadline`). An empty outbox must not spin the loop.
        """
        self._throttled = False
        if not self.open or len(self._inflight) >= self.cfg.ack_window:
            return False
        if now < self._pause_until or self._bucket.wait(now) > 0:
            self._throttled = True
            return False
        return True

    def next_retry(self) -> Optional[Outgoing]:
        """A message the server asked us to send again: it goes before anything else."""
        return self._retry.popleft() if self._retry else None

    def send(self, message: Outgoing, now: float) -> List[Event]:
        """Send a stored message (the caller checked :meth:`may_send`)."""
        self._bucket.take(now)
        self._inflight[message.id] = (message, now)
        return [Send(message.text)]

    def tick(self, now: float, wall: float) -> List[Event]:
        """Timers: the end when one ran out; a ping when it is time."""
        if self.ended is not None:
            return []
        if self.welcome is None:
            if now - self.started > self.cfg.connect_timeout_s:
                return self._end(End.NO_WELCOME, "no 'connected' message from the server")
            return []
        if self._ping_sent is not None and now - self._ping_sent > self.cfg.ping_timeout_s:
            return self._end(End.PING_TIMEOUT,
                             f"no answer to ping within {self.cfg.ping_timeout_s:g} s")
        if self._inflight:
            _, sent_at = next(iter(self._inflight.values()))
            if now - sent_at > self.cfg.ack_timeout_s:
                return self._end(End.ACK_TIMEOUT, f"no ack within {self.cfg.ack_timeout_s:g} s")
        if self._ping_sent is None and now - self._last_rx >= self.cfg.ping_interval_s:
            self._bucket.take(now)  # pings count against the server's rate limit too
            self._ping_sent = now
            return [Send(p.encode(p.make("ping", wall, msg_id=self.make_id())))]
        return []

    def deadline(self, now: float) -> float:
        """When the caller must call :meth:`tick` again at the latest (monotonic)."""
        if self.welcome is None:
            return self.started + self.cfg.connect_timeout_s
        # While a ping is out, its timeout is the deadline, not the (past) time to send one:
        # the loop must not spin waiting for the pong.
        deadlines = [self._last_rx + self.cfg.ping_interval_s if self._ping_sent is None
                     else self._ping_sent + self.cfg.ping_timeout_s]
        if self._inflight:
            deadlines.append(next(iter(self._inflight.values()))[1] + self.cfg.ack_timeout_s)
        if self._throttled:
            deadlines.append(max(self._pause_until, now + self._bucket.wait(now)))
        return max(now, min(deadlines))

    # ------------------------------------------------------------------ ending

    def lost(self, reason: str, code: Optional[int] = None) -> Ended:
        """The connection ended outside the session's rules (a reset, a send that failed, a
        frame we refused): the account of it, as :class:`Ended` says (once)."""
        self._end(End.CLOSED, reason, code)
        assert self.ended is not None
        return self.ended

    def _end(self, why: End, reason: str, code: Optional[int] = None) -> List[Event]:
        if self.ended is not None:
            return []
        oldest = next(iter(self._inflight)) if self._inflight else None
        batch = next((m for m, _ in self._inflight.values() if m.items), None)
        self.ended = Ended(why, reason, code, oldest,
                           None if batch is None else len(batch.text.encode("utf-8")))
        return [self.ended]

    # ------------------------------------------------------------------ messages

    def _on_connected(self, env: p.Envelope, now: float, wall: float) -> List[Event]:
        self.welcome = p.parse_welcome(env)
        events: List[Event] = [Opened(self.welcome)]
        if self.cfg.subscribe_commands:
            events.append(Send(p.encode(p.make("subscribe", wall, {
                "channel": "commands", "filters": {"device_id": self.cfg.device_id}},
                msg_id=self.make_id()))))
        return events

    def _first_work(self) -> List[Event]:
        if self._worked:
            return []
        self._worked = True
        return [Worked()]

    def _on_ack(self, env: p.Envelope, now: float, wall: float) -> List[Event]:
        if env.id is None or env.id not in self._inflight:
            return []  # an ack for a message we no longer track (e.g. dropped): harmless
        message, _ = self._inflight.pop(env.id)
        events = self._first_work()
        if not message.items:
            return [*events, Acked((env.id,))]
        rejected = _rejected_items(env.payload, message.items)
        taken = tuple(item for index, item in enumerate(message.items) if index not in rejected)
        events += [Refused(message.items[index], f"the server rejected it in a batch: {why}")
                   for index, why in sorted(rejected.items())]
        return [*events, Acked(taken, batch=True)] if taken else events

    def _on_pong(self, env: p.Envelope, now: float, wall: float) -> List[Event]:
        self._ping_sent = None
        return self._first_work()

    def _on_error(self, env: p.Envelope, now: float, wall: float) -> List[Event]:
        error = p.parse_error(env)
        entry = self._inflight.get(error.msg_id) if error.msg_id else None
        if error.code == p.AUTH_FAILED:
            return self._end(End.AUTH_REFUSED, f"{error.code}: {error.message}")
        if entry is not None and entry[0].items and error.code in REJECTING_CODES:
            return self._end(End.BATCHES_REFUSED, f"the server refused a telemetry.batch "
                             f"({error.code}: {error.message}); sending single messages "
                             "from now on")
        if entry is not None and error.code == p.RATE_LIMITED:
            del self._inflight[entry[0].id]
            self._retry.append(entry[0])
            self._pause_until = now + RATE_LIMIT_PAUSE_S
            log.warning("server rate limit hit; pausing sends for %g s", RATE_LIMIT_PAUSE_S)
            return []
        if entry is not None and error.code in REJECTING_CODES:
            del self._inflight[entry[0].id]
            return [Refused(entry[0].id, f"the server rejected it: {error.code}: "
                            f"{error.message}" + (f" (field {error.field})" if error.field
                                                  else ""))]
        if entry is not None:
            del self._inflight[entry[0].id]  # kept in the outbox: sent on the next connection
        log.error("server error %s: %s%s", error.code, error.message,
                  f" (message {error.msg_id})" if error.msg_id else "")
        return []

    def _on_command(self, env: p.Envelope, now: float, wall: float) -> List[Event]:
        if not self.cfg.subscribe_commands:
            return []
        request = p.parse_command_delivery(env)
        if request.device_id != self.cfg.device_id:
            log.warning("ignored command %s addressed to %s", request.command_id,
                        request.device_id)
            return []
        return [CommandArrived(request)]


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


def _on_token_renewed(self: Session, env: p.Envelope, now: float, wall: float) -> List[Event]:
    if self.welcome is None or not self.welcome.renews_tokens or not self.cfg.renew_tokens:
        log.warning("ignored a token.renewed the server did not offer or we do not take")
        return []
    if self._renewed:
        # The server sends one per connection; each taken costs the transport a write and
        # two fsyncs, so a server that floods them would wear the disk.
        log.debug("ignored another token.renewed on this connection")
        return []
    token = p.parse_token_renewed(env)
    self._renewed = True
    return [TokenRenewed(token)]


_HANDLERS: Dict[str, Callable[[Session, p.Envelope, float, float], List[Event]]] = {
    "connected": Session._on_connected,
    "ack": Session._on_ack,
    "pong": Session._on_pong,
    "error": Session._on_error,
    "commands.update": Session._on_command,
    p.TOKEN_RENEWED: _on_token_renewed,
}

"""The companion server's logic, without sockets: who is connected, what they
subscribed to, what arrived, and where each message goes.

Rules and guarantees:

* :class:`Hub` owns all shared state behind one lock. It never sends while it
  holds the lock: every method returns the list of ``(peer, text)`` to send, and
  the caller (``app.py``, on its event loop) puts each on that peer's bounded
  send queue afterwards (``Peer.send`` never waits), so a client that does not
  read stalls neither the hub nor anyone else.
* A broadcast visits only the clients subscribed to its channel (an index kept
  beside the subscriptions), not the whole fleet, and is encoded once: every
  subscriber gets the same text (the same message id).
* Each frame is decoded once and its payload validated once (by the handler of
  its type); the time stamps a frame's answers share are formatted once.
* No call holds its caller for long: a ``telemetry.batch`` is checked and
  stored ``batch_step_items`` items at a time; ``handle`` takes the first step
  and leaves the rest in ``client.job`` for :meth:`Hub.resume`, which the
  caller runs in later turns of its event loop (the ack comes after the last).
* Telemetry is stored by (device id, message id): a resend of a pair already
  stored is acked again but neither stored nor broadcast twice (delivery is
  at-least-once on the wire, exactly-once in the store). Ids are the devices'
  own: two devices may well send the same id, and both samples are kept.
* Every client error is answered with an ``error`` whose code is one of
  ``protocol.ERROR_CODES`` and whose message names the field; the connection
  stays open. Only a client that keeps sending past twice its rate limit is
  closed (1008).
* One identity, one budget. A device has one live connection: a new one takes
  over and the older is closed with 4001 (``CLOSE_REPLACED``); an operator
  identity has at most ``max_operator_connections``, the oldest closed with
  4001 past that. The rate budget (:class:`Budget`: messages, and telemetry
  samples, batch items included) belongs to the identity, shared by its
  connections and kept across reconnects until it has refilled. Windows use
  the caller's monotonic ``mono``, never the wall clock.
* With a store file, writes are committed in groups: the first write after a
  commit opens a transaction, and everything ``handle`` would answer (acks,
  errors, broadcasts, closes) is held until the caller's :meth:`Hub.commit`,
  which the server calls once per event-loop step. An ack still means "on
  disk"; a step's frames share one commit (one WAL sync instead of one each).
  In memory every write commits at once and nothing is held.
* The store is SQLite (``:memory:`` unless a file is given), bounded per
  device (``max_rows_per_device``: that device's oldest rows are deleted past
  it, so one device never evicts another's) and as a whole (``max_rows``, the
  last resort: the largest devices' oldest rows go first). Waiting
  commands and result routes are bounded too (``MAX_PENDING_COMMANDS``,
  ``MAX_ROUTES``): nothing a client sends grows memory without limit.
* Several nodes (``cluster.py``) share a fleet through Redis; the hub does no
  I/O for it. The cluster layer passes a :class:`ClusterView` to ``handle``
  with what it looked up (ids another node stored, which node holds a device)
  and the hub writes into it what must leave this node (broadcasts, commands
  for other nodes, results for their operators). Without a view (one node, or
  Redis unreachable) the hub behaves exactly as a single server.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Protocol, Tuple

from .. import protocol as p
from ..errors import ProtocolError
from .tokens import ROLES, Identity

RATE_WINDOW_S = 60.0  # the budget refills its whole size in this long
# What the server sends may be a little larger than what it accepts: a broadcast wraps an
# accepted message in a new envelope (see protocol.MAX_SERVER_MESSAGE_BYTES).
_encode = functools.partial(p.encode, limit=p.MAX_SERVER_MESSAGE_BYTES)
MAX_PENDING_COMMANDS = 1000  # commands waiting (ttl_s) for a device to connect
MAX_ROUTES = 10_000  # commands delivered whose result the operator still awaits
TRIM_SLACK = 100  # rows a store bound may run over between two trims (Hub._trim)

log = logging.getLogger("nexus.server")


class Peer(Protocol):
    """A connection as the hub sees it: ``send`` and ``close`` must not wait."""

    def send(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


Answers = List[Tuple[Peer, str]]  # what to write, to whom (session.Outgoing is a stored message)
Closes = List[Tuple[Peer, int, str]]  # (peer, close code, reason), after its Answers


@dataclass
class BatchJob:
    """A telemetry.batch being stored a step at a time (``Hub.resume``)."""

    env: p.Envelope
    device_id: str
    raw: List[Any]  # the items as received; each is checked in its step
    view: ClusterView | None
    next: int = 0  # the first item not handled yet
    stored: int = 0
    rejected: List[p.ItemRejected] = field(default_factory=list)


class Budget:
    """An identity's rate budget: two token buckets, ``messages`` (every frame) and
    ``samples`` (telemetry samples: a single message is one, a batch one per item), each
    holding at most its size per minute and refilling at that rate, continuously, on a
    monotonic clock. A bucket may go below zero: a frame is refused (RATE_LIMITED) while
    ``messages`` is negative, and the client is closed (1008) once it is below minus its
    size, that is, past twice the limit."""

    def __init__(self, messages: int, samples: int, mono: float) -> None:
        self.sizes = (float(messages), float(samples))
        self.messages, self.samples = self.sizes
        self._at = mono

    def refill(self, mono: float) -> bool:
        """Bring both buckets to ``mono``; True when both are full (an idle identity)."""
        elapsed = max(0.0, mono - self._at)  # never backwards, whatever the caller passes
        self._at = max(self._at, mono)
        messages, samples = self.sizes
        self.messages = min(messages, self.messages + elapsed * messages / RATE_WINDOW_S)
        self.samples = min(samples, self.samples + elapsed * samples / RATE_WINDOW_S)
        return self.messages >= messages and self.samples >= samples

    def take_message(self, mono: float) -> bool:
        """One frame: False when over the budget (the frame is not handled)."""
        self.refill(mono)
        self.messages -= 1
        return self.messages >= 0

    def take_samples(self, count: int) -> bool:
        """``count`` samples, all or none (after ``take_message`` for the same frame)."""
        if count > self.samples:
            return False
        self.samples -= count
        return True

    @property
    def exhausted(self) -> bool:
        """Past twice the message limit: close."""
        return self.messages < -self.sizes[0]


@dataclass
class Client:
    client_id: str
    identity: Identity
    peer: Peer
    budget: Budget
    subscriptions: List[p.Subscription] = field(default_factory=list)
    job: BatchJob | None = None  # a batch whose items are still being stored (Hub.resume)


@dataclass
class PendingCommand:
    request: p.CommandRequest
    operator_id: str
    expires: float  # on the monotonic clock (Hub.handle's mono)


@dataclass
class ClusterView:
    """One frame's dealings with the other nodes: filled in before ``Hub.handle`` by the
    cluster layer, and by the hub during it. Plain data: the hub never awaits anything."""

    # ids of this frame's device that another node stored: ack, drop (a frame has one device)
    duplicates: frozenset = frozenset()
    device_nodes: Dict[str, str] = field(default_factory=dict)  # device_id -> its node
    parked_here: int = 0  # ttl_s commands this node parked in Redis and still tracks
    # written by the hub:
    # (device_id, id) stored here, now or before
    stored: List[Tuple[str, str]] = field(default_factory=list)
    published: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)  # (channel, payload)
    forward: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)  # (node, delivery)
    parked: List[Tuple[Dict[str, Any], float]] = field(default_factory=list)  # (delivery, expires)
    results: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)  # (node, result)


REMOTE = "@"  # a result route to an operator on another node: "@" + node id


DEFAULT_BATCH_OFFER = p.BatchOffer(p.MAX_BATCH_ITEMS, p.MAX_BATCH_BYTES)


@dataclass(frozen=True)
class HubSettings:
    # Per identity (device or operator), across its connections and reconnects:
    rate_limit_per_minute: int = 100  # messages, the guide's figure
    # Telemetry samples (a batch counts its items): 40,000 a minute (667 a second) drains a
    # day offline at 1 s (86,400 samples) in 2 min 10 s, above nexus-agent's own drain pace
    # (about 32,500 a minute: docs/performance.md) so it never meets RATE_LIMITED.
    samples_per_minute: int = 40_000
    max_operator_connections: int = 8  # per operator identity; the oldest is closed past it
    # Batch items checked and stored per call (about 2.5 ms of work with a watcher): the
    # rest waits for Hub.resume, so other clients are served in between.
    batch_step_items: int = 100
    # telemetry.batch, offered in every welcome; None offers nothing (the guide's protocol)
    batch: p.BatchOffer | None = DEFAULT_BATCH_OFFER
    # The store's bounds (docs/design.md, "Fair storage"): each device keeps at most
    # max_rows_per_device rows (its oldest go first), so one device never evicts another's;
    # max_rows for the whole store is the last resort, taken from the largest devices.
    max_rows: int = 100_000
    max_rows_per_device: int = 10_000
    # With a store file: commit in groups (see the module's rules). A cluster node commits
    # every write at once: it tells the other nodes "stored" right after handle().
    group_commit: bool = True


class Hub:
    def __init__(self, db_path: str = ":memory:", settings: HubSettings | None = None) -> None:
        self.settings = settings or HubSettings()
        self._lock = threading.Lock()
        self._clock = p.TimestampClock()
        self._clients: Dict[str, Client] = {}
        # (role, subject) -> its connections (client_id -> client, oldest first): presence
        # and takeover without a fleet scan
        self._identities: Dict[Tuple[str, str], Dict[str, Client]] = {}
        self._budgets: Dict[Tuple[str, str], Budget] = {}  # kept until refilled (tick)
        # (device_id, command_id) -> waiting for its device. Keyed by the device too: command
        # ids are the operators' own, and two operators' commands with one id to two
        # devices must not replace each other.
        self._pending: Dict[Tuple[str, str], PendingCommand] = {}
        # (device_id, command_id) -> who awaits the result: an operator's client_id, or
        # REMOTE + node. Keyed by the device too: only the device a command went to may
        # answer it, and two operators' commands with one id to two devices do not collide.
        self._routes: Dict[Tuple[str, str], str] = {}
        self._routed: Dict[str, Dict[str, None]] = {}  # command_id -> devices it went to
        self._listeners: Dict[str, Dict[str, Client]] = {}  # channel -> client_id -> client
        # check_same_thread=False: every use is under self._lock.
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        if db_path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        for table in _TABLES:
            _rekey(self._db, table)
        self._db.executescript(_SCHEMA)
        self._group_commit = self.settings.group_commit and db_path != ":memory:"
        self._in_transaction = False
        self._held: Answers = []  # answers waiting for the commit (group commit only)
        self._held_closes: Closes = []
        # Rows per device, kept beside the store (read once when it opens): the bounds are
        # checked without a query per insert.
        self._rows: Dict[str, int] = dict(self._db.execute(
            "SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id").fetchall())
        self._total = sum(self._rows.values())
        self._view: ClusterView | None = None  # set for one handle() call, under the lock
        self._mono = 0.0  # the monotonic clock of the handle() call under way

    # ------------------------------------------------------------------ connections

    def claim(self, device_id: str, claim: str, most: int, now: float,
              key_id: str) -> str | None:
        """Record that ``claim`` (a claim token's subject) claimed ``device_id`` for the key
        ``key_id``; the reason it may not, or None. Refused: an id claimed before (unless by
        the same token with the same key: a device repeating a claim whose answer it lost),
        an id this node has served as a device (telemetry stored, or connected now: it is
        in use with another credential), or a token that has claimed ``most``. Committed
        before it returns: a certificate goes out only for a recorded claim."""
        with self._lock:
            row = self._db.execute("SELECT claim, key_sha256 FROM claims WHERE device_id = ?",
                                   (device_id,)).fetchone()
            if row is not None:
                return None if tuple(row) == (claim, key_id) else \
                    f"device id {device_id} was claimed before"
            if self._rows.get(device_id) or self._identities.get(("device", device_id)):
                return f"device id {device_id} is in use (this server has served it)"
            (count,) = self._db.execute("SELECT COUNT(*) FROM claims WHERE claim = ?",
                                        (claim,)).fetchone()
            if count >= most:
                return f"this claim token has claimed its {most} devices"
            self._write("INSERT INTO claims (device_id, claim, claimed_at, key_sha256) "
                        "VALUES (?, ?, ?, ?)", (device_id, claim, now, key_id))
            if self._in_transaction:
                self._db.execute("COMMIT")
                self._in_transaction = False
        return None

    def connect(self, identity: Identity, peer: Peer, now: float,
                mono: float | None = None,
                renew_at: float | None = None) -> Tuple[Client, str]:
        """Register a new authenticated connection; returns it and its welcome text (which
        offers ``token.renew`` at ``renew_at`` when given: the caller sends the renewal).
        The identity's older connections it replaces are closed with 4001 (after what is
        held for them)."""
        if identity.role not in ROLES:  # a claim token: the hub would take it for an operator
            raise ValueError(f"the hub serves devices and operators, not {identity.role}")
        key = (identity.role, identity.subject)
        with self._lock:
            budget = self._budgets.get(key)
            if budget is None:
                budget = self._budgets[key] = Budget(
                    self.settings.rate_limit_per_minute, self.settings.samples_per_minute,
                    now if mono is None else mono)
            client = Client(p.new_id("client"), identity, peer, budget)
            self._clients[client.client_id] = client
            mine = self._identities.setdefault(key, {})
            keep = 0 if identity.is_device else self.settings.max_operator_connections - 1
            replaced = list(mine.values())[:max(0, len(mine) - keep)]
            mine[client.client_id] = client
        for old in replaced:
            log.info("%s %s: connection %s replaced by %s", identity.role, identity.subject,
                     old.client_id, client.client_id)
            self._close_client(old, p.CLOSE_REPLACED, "replaced by a newer connection of "
                               f"this {identity.role}")
        welcome = p.make("connected", now, p.welcome_payload(client.client_id, now,
                                                           self.settings.batch, renew_at))
        return client, _encode(welcome)

    def exhausted(self, identity: Identity, mono: float) -> bool:
        """The identity spent twice its message budget and has not refilled past it: a new
        connection of it is closed at once (1008), before its welcome."""
        with self._lock:
            budget = self._budgets.get((identity.role, identity.subject))
            if budget is None:
                return False
            budget.refill(mono)
            return budget.messages < 0

    def online(self, client: Client, now: float) -> Answers:
        """``events.update`` ``device.online`` when ``client`` is a device (after its welcome)."""
        return self._presence(client, "device.online", now)

    def disconnect(self, client: Client, now: float | None = None) -> Answers:
        """Forget ``client``; ``device.offline`` on channel ``events`` when it was the last
        connection of its device (a reconnect that overtook the old connection stays online)."""
        with self._lock:
            self._clients.pop(client.client_id, None)
            for listeners in self._listeners.values():
                listeners.pop(client.client_id, None)
            key = (client.identity.role, client.identity.subject)
            others = self._identities.get(key, {})
            others.pop(client.client_id, None)
            still = bool(others)
            if not still:
                self._identities.pop(key, None)  # its budget stays until it has refilled
        if still or now is None:
            return []
        return self._presence(client, "device.offline", now)

    def _presence(self, client: Client, event: str, now: float) -> Answers:
        if not client.identity.is_device:
            return []
        with self._lock:
            return self._broadcast("events", {"event": event,
                                              "device_id": client.identity.subject}, now)

    def peers(self) -> List[Peer]:
        with self._lock:
            return [c.peer for c in self._clients.values()]

    def peers_of(self, role: str, subject: str) -> List[Peer]:
        """The open connections of one identity (a revoked one is closed)."""
        with self._lock:
            return [c.peer for c in self._identities.get((role, subject), {}).values()]

    # ------------------------------------------------------------------ messages

    def handle(self, client: Client, text: str | bytes, now: float,
               view: ClusterView | None = None, mono: float | None = None,
               env: p.Envelope | None = None) -> Answers:
        """Everything to send in answer to one frame from ``client``; with a ``view``, also
        what the other nodes of a cluster must hear about (written into it). With a store
        file, while a write waits for :meth:`commit`, the answers wait with it (in order).
        ``now`` is the wall clock (time stamps); ``mono`` a monotonic clock for the rate
        budget (``now`` when not given: tests). ``env``: the frame already decoded (a cluster
        node decodes it once for its own lookups), else decoded here."""
        out = self._handle(client, text, now, view, now if mono is None else mono, env)
        if self._in_transaction:
            with self._lock:
                self._held += out
            return []
        return out

    @property
    def uncommitted(self) -> bool:
        """Writes (and answers) wait for :meth:`commit`."""
        return self._in_transaction

    def commit(self) -> Tuple[Answers, Closes]:
        """Commit the open transaction; the answers and closes it held, to send in order.
        If the commit fails, nothing was stored and nothing held is sent: no false acks
        (the clients resend unacked telemetry)."""
        with self._lock:
            out, closes = self._held, self._held_closes
            self._held, self._held_closes = [], []
            if not self._in_transaction:
                return out, closes
            self._in_transaction = False
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                log.exception("commit failed: %d answers dropped (the clients will resend)",
                              len(out))
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._rows = dict(self._db.execute(  # the rows as they are again
                    "SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id").fetchall())
                self._total = sum(self._rows.values())
                return [], closes
        return out, closes

    def _close_client(self, client: Client, code: int, reason: str) -> None:
        """Close ``client``, after what is held for it when a commit is pending."""
        if self._in_transaction:
            with self._lock:
                self._held_closes.append((client.peer, code, reason))
        else:
            client.peer.close(code, reason)

    def _write(self, sql: str, args: Tuple[Any, ...]) -> sqlite3.Cursor:
        """Every write: opens the group's transaction when the store is a file."""
        if self._group_commit and not self._in_transaction:
            self._db.execute("BEGIN")
            self._in_transaction = True
        return self._db.execute(sql, args)

    def _handle(self, client: Client, text: str | bytes, now: float,
                view: ClusterView | None, mono: float,
                decoded: p.Envelope | None = None) -> Answers:
        # Every frame counts, even a malformed one.
        over_rate = not client.budget.take_message(mono)
        if over_rate and client.budget.exhausted:
            # Past twice the limit: closed, and the flood it keeps sending costs no decoding.
            self._close_client(client, p.CLOSE_POLICY, "rate limit exceeded")
            return []
        env: p.Envelope | None = decoded
        if _too_big(text):
            # The frame limit lets a batch through; everything else keeps 64 KiB.
            env = _batch_or_none(text) if env is None else \
                env if env.type == p.TELEMETRY_BATCH else None
            if env is None:
                self._close_client(client, p.CLOSE_TOO_BIG, "message too big")
                return []
        try:
            env = env or p.decode(text)
            if over_rate:
                return self._rate_error(client, env.id, now)
            p.check_client_envelope(env)  # the handler validates the payload (only once)
            with self._lock:
                self._view, self._mono = view, mono
                try:
                    return self._dispatch(client, env, now)
                finally:
                    self._view = None
        except ProtocolError as exc:
            if over_rate:
                return self._rate_error(client, None, now)
            # An error answers the client's message, so it carries that message's id (not
            # the id of something the hub was building, such as a broadcast).
            msg_id = env.id if env is not None else exc.msg_id
            return self._error(client, exc.code, exc.message, now, msg_id, exc.field)
        except Exception:  # noqa: BLE001 - one bad message must not end the connection
            log.exception("internal error handling a message from %s", client.client_id)
            return self._error(client, p.INTERNAL_ERROR, "the server failed to handle this "
                               "message", now, env.id if env else None)

    def _error(self, client: Client, code: str, message: str, now: float,
               msg_id: str | None, field_path: str | None = None) -> Answers:
        return [(client.peer, _encode(p.make_error(code, message, now, msg_id, field_path)))]

    def _rate_error(self, client: Client, msg_id: str | None, now: float) -> Answers:
        limit = self.settings.rate_limit_per_minute
        if client.budget.exhausted:
            # A client that ignores RATE_LIMITED would otherwise make us answer forever.
            self._close_client(client, p.CLOSE_POLICY, "rate limit exceeded")
            return []
        return self._error(client, p.RATE_LIMITED, f"more than {limit} messages a minute from "
                           f"this {client.identity.role}; this message was not processed, "
                           "send it again later", now, msg_id)

    def _take_samples(self, client: Client, count: int, msg_id: str | None) -> None:
        if not client.budget.take_samples(count):
            raise ProtocolError(p.RATE_LIMITED, f"more than {self.settings.samples_per_minute}"
                                f" telemetry samples a minute from this device; this message "
                                "was not processed, send it again later", "payload", msg_id)

    def _dispatch(self, client: Client, env: p.Envelope, now: float) -> Answers:
        handler = _HANDLERS[env.type]
        return handler(self, client, env, now)

    def _reply(self, client: Client, type_: str, env: p.Envelope, now: float,
               payload: Dict[str, Any] | None = None) -> Answers:
        return [(client.peer, _encode(p.Envelope(type_, env.id, self._clock(now), payload)))]

    def _ping(self, client: Client, env: p.Envelope, now: float) -> Answers:
        return self._reply(client, "pong", env, now)

    def _subscribe(self, client: Client, env: p.Envelope, now: float) -> Answers:
        sub = p.parse_subscription(env)
        filters = dict(sub.filters)
        if client.identity.is_device:
            own = client.identity.subject
            if filters.get("device_id", own) != own:
                raise ProtocolError(p.FORBIDDEN, "a device may only subscribe to its own "
                                    "device_id", "payload.filters.device_id", env.id)
            filters["device_id"] = own
        sub = p.Subscription(sub.channel, filters)
        if sub not in client.subscriptions:
            if len(client.subscriptions) >= p.MAX_SUBSCRIPTIONS:
                raise ProtocolError(p.INVALID_MESSAGE, f"more than {p.MAX_SUBSCRIPTIONS} "
                                    "subscriptions on this connection", "payload", env.id)
            client.subscriptions.append(sub)
            self._listeners.setdefault(sub.channel, {})[client.client_id] = client
        out = self._reply(client, "subscribed", env, now,
                          {"channel": sub.channel, "filters": filters})
        if sub.channel == "commands" and client.identity.is_device:
            out += self._deliver_pending(client.identity.subject, now)
        return out

    def _unsubscribe(self, client: Client, env: p.Envelope, now: float) -> Answers:
        sub = p.parse_subscription(env, need_filters=False)
        client.subscriptions = [s for s in client.subscriptions if s.channel != sub.channel]
        self._listeners.get(sub.channel, {}).pop(client.client_id, None)
        return self._reply(client, "unsubscribed", env, now, {"channel": sub.channel})

    def _telemetry(self, client: Client, env: p.Envelope, now: float) -> Answers:
        data = p.parse_telemetry(env)
        self._check_sender(client, data.device_id, env.id)
        self._take_samples(client, 1, env.id)
        assert env.id is not None and env.payload is not None
        out: Answers = [(client.peer, p.ack_text(env.id, self._clock(now)))]
        return out + (self._store(env.id, data.device_id, env.timestamp or
                                  self._clock(now), env.payload, p.dumps(env.payload),
                                  now) or [])

    def _telemetry_batch(self, client: Client, env: p.Envelope, now: float) -> Answers:
        """Every valid item stored and broadcast as if it came alone; one ack says what was
        taken. A bad item rejects only itself (named by index and field in the ack).

        The items are checked and stored ``batch_step_items`` at a time: this call takes
        the first step and leaves the rest in ``client.job`` for :meth:`resume`, so that no
        single call holds the caller's event loop for long (docs/performance.md)."""
        offer = self.settings.batch
        # The head before the offer is checked: a malformed batch is INVALID_MESSAGE either
        # way.
        device_id, raw = p.parse_batch_head(env, offer.max_items if offer else
                                            p.MAX_BATCH_ITEMS)
        if offer is None:
            raise ProtocolError(p.UNKNOWN_MESSAGE_TYPE, "telemetry.batch is not offered by "
                                "this server; send single telemetry messages", "type", env.id)
        self._check_sender(client, device_id, env.id)
        self._take_samples(client, len(raw), env.id)
        # From here on nothing raises: once an item is stored the answer is the ack, which
        # names every item refused and always fits (protocol.rejected_list).
        client.job = BatchJob(env, device_id, raw, self._view)
        return self._batch_step(client, now)

    def _batch_step(self, client: Client, now: float) -> Answers:
        """The next ``batch_step_items`` items of ``client.job``; the ack after the last."""
        job = client.job
        assert job is not None
        out: Answers = []
        end = min(len(job.raw), job.next + self.settings.batch_step_items)
        for index in range(job.next, end):
            item = p.parse_batch_item(job.raw[index], index, job.env.id)
            if isinstance(item, p.ItemRejected):
                job.rejected.append(item)
                continue
            new, refusal = self._store_item(job.device_id, index, item, now)
            if refusal is not None:
                job.rejected.append(refusal)
            job.stored += new is not None
            out += new or []
        job.next = end
        if end < len(job.raw):
            return out
        client.job = None
        return out + self._reply(client, "ack", job.env, now, {
            "items": len(job.raw), "stored": job.stored,
            "rejected": p.rejected_list(job.rejected, p.MAX_MESSAGE_BYTES)})

    def resume(self, client: Client, now: float) -> Answers:
        """The next step of the batch ``client`` sent (``client.job``); call while it is
        set, in later turns of the event loop. Held for the commit like :meth:`handle`."""
        with self._lock:
            job = client.job
            if job is None:
                return []
            self._view = job.view
            try:
                out = self._batch_step(client, now)
            finally:
                self._view = None
        if self._in_transaction:
            with self._lock:
                self._held += out
            return []
        return out

    def _store_item(self, device_id: str, index: int, item: p.BatchItem,
                    now: float) -> Tuple[Answers | None, p.ItemRejected | None]:
        """One batch item: stored (its broadcasts, or None when stored before), or refused."""
        payload = item.payload(device_id)
        row = p.dumps(payload)
        if len(row) * 4 > p.MAX_BATCH_ITEM_BYTES and \
                len(row.encode("utf-8")) > p.MAX_BATCH_ITEM_BYTES:
            return None, p.item_rejected(
                index, {"id": item.id}, f"payload.items.{index}",
                f"over {p.MAX_BATCH_ITEM_BYTES} bytes (device_id and metrics as JSON)")
        try:
            return self._store(item.id, device_id, item.timestamp, payload, row, now), None
        except Exception:  # noqa: BLE001 - the ack must still say what was stored
            log.exception("internal error storing item %d of a batch from %s", index,
                          device_id)
            return None, p.item_rejected(index, {"id": item.id}, f"payload.items.{index}",
                                         "the server failed to store this item")

    def _check_sender(self, client: Client, device_id: str, msg_id: str | None) -> None:
        if not client.identity.is_device:
            raise ProtocolError(p.FORBIDDEN, "only a device token may send telemetry", "type",
                                msg_id)
        if device_id != client.identity.subject:
            raise ProtocolError(p.FORBIDDEN, "a device may only send telemetry for its own "
                                "device_id", "payload.device_id", msg_id)

    def _store(self, msg_id: str, device_id: str, sample_time: str, payload: Any, row: str,
               now: float) -> Answers | None:
        """Store one sample by (device, id): its broadcasts when new, None when stored before."""
        view = self._view
        if view is not None and msg_id in view.duplicates:
            return None  # another node of the cluster stored it
        cur = self._write(
            "INSERT OR IGNORE INTO telemetry (id, device_id, sample_time, received_at, payload)"
            " VALUES (?, ?, ?, ?, ?)",
            (msg_id, device_id, sample_time, self._clock(now), row))
        if view is not None:
            view.stored.append((device_id, msg_id))
        if cur.rowcount != 1:
            return None
        self._trim(device_id)
        if view is None and not self._listeners.get("telemetry"):
            return []  # nobody to tell (the usual case for a fleet without operators)
        update = dict(payload, message_id=msg_id, sample_time=sample_time)
        if view is not None:
            view.published.append(("telemetry", update))
        return self._broadcast("telemetry", update, now)

    def _command(self, client: Client, env: p.Envelope, now: float) -> Answers:
        request = p.parse_command(env)
        if client.identity.is_device:
            raise ProtocolError(p.FORBIDDEN, "only an operator token may send commands", "type",
                                env.id)
        parked = len(self._pending) + (self._view.parked_here if self._view else 0)
        if parked >= MAX_PENDING_COMMANDS and request.ttl_s is not None:
            raise ProtocolError(p.RATE_LIMITED, f"{MAX_PENDING_COMMANDS} commands are already "
                                "waiting for offline devices", "payload.ttl_s", env.id)
        self._route(request.device_id, request.command_id, client.client_id)
        if self._device_listening(request.device_id):
            return self._broadcast("commands", p.delivery_payload(request), now)
        view = self._view
        node = view.device_nodes.get(request.device_id) if view is not None else None
        if view is not None and node is not None:
            view.forward.append((node, p.delivery_payload(request)))  # the result comes back here
            return []
        if request.ttl_s is None:
            self._unroute(request.device_id, request.command_id)
            raise ProtocolError(p.DEVICE_OFFLINE, self._why_not_listening(request.device_id),
                                "payload.device_id", env.id)
        if view is not None:  # waits in Redis for whichever node the device reaches first
            view.parked.append((p.delivery_payload(request), now + request.ttl_s))
            return []
        # On the monotonic clock: a step of the wall clock neither expires it nor keeps it.
        self._pending[(request.device_id, request.command_id)] = PendingCommand(
            request, client.client_id, self._mono + request.ttl_s)
        return []

    def _command_result(self, client: Client, env: p.Envelope, now: float) -> Answers:
        result = p.parse_command_result(env)
        if not client.identity.is_device or result.device_id != client.identity.subject:
            raise ProtocolError(p.FORBIDDEN, "a device may only report its own commands",
                                "payload.device_id", env.id)
        if self._sent_elsewhere(result.device_id, result.command_id):
            # Before anything is stored or popped: the real result still finds its route.
            raise ProtocolError(p.FORBIDDEN, f"command {result.command_id} was not sent to "
                                "this device", "payload.command_id", env.id)
        cur = self._write(
            "INSERT OR IGNORE INTO command_results (command_id, device_id, status, received_at,"
            " payload) VALUES (?, ?, ?, ?, ?)",
            (result.command_id, result.device_id, result.status, self._clock(now),
             json.dumps(result.to_payload())))
        out = self._reply(client, "ack", env, now)
        # Relayed once per pending request: a device's resend (same result, new message) finds
        # no route; an operator who asks again with the same id gets the stored result again.
        route = self._unroute(result.device_id, result.command_id)
        operator = self._clients.get(route)
        if cur.rowcount == 0:
            log.debug("command result %s was stored before", result.command_id)
        if route.startswith(REMOTE) and self._view is not None:
            self._view.results.append((route[len(REMOTE):], result.to_payload()))
        if operator is not None:
            relay = p.make("command.result", now, result.to_payload(), result.command_id)
            out.append((operator.peer, _encode(relay)))
        return out

    # ------------------------------------------------------------------ routing helpers

    def _broadcast(self, channel: str, payload: Dict[str, Any], now: float) -> Answers:
        out: Answers = []
        text = ""  # encoded for the first subscriber it goes to; the same text for all
        for client in self._listeners.get(channel, {}).values():
            for sub in client.subscriptions:
                if sub.channel == channel and p.matches_filters(payload, sub.filters):
                    if not text:
                        text = _encode(p.Envelope(f"{channel}.update", p.new_id(),
                                                  self._clock(now), payload))
                    out.append((client.peer, text))
                    break  # one copy per client, however many subscriptions match
        return out

    def _route(self, device_id: str, command_id: str, target: str) -> None:
        self._unroute(device_id, command_id)  # a command id sent again: the newest route
        self._routes[(device_id, command_id)] = target
        self._routed.setdefault(command_id, {})[device_id] = None
        while len(self._routes) > MAX_ROUTES:  # results that never came: forget the oldest
            self._unroute(*next(iter(self._routes)))

    def _unroute(self, device_id: str, command_id: str) -> str:
        """Forget the route of ``command_id`` to ``device_id``; who awaited it, or ""."""
        target = self._routes.pop((device_id, command_id), "")
        devices = self._routed.get(command_id)
        if devices is not None:
            devices.pop(device_id, None)
            if not devices:
                del self._routed[command_id]
        return target

    def _sent_elsewhere(self, device_id: str, command_id: str) -> bool:
        """``command_id`` awaits a result from another device, and not from this one."""
        devices = self._routed.get(command_id, {})
        return bool(devices) and device_id not in devices

    def _why_not_listening(self, device_id: str) -> str:
        """DEVICE_OFFLINE's message: a connected device that never subscribed to commands (an
        agent without commands.allow) is not called offline."""
        if self._identities.get(("device", device_id)):
            return (f"device {device_id} is connected but takes no commands (it has not "
                    "subscribed to channel commands; an agent does so only with "
                    "commands.allow in its config)")
        return f"device {device_id} is not connected (a command with ttl_s waits for it)"

    def _device_listening(self, device_id: str) -> bool:
        return any(any(s.channel == "commands" for s in c.subscriptions)
                   for c in self._identities.get(("device", device_id), {}).values())

    def _deliver_pending(self, device_id: str, now: float) -> Answers:
        out: Answers = []
        for key, pending in list(self._pending.items()):
            if key[0] == device_id and pending.expires > self._mono:
                del self._pending[key]
                out += self._broadcast("commands", p.delivery_payload(pending.request), now)
        return out

    def tick(self, now: float, mono: float | None = None) -> Answers:
        """Expire commands that waited too long for their device, forget the budgets of
        identities gone and refilled; call about once a second."""
        out: Answers = []
        with self._lock:
            mono = now if mono is None else mono
            for key in [k for k, b in self._budgets.items()
                        if k not in self._identities and b.refill(mono)]:
                del self._budgets[key]
            for (device_id, command_id), pending in list(self._pending.items()):
                if pending.expires <= mono:
                    del self._pending[(device_id, command_id)]
                    self._unroute(device_id, command_id)
                    operator = self._clients.get(pending.operator_id)
                    if operator is not None:
                        error = p.make_error(p.DEVICE_OFFLINE, f"device {device_id} did not "
                                             "connect before the command's ttl_s ran out",
                                             now, command_id)
                        out.append((operator.peer, _encode(error)))
        return out

    # ------------------------------------------------------------------ from other nodes

    def command_listeners(self) -> List[str]:
        """Device ids connected here and subscribed to ``commands`` (the cluster registry)."""
        with self._lock:
            return sorted({c.identity.subject for c in self._clients.values()
                           if c.identity.is_device
                           and any(s.channel == "commands" for s in c.subscriptions)})

    def device_listening(self, device_id: str) -> bool:
        with self._lock:
            return self._device_listening(device_id)

    def deliver_remote(self, channel: str, payload: Dict[str, Any], now: float) -> Answers:
        """Another node's broadcast, fanned out to the subscribers here (nothing stored)."""
        with self._lock:
            return self._broadcast(channel, payload, now)

    def deliver_command(self, delivery: Dict[str, Any], origin: str | None,
                        now: float) -> Answers | None:
        """A command for a device connected here, from ``origin`` (another node's id, or
        None when the operator is on this node); None when the device is not here."""
        with self._lock:
            if not self._device_listening(delivery["device_id"]):
                return None
            if origin is not None:
                self._route(delivery["device_id"], delivery["command_id"], REMOTE + origin)
            return self._broadcast("commands", delivery, now)

    def deliver_result(self, result: Dict[str, Any], now: float) -> Answers:
        """A command's result from the device's node, for the operator here who asked."""
        command_id = str(result.get("command_id", ""))
        with self._lock:
            operator = self._clients.get(self._unroute(str(result.get("device_id", "")),
                                                       command_id))
        if operator is None:
            return []
        return [(operator.peer, _encode(p.make("command.result", now, result, command_id)))]

    def command_failed(self, device_id: str, command_id: str, message: str,
                       now: float) -> Answers:
        """DEVICE_OFFLINE for the operator here who sent ``command_id`` to ``device_id`` (no
        node took it)."""
        with self._lock:
            operator = self._clients.get(self._unroute(device_id, command_id))
        if operator is None:
            return []
        error = p.make_error(p.DEVICE_OFFLINE, message, now, command_id)
        return [(operator.peer, _encode(error))]

    def _trim(self, device_id: str) -> None:
        """One row more for ``device_id``: its oldest rows go past its own bound, and the
        largest devices' oldest past the store's. Each bound is let run over by
        TRIM_SLACK rows between trims, so a trim costs one DELETE per TRIM_SLACK inserts."""
        self._rows[device_id] = self._rows.get(device_id, 0) + 1
        self._total += 1
        own = self.settings.max_rows_per_device
        if self._rows[device_id] > own + TRIM_SLACK:
            self._delete_oldest(device_id, self._rows[device_id] - own)
        if self._total > self.settings.max_rows + TRIM_SLACK:
            # Last resort (more devices than the store has room for at their own bound):
            # the largest give up their oldest rows first, never a small device for a big one.
            while self._total > self.settings.max_rows:
                largest = max(self._rows, key=self._rows.__getitem__)
                second = max((n for d, n in self._rows.items() if d != largest), default=0)
                excess = self._total - self.settings.max_rows
                # Down to the next largest, or at least TRIM_SLACK rows (many devices tied).
                self._delete_oldest(largest, min(excess, max(self._rows[largest] - second,
                                                             TRIM_SLACK)))

    def _delete_oldest(self, device_id: str, count: int) -> None:
        cur = self._write(
            "DELETE FROM telemetry WHERE rowid IN (SELECT rowid FROM telemetry "
            "WHERE device_id = ? ORDER BY rowid LIMIT ?)", (device_id, count))
        self._rows[device_id] -= cur.rowcount
        self._total -= cur.rowcount
        if self._rows[device_id] <= 0:
            del self._rows[device_id]

    # ------------------------------------------------------------------ inspection

    def telemetry(self, device_id: str | None = None) -> List[Dict[str, Any]]:
        """Stored telemetry, in arrival order (for tests and ``nexus-server`` users)."""
        query = "SELECT id, device_id, sample_time, payload FROM telemetry"
        args: Tuple[Any, ...] = ()
        if device_id is not None:
            query, args = query + " WHERE device_id = ?", (device_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY rowid", args).fetchall()
        return [{"id": r[0], "device_id": r[1], "sample_time": r[2],
                 "payload": json.loads(r[3])} for r in rows]

    def close(self) -> None:
        """Commit what is pending (its answers are not sent: the server is stopping) and
        close the store."""
        self.commit()
        with self._lock:
            self._db.close()


def _too_big(text: str | bytes) -> bool:
    """Over MAX_MESSAGE_BYTES (the cheap length test first: a character is 1-4 bytes)."""
    if len(text) * 4 <= p.MAX_MESSAGE_BYTES:
        return False
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    return size > p.MAX_MESSAGE_BYTES


def _batch_or_none(text: str | bytes) -> p.Envelope | None:
    try:
        env = p.decode(text)
    except ProtocolError:
        return None
    return env if env.type == p.TELEMETRY_BATCH else None


_HANDLERS = {
    "ping": Hub._ping,
    "subscribe": Hub._subscribe,
    "unsubscribe": Hub._unsubscribe,
    "telemetry": Hub._telemetry,
    p.TELEMETRY_BATCH: Hub._telemetry_batch,
    "command": Hub._command,
    "command.result": Hub._command_result,
}

# Message ids and command ids are unique per device only (docs/protocol.md): every key
# holds the device id. {name}: a table is rebuilt under another name (_rekey).
_TABLES = {
    "telemetry": ("""
CREATE TABLE IF NOT EXISTS {name} (
    id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sample_time TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, id)
);""", ["device_id", "id"]),
    "command_results": ("""
CREATE TABLE IF NOT EXISTS {name} (
    command_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, command_id)
);""", ["device_id", "command_id"]),
}


def _rekey(db: sqlite3.Connection, table: str) -> None:
    """A store file written before ``table`` was keyed by the device too (``id`` or
    ``command_id`` alone was the key): rebuilt once with the new key, every row and its
    rowid (arrival order) kept, in one transaction."""
    create, key = _TABLES[table]
    info = db.execute(f"PRAGMA table_info({table})").fetchall()
    pk = [name for _, name, *_rest, order in sorted(info, key=lambda r: r[5]) if order]
    if not info or pk == key:
        return  # no table yet, or already keyed by the pair
    log.warning("store: re-keying %s by (%s); done once per file", table, ", ".join(key))
    columns = ", ".join(row[1] for row in info)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(create.format(name=f"{table}_rekeyed"))
        db.execute(f"INSERT INTO {table}_rekeyed (rowid, {columns}) "
                   f"SELECT rowid, {columns} FROM {table}")
        db.execute(f"DROP TABLE {table}")  # and its index; _SCHEMA makes it again
        db.execute(f"ALTER TABLE {table}_rekeyed RENAME TO {table}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_SCHEMA = "\n".join(create.format(name=table) for table, (create, _) in _TABLES.items()) + """
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device_id);
-- Provisioning by claim: each device id is claimed once, ever (never trimmed).
CREATE TABLE IF NOT EXISTS claims (
    device_id TEXT PRIMARY KEY,
    claim TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    key_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_by_token ON claims (claim);
"""

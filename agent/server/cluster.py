"""Several companion server nodes, one fleet: the Redis layer around a Hub.

Rules and guarantees (docs/design.md, "Several nodes"):

* Runs on the server's event loop only; the Hub stays sans-I/O. Before a frame
  reaches the hub this layer looks up what the hub cannot (ids another node
  stored, which node holds a device); after it, it sends what the hub wrote
  into the :class:`~.hub.ClusterView` (broadcasts, commands, results).
* Redis commands from every client are batched: whatever is asked during one
  loop step goes out in one pipeline (:class:`Batcher`), so 5,000 devices
  share one or two Redis connections, not one each.
* Per message kind:

  - ``telemetry.update`` broadcasts: pub/sub on ``nexus:bc``, at most once. A
    node or Redis restarting loses the broadcasts in flight (a live view
    misses them; the store has them).
  - commands for a device on another node, and their results: pub/sub on
    ``nexus:to:<node>``. PUBLISH says how many received it: 0 means the node
    is gone, and the operator gets DEVICE_OFFLINE at once. A result whose
    operator's node died is lost to that operator (stored on the device's node).
  - registry ``nexus:device:<id>`` -> node, refreshed every ``registry_ttl/3``
    while the device is here, so a dead node is forgotten after ``registry_ttl``.
  - ``ttl_s`` commands: a list ``nexus:parked:<device>`` (kept until the
    longest ttl_s); the first node the device subscribes on takes the list
    (MULTI: LRANGE + DEL); the operator's node, at expiry, takes its entry
    back with LREM: 1 removed means never delivered -> DEVICE_OFFLINE. A Redis
    restart without persistence loses parked commands.
  - stored-once: ``nexus:seen:<device id>:<message id>`` (:func:`seen_key`; a
    message id is unique per device only): ``SET NX GET`` with the value
    ``claim:<node>`` and a short lease before the hub stores, then ``stored:<node>``
    for ``dedupe_s`` once stored. A resend of a stored id is acked and dropped;
    of an id claimed by another node and not yet stored, this node waits for
    that node to store it or for its lease to run out (the node died before
    storing), then claims it itself.

* Redis unreachable: logged once ("redis unreachable; serving local clients
  only"), every frame goes to the hub without a view (a single node), and a
  supervisor reconnects with capped backoff ("redis back"), re-subscribes and
  re-registers its devices. :meth:`Cluster.health` says so (the server's
  ``GET /healthz`` answers 503 meanwhile).
* Nothing another node (or anyone who can publish on Redis) sends can silence
  this one: each message read from Redis is handled on its own, and one that
  fails for any reason is logged, counted (``bad_messages``) and skipped. The
  supervisor (:meth:`Cluster.run`) survives any error of its reader: it logs
  it and starts again after the backoff. A reader that stops making rounds
  (stuck, or dead) turns the health answer to 503 within a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .. import protocol as p
from ..errors import ProtocolError
from .hub import Client, ClusterView, Hub, Answers

log = logging.getLogger("nexus.server.cluster")

BROADCASTS = "nexus:bc"
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
# Compare-and-delete: forget a device only if the registry still names this node.
_FORGET = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
           "return redis.call('DEL', KEYS[1]) else return 0 end")


@dataclass(frozen=True)
class ClusterSettings:
    url: str
    node_id: str = ""  # default: host-pid
    dedupe_s: int = 600  # how long a stored id is remembered cluster-wide
    lease_s: int = 5  # how long a claim waits for its node to store the sample
    registry_ttl_s: int = 15
    health_interval_s: float = 1.0
    op_timeout_s: float = 2.0


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Unreachable(Exception):
    """Redis did not answer; the caller serves as a single node."""


class Batcher:
    """Redis commands asked for during one loop step, sent as one pipeline."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._queue: List[Tuple[str, Tuple[Any, ...], Dict[str, Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, command: str, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """``command`` names a redis-py method (``set``, ``publish``...): its options and
        answer are redis-py's."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._queue:
            task = asyncio.ensure_future(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queue.append((command, args, options, future))
        return future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the rest of this loop step add to the batch
        batch, self._queue = self._queue, []
        pipe = self._client.pipeline(transaction=False)
        for command, args, options, _ in batch:
            getattr(pipe, command)(*args, **options)
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - every caller hears it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(Unreachable(str(exc) or type(exc).__name__))
            return
        for (*_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: fire-and-forget commands fail quietly


class Cluster:
    """This node's membership in the cluster. ``run()`` is its supervisor task."""

    def __init__(self, settings: ClusterSettings, hub: Hub,
                 deliver: Callable[[Answers], None]) -> None:
        self.settings = settings
        self.node = settings.node_id or default_node_id()
        self._hub = hub
        self._deliver = deliver
        self._redis = aioredis.Redis.from_url(
            settings.url, decode_responses=True, socket_timeout=settings.op_timeout_s,
            socket_connect_timeout=settings.op_timeout_s, retry=Retry(NoBackoff(), 1))
        self._batch = Batcher(self._redis)
        self._inbox = f"nexus:to:{self.node}"
        self.up = False
        self._ever_up = False
        # (device id, command id) -> key, entry, expires: command ids are the operators' own
        # (two operators may park one id for two devices)
        self._parked: Dict[Tuple[str, str], Tuple[str, str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.bad_messages = 0  # messages from Redis that could not be handled (skipped)
        self._sessions = 0  # sessions with Redis that got as far as subscribing
        self._last_round = -math.inf  # time.monotonic() of the reader's last good round

    def health(self) -> Tuple[bool, str]:
        """(healthy, why): in the cluster and its reader making rounds."""
        if not self.up:
            return False, "redis unreachable; serving local clients only"
        stale = time.monotonic() - self._last_round
        if stale > 3 * self.settings.health_interval_s + 2 * self.settings.op_timeout_s:
            return False, f"the cluster reader made no round for {stale:.0f} s"
        return True, f"in the cluster as {self.node}"

    # ------------------------------------------------------------------ state

    def _went_down(self, why: object) -> None:
        if self.up or not self._ever_up:
            log.warning("redis unreachable (%s); serving local clients only", why)
        self.up = False
        self._ever_up = True  # log the first failure once, even before a first success

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, command: str, *args: Any, **options: Any) -> Any:
        try:
            return await asyncio.wait_for(self._batch.call(command, *args, **options),
                                          self.settings.op_timeout_s)
        except _REDIS_ERRORS + (Unreachable,) as exc:
            self._went_down(exc)
            raise Unreachable(str(exc)) from exc

    def _send(self, command: str, *args: Any, **options: Any) -> asyncio.Future[Any] | None:
        """A command whose answer nobody waits for; dropped while Redis is unreachable."""
        if not self.up:
            return None
        future = self._batch.call(command, *args, **options)
        future.add_done_callback(_ignore)
        return future

    # ------------------------------------------------------------------ frames

    async def handle(self, client: Client, text: str | bytes) -> None:
        """One frame from a client of this node: look up, let the hub answer, tell the others."""
        # Decoded once, here, and handed to the hub (which decodes only what this did not).
        env = _decoded(text)
        view: Optional[ClusterView] = None
        if env is not None and self.up:
            try:
                view = await self._before(client, env)
            except Unreachable:
                view = None
            except Exception:  # noqa: BLE001 - a cluster bug must not cost the connection
                log.exception("cluster lookup failed; handled as a single node")
                view = None
        self._deliver(self._hub.handle(client, text, time.time(), view, time.monotonic(),
                                       env=env))
        while client.job is not None:  # a big batch: a step per turn of the loop
            await asyncio.sleep(0)
            self._deliver(self._hub.resume(client, time.time()))
        if view is not None:
            self._after(view)
        if (env is not None and client.identity.is_device and env.type == "subscribe"
                and _channel(env) == "commands" and self.up):
            self._spawn(self._device_arrived(client.identity.subject))

    async def _before(self, client: Client, env: p.Envelope) -> ClusterView:
        view = ClusterView(parked_here=len(self._parked))
        kind = env.type
        if client.identity.is_device and kind in ("telemetry", p.TELEMETRY_BATCH):
            ids = _telemetry_ids(env)
            if ids:
                # The device is the token's (the hub refuses a frame for another device).
                view.duplicates = frozenset(await self._claim(client.identity.subject, ids))
        elif not client.identity.is_device and kind == "command":
            payload = env.payload
            device = payload.get("device_id") if isinstance(payload, dict) else None
            if isinstance(device, str) and not self._hub.device_listening(device):
                node = await self._call("get", f"nexus:device:{device}")
                if node and node != self.node:
                    view.device_nodes[device] = node
        return view

    def _after(self, view: ClusterView) -> None:
        for device_id, msg_id in view.stored:
            self._send("set", seen_key(device_id, msg_id), f"stored:{self.node}",
                       ex=self.settings.dedupe_s)
        for channel, payload in view.published:
            self._send("publish", BROADCASTS, json.dumps(
                {"from": self.node, "kind": "broadcast", "channel": channel,
                 "payload": payload}))
        for node, delivery in view.forward:
            self._spawn(self._forward(node, delivery))
        for delivery, expires in view.parked:
            self._park(delivery, expires)
        for node, result in view.results:
            self._send("publish", f"nexus:to:{node}", json.dumps(
                {"from": self.node, "kind": "result", "payload": result}))

    # ------------------------------------------------------------------ stored once

    async def _claim(self, device_id: str, ids: List[str]) -> List[str]:
        """The ids of ``device_id`` another node stored (or stores meanwhile); the others
        are ours to store."""
        lease = self.settings.lease_s
        keys = [seen_key(device_id, i) for i in ids]
        answers = await asyncio.gather(*(self._call(
            "set", key, f"claim:{self.node}", nx=True, get=True, ex=lease) for key in keys))
        duplicates = []
        for msg_id, key, old in zip(ids, keys, answers):
            if old is None or old == f"claim:{self.node}":
                continue  # ours (a resend still in flight here: the hub's own store decides)
            if old.startswith("stored:") or not await self._outwait(key):
                duplicates.append(msg_id)
        return duplicates

    async def _outwait(self, key: str) -> bool:
        """Another node claimed ``key`` and has not stored its sample yet: True once this
        node may store it (that node's lease ran out: it died before storing), False once
        stored."""
        deadline = time.monotonic() + self.settings.lease_s + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            old = await self._call("set", key, f"claim:{self.node}", nx=True, get=True,
                                   ex=self.settings.lease_s)
            if old is None:
                log.warning("%s: the node that claimed it did not store it within %d s; "
                            "storing it here", key, self.settings.lease_s)
                return True
            if old.startswith("stored:"):
                return False
        return True  # a node alive but stuck for longer than its lease: better twice than never

    # ------------------------------------------------------------------ commands

    async def _forward(self, node: str, delivery: Dict[str, Any]) -> None:
        text = json.dumps({"from": self.node, "kind": "command", "payload": delivery})
        try:
            receivers = await self._call("publish", f"nexus:to:{node}", text)
        except Unreachable:
            receivers = 0
        if not receivers:
            self._deliver(self._hub.command_failed(
                delivery["device_id"], delivery["command_id"],
                f"device {delivery['device_id']} is not connected "
                "(its node is gone; set payload.ttl_s to wait for it)", time.time()))

    def _park(self, delivery: Dict[str, Any], expires: float) -> None:
        key = f"nexus:parked:{delivery['device_id']}"
        entry = json.dumps({"origin": self.node, "expires": expires, "delivery": delivery})
        left = expires - time.time()
        keep = int(left) + 60
        self._send("rpush", key, entry)
        self._send("expire", key, keep, nx=True)
        self._send("expire", key, keep, gt=True)
        # The entry's expiry is wall-clock time (other hosts read it); this node's own wait
        # for it is on the monotonic clock.
        self._parked[(delivery["device_id"], delivery["command_id"])] = (
            key, entry, time.monotonic() + left)

    async def _device_arrived(self, device_id: str) -> None:
        """A device subscribed to commands here: register it, deliver what waits for it."""
        key = f"nexus:parked:{device_id}"
        try:
            await self._call("set", f"nexus:device:{device_id}", self.node,
                             ex=self.settings.registry_ttl_s)
            pipe = self._redis.pipeline(transaction=True)
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            entries, _ = await asyncio.wait_for(pipe.execute(), self.settings.op_timeout_s)
        except _REDIS_ERRORS + (Unreachable,) as exc:
            self._went_down(exc)
            return
        now = time.time()
        for text in entries:
            entry = json.loads(text)
            if entry["expires"] <= now:
                continue  # its operator's node answers DEVICE_OFFLINE
            origin = entry["origin"] if entry["origin"] != self.node else None
            if origin is None:
                self._parked.pop((device_id, entry["delivery"]["command_id"]), None)
            out = self._hub.deliver_command(entry["delivery"], origin, now)
            self._deliver(out or [])

    async def _expire_parked(self) -> None:
        now, mono = time.time(), time.monotonic()
        for (device, command_id), (key, entry, expires) in list(self._parked.items()):
            if expires > mono:
                continue
            del self._parked[(device, command_id)]
            try:
                removed = await self._call("lrem", key, 1, entry)
            except Unreachable:
                removed = 1  # not known to be delivered
            if removed:
                self._deliver(self._hub.command_failed(
                    device, command_id, f"device {device} did not connect before the command's "
                    "ttl_s ran out", now))

    def disconnected(self, client: Client) -> None:
        device = client.identity.subject
        if client.identity.is_device and not self._hub.device_listening(device):
            self._send("eval", _FORGET, 1, f"nexus:device:{device}", self.node)

    # ------------------------------------------------------------------ from other nodes

    def _received(self, text: str) -> None:
        msg = json.loads(text)
        if msg.get("from") == self.node:
            return
        now, kind, payload = time.time(), msg.get("kind"), msg.get("payload")
        if kind == "broadcast":
            self._deliver(self._hub.deliver_remote(msg["channel"], payload, now))
        elif kind == "command":
            out = self._hub.deliver_command(payload, msg["from"], now)
            if out is None:  # the registry was stale: the device left this node
                self._send("publish", f"nexus:to:{msg['from']}", json.dumps(
                    {"from": self.node, "kind": "offline", "payload": payload}))
            self._deliver(out or [])
        elif kind == "result":
            self._deliver(self._hub.deliver_result(payload, now))
        elif kind == "offline":
            self._deliver(self._hub.command_failed(
                payload["device_id"], payload["command_id"],
                f"device {payload['device_id']} is not connected "
                "(set payload.ttl_s to wait for it)", now))

    # ------------------------------------------------------------------ supervisor

    async def run(self) -> None:
        """Connect, listen, refresh the registry; on any failure, back off and retry."""
        delay = 0.2
        while True:
            sessions = self._sessions
            await self._session()
            if self._sessions != sessions:
                delay = 0.2  # it was connected: the next try comes soon
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        """One session with Redis: subscribe, serve until something fails, clean up. Never
        raises but CancelledError: whatever ends it, the supervisor starts another."""
        pubsub = self._redis.pubsub()
        try:
            await asyncio.wait_for(self._redis.ping(), self.settings.op_timeout_s)
            await asyncio.wait_for(pubsub.subscribe(BROADCASTS, self._inbox),
                                   self.settings.op_timeout_s)
            if self._ever_up and not self.up:
                log.warning("redis back at %s; node %s in the cluster again",
                            _safe_url(self.settings.url), self.node)
                # Devices that subscribed meanwhile: register them, deliver what waits.
                for device in self._hub.command_listeners():
                    self._spawn(self._device_arrived(device))
            else:
                log.info("node %s joined the cluster at %s", self.node,
                         _safe_url(self.settings.url))
            self.up, self._ever_up = True, True
            self._sessions += 1
            self._last_round = time.monotonic()
            await self._serve(pubsub)
        except _REDIS_ERRORS + (Unreachable,) as exc:
            self._went_down(exc)
        except Exception:  # noqa: BLE001 - a bug must not end the reader: logged, retried
            log.exception("the cluster reader failed; serving local clients only until it "
                          "is back")
            self.up = False
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
                if not self.up:
                    # Pooled connections to a Redis that restarted are all broken: each
                    # would fail once more after it is back (and be logged as an outage).
                    await asyncio.wait_for(self._redis.connection_pool.disconnect(), 1.0)
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass

    async def _serve(self, pubsub: Any) -> None:
        """Deliver what other nodes send; refresh the registry and check Redis meanwhile."""
        refresh_every = self.settings.registry_ttl_s / 3
        refreshed = -math.inf
        while True:
            if time.monotonic() - refreshed >= refresh_every:
                await self._refresh()
                refreshed = time.monotonic()
            await self._expire_parked()
            deadline = time.monotonic() + self.settings.health_interval_s
            while time.monotonic() < deadline:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if msg is not None and msg.get("type") == "message":
                    self._received_one(msg["data"])
            await self._call("ping")
            if not self.up:
                raise Unreachable("a command failed meanwhile")
            self._last_round = time.monotonic()

    def _received_one(self, data: Any) -> None:
        """One message from Redis, on its own: whatever it holds (not JSON, nested too deep
        to parse, a payload too big to relay), a failure costs that message only."""
        try:
            self._received(data)
        except Exception as exc:  # noqa: BLE001 - logged, counted, skipped
            self.bad_messages += 1
            log.warning("skipped a cluster message that could not be handled (%s: %.100s; "
                        "%d so far): %.200s", type(exc).__name__, exc, self.bad_messages,
                        data)

    async def _refresh(self) -> None:
        devices = self._hub.command_listeners()
        await asyncio.gather(*(self._call("set", f"nexus:device:{d}", self.node,
                                          ex=self.settings.registry_ttl_s) for d in devices))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        try:
            await asyncio.wait_for(self._redis.aclose(), 1.0)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass


def seen_key(device_id: str, msg_id: str) -> str:
    """``nexus:seen:<device id>:<message id>``, the stored-once marker of one sample.

    ``%`` and ``:`` in the device id are escaped (``%25``, ``%3A``), so the first ``:``
    after the prefix always ends the device id and two different pairs never share a key
    (unescaped, device ``a:b`` with id ``c`` and device ``a`` with id ``b:c`` would). The
    message id needs no escaping: it is all that follows.
    """
    device = device_id.replace("%", "%25").replace(":", "%3A")
    return f"nexus:seen:{device}:{msg_id}"


def _decoded(text: str | bytes) -> Optional[p.Envelope]:
    """The frame's envelope, or None (the hub answers malformed frames itself)."""
    try:
        return p.decode(text)
    except ProtocolError:
        return None


def _channel(env: p.Envelope) -> Any:
    payload = env.payload
    return payload.get("channel") if isinstance(payload, dict) else None


def _telemetry_ids(env: p.Envelope) -> List[str]:
    if env.type == "telemetry":
        return [env.id] if env.id else []
    payload = env.payload
    items = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return []
    return [i["id"] for i in items[:p.MAX_BATCH_ITEMS]
            if isinstance(i, dict) and isinstance(i.get("id"), str) and i["id"]]


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"

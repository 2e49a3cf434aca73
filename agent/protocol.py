"""The Nexus WebSocket protocol, sans I/O.

Rules of this module:

* No sockets, threads, clocks or files. Callers pass ``now`` (seconds since the
  epoch) in; text goes in and typed values come out, values go in and text
  comes out. Both the agent and the companion server use it, so the two can
  never disagree about the wire format.
* Every message is a JSON object ``{type, id, timestamp, payload}``; an error
  carries ``error: {code, message[, field]}`` instead of a payload.
* Validation names the offending field with a dotted path (``payload.metrics.cpu_usage``)
  and raises :class:`RemoteProtocolError` for what a peer sent, and
  :class:`LocalProtocolError` for what we were about to send.

``docs/protocol.md`` is the prose version of this module; keep them in step.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from .errors import LocalProtocolError, RemoteProtocolError

PATH = "/v1/ws"
_SURROGATE = re.compile("[\ud800-\udfff]")

CHANNELS = ("telemetry", "commands", "tasks", "ai", "events")

# Error codes: every one the companion server can send (docs/protocol.md lists them).
AUTH_FAILED = "AUTH_FAILED"
INVALID_MESSAGE = "INVALID_MESSAGE"
UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
INVALID_CHANNEL = "INVALID_CHANNEL"
FORBIDDEN = "FORBIDDEN"
RATE_LIMITED = "RATE_LIMITED"
COMMAND_FAILED = "COMMAND_FAILED"
DEVICE_OFFLINE = "DEVICE_OFFLINE"
INTERNAL_ERROR = "INTERNAL_ERROR"
ERROR_CODES = (
    AUTH_FAILED,
    INVALID_MESSAGE,
    UNKNOWN_MESSAGE_TYPE,
    INVALID_CHANNEL,
    FORBIDDEN,
    RATE_LIMITED,
    COMMAND_FAILED,
    DEVICE_OFFLINE,
    INTERNAL_ERROR,
)

# Close codes.
CLOSE_NORMAL = 1000  # graceful shutdown, by either side
CLOSE_GOING_AWAY = 1001  # a server going down (a clean close, nothing refused)
CLOSE_POLICY = 1008  # e.g. a binary frame where text is required
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_INTERNAL = 1011  # keepalive timeout or server fault
CLOSE_TRY_AGAIN = 1013  # server side: the client did not read and its send queue filled
CLOSE_AUTH_FAILED = 4000  # as the platform guide: after an AUTH_FAILED error
CLOSE_REPLACED = 4001  # server side: a newer connection of the same identity took over

# Limits a peer must respect (the companion server enforces them).
MAX_MESSAGE_BYTES = 64 * 1024  # what a client may send, and what the agent stores
# What the server may send: a broadcast wraps an accepted message (64 KiB) with a new
# envelope, the original id and its sample time, so it must be allowed to be a little larger.
BROADCAST_OVERHEAD_BYTES = 4 * 1024
MAX_SERVER_MESSAGE_BYTES = MAX_MESSAGE_BYTES + BROADCAST_OVERHEAD_BYTES
MAX_ID_CHARS = 128
MAX_DEVICE_ID_CHARS = 128
MAX_METRICS = 256
MAX_SOURCE_CHARS = 128  # telemetry's optional source: which application or script sent it
MAX_TAGS = 32
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
MAX_FILTERS = 16
MAX_FILTER_BYTES = 1024  # a subscription's filters as compact JSON (UTF-8)
MAX_SUBSCRIPTIONS = 16  # per client
MAX_COMMAND_ARGS = 32
MAX_ARG_CHARS = 1024
# The dotted path an error names (``payload.metrics.<key>``) is cut to this: a key may be
# long, and an answer must stay within the limit whatever the client sent.
MAX_FIELD_CHARS = 256

COMMAND_STATUSES = ("succeeded", "failed", "rejected", "timed_out")

TELEMETRY_BATCH = "telemetry.batch"  # an extension: used only when the server offers it
# An extension: offered in the welcome; the server then sends a device ``token.renewed``
# with a fresh token once the one it connected with has passed ``at`` of its lifetime.
TOKEN_RENEW = "token.renew"
TOKEN_RENEWED = "token.renewed"
MAX_RENEWED_TOKEN_CHARS = 8191  # with its newline, the agent's token file limit (8 KiB)
# Provisioning by claim: a claim token's connection is offered ``device.claim`` and may send
# one, with a device id and a certificate request; the answer is ``device.claimed`` with the
# certificate (or an ``error``), then close 1000.
DEVICE_CLAIM = "device.claim"
DEVICE_CLAIMED = "device.claimed"
MAX_CSR_CHARS = 16 * 1024
CLIENT_TYPES = ("ping", "subscribe", "unsubscribe", "telemetry", "command", "command.result",
                TELEMETRY_BATCH)

# telemetry.batch: what the companion server offers in its welcome. A batch is one frame,
# so max_bytes stays under the 1 MiB an agent accepts; the rest of the protocol keeps
# MAX_MESSAGE_BYTES.
MAX_BATCH_ITEMS = 1000
MAX_BATCH_BYTES = 768 * 1024
# One item is held to what a single telemetry message may carry: its payload
# ({"device_id", "metrics"}, compact JSON, UTF-8) at most MAX_MESSAGE_BYTES, so its
# broadcast fits MAX_SERVER_MESSAGE_BYTES like any other.
MAX_BATCH_ITEM_BYTES = MAX_MESSAGE_BYTES


# --------------------------------------------------------------------------- time and ids


def format_timestamp(now: float) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2025-11-03T01:53:54.518Z``."""
    dt = datetime.fromtimestamp(now, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch from an ISO-8601 timestamp; ``ValueError`` if it is not one.

    Accepts the ``Z`` suffix (Python 3.9's ``fromisoformat`` does not) and a numeric
    offset; a timestamp without a zone is refused, since its meaning is a guess.
    """
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError("not an ISO-8601 timestamp")
    candidate = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    # Python 3.9 wants 0, 3 or 6 fraction digits; JavaScript and others send 3.
    dt = datetime.fromisoformat(_normalise_fraction(candidate))
    if dt.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return dt.timestamp()


def _normalise_fraction(text: str) -> str:
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = ""
    while rest and rest[0].isdigit():
        digits, rest = digits + rest[0], rest[1:]
    if not digits:
        raise ValueError("empty fraction of a second")
    return f"{head}.{(digits + '000000')[:6]}{rest}"


def new_id(prefix: str = "msg") -> str:
    """A fresh random id, e.g. ``msg-3f2a9c0e5b7d4e1a``."""
    return f"{prefix}-{os.urandom(8).hex()}"  # secrets.token_hex(8), without its imports


# --------------------------------------------------------------------------- the envelope


@dataclass(frozen=True)
class Envelope:
    """One message on the wire."""

    type: str
    id: str | None = None
    timestamp: str | None = None
    payload: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.id is not None:
            out["id"] = self.id
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        if self.error is not None:
            out["error"] = dict(self.error)
        elif self.payload is not None:
            out["payload"] = dict(self.payload)
        return out


def dumps(value: Any) -> str:
    """Compact JSON that is always valid UTF-8.

    A peer may send a lone surrogate escape (``"\\ud800"``), which JSON allows and
    Python decodes into a string UTF-8 cannot carry; echoing it must not fail, so a lone
    surrogate is written back as its escape (the same JSON value).
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if not _is_unicode(text):
        # Outside strings JSON text is ASCII, and Python's decoder joins valid pairs, so
        # every surrogate left is a lone one inside a string: write it as its escape.
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def encode(env: Envelope, limit: int = MAX_MESSAGE_BYTES) -> str:
    """The compact JSON text of ``env``; LocalProtocolError when over ``limit`` bytes."""
    return _checked(dumps(env.to_dict()), limit, env.id)


def envelope_text(type_: str, msg_id: str, timestamp: str, payload_json: str,
                  limit: int = MAX_MESSAGE_BYTES) -> str:
    """The wire text of a message whose payload is already JSON text (the outbox stores
    payloads as text and sends them without decoding them again)."""
    head = dumps({"type": type_, "id": msg_id, "timestamp": timestamp})
    return _checked(f'{head[:-1]},"payload":{payload_json}}}', limit, msg_id)


def _checked(text: str, limit: int, msg_id: str | None) -> str:
    size = len(text.encode("utf-8"))
    if size > limit:
        raise LocalProtocolError(INVALID_MESSAGE, f"message of {size} bytes is over the "
                                 f"{limit}-byte limit", msg_id=msg_id)
    return text


class TimestampClock:
    """``format_timestamp(now)``, cheaper (the companion server's hot path): an ack, its
    row and its broadcasts share one ``now`` (formatted once), and the date and time of day
    change once a second. It reads no clock: ``now`` is passed in."""

    def __init__(self) -> None:
        # Tuples, replaced whole: a reader on another thread never sees half an update.
        self._last: tuple[float, str] = (math.nan, "")
        self._second: tuple[float, str] = (math.nan, "")

    def __call__(self, now: float) -> str:
        last = self._last
        if last[0] == now:
            return last[1]
        # Rounded as datetime.fromtimestamp rounds (half to even, to the microsecond).
        fraction, whole = math.modf(now)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        elif micros < 0:
            whole, micros = whole - 1, micros + 1_000_000
        second = self._second
        if second[0] != whole:
            second = (whole, datetime.fromtimestamp(whole, tz=timezone.utc)
                      .strftime("%Y-%m-%dT%H:%M:%S."))
            self._second = second
        text = f"{second[1]}{micros // 1000:03d}Z"
        self._last = (now, text)
        return text


def ack_text(msg_id: str, timestamp: str) -> str:
    """``protocol.encode`` of an ack without a payload, by concatenation (the id was checked
    to be real text when its frame was decoded)."""
    return '{"type":"ack","id":' + _json_text(msg_id) + ',"timestamp":"' + timestamp + '"}'


# One encoder, made once: json.dumps with any option builds a new encoder on every call.
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def delivery_payload(request: CommandRequest) -> dict[str, Any]:
    """The ``commands.update`` payload that carries ``request`` to its device (section 6 of
    docs/protocol.md), the inverse of :func:`parse_command_delivery`."""
    return {"command_id": request.command_id, "device_id": request.device_id,
            "name": request.name, "args": dict(request.args)}


def command_payload(device_id: str, name: str, args: Mapping[str, Any],
                    ttl_s: float | None = None) -> dict[str, Any]:
    """An operator's ``command`` payload (``ttl_s`` only when it should wait for the device)."""
    payload: dict[str, Any] = {"device_id": device_id, "name": name, "args": dict(args)}
    if ttl_s:
        payload["ttl_s"] = ttl_s
    return payload


def make(type_: str, now: float, payload: Mapping[str, Any] | None = None,
         msg_id: str | None = None) -> Envelope:
    """A message of ``type_`` stamped ``now``, with a fresh id unless one is given."""
    return Envelope(type_, msg_id or new_id(), format_timestamp(now), payload)


def make_error(code: str, message: str, now: float, msg_id: str | None = None,
               field_path: str | None = None) -> Envelope:
    error: dict[str, Any] = {"code": code, "message": message}
    if field_path:
        error["field"] = field_path[:MAX_FIELD_CHARS]
    return Envelope("error", msg_id, format_timestamp(now), error=error)


def decode(text: str | bytes) -> Envelope:
    """Parse the envelope of a received frame; checks only the envelope, not the payload."""
    if isinstance(text, (bytes, bytearray)):
        raise RemoteProtocolError(INVALID_MESSAGE, "binary frames are not part of the protocol")
    try:
        obj = json.loads(text)
    except ValueError:
        raise RemoteProtocolError(INVALID_MESSAGE, "Invalid JSON format") from None
    except RecursionError:  # e.g. 10,000 nested arrays: the parser gives up, so do we
        raise RemoteProtocolError(INVALID_MESSAGE, "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(INVALID_MESSAGE, "a message must be a JSON object")
    raw_id = obj.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_CHARS else None
    if raw_id is not None and msg_id is None:
        raise RemoteProtocolError(
            INVALID_MESSAGE, f"must be a string of 1 to {MAX_ID_CHARS} characters", "id")
    if msg_id is not None and not _is_unicode(msg_id):
        # An id must be echoed in the reply and stored: it has to be real text.
        raise RemoteProtocolError(INVALID_MESSAGE, "must be valid Unicode (a lone surrogate "
                                  "escape is not)", "id")
    type_ = obj.get("type")
    if not isinstance(type_, str) or not type_:
        raise RemoteProtocolError(INVALID_MESSAGE, "missing or not a string", "type", msg_id)
    timestamp = obj.get("timestamp")
    if timestamp is not None:
        try:
            parse_timestamp(timestamp)
        except (ValueError, TypeError):
            raise RemoteProtocolError(
                INVALID_MESSAGE, "not an ISO-8601 timestamp with a zone", "timestamp", msg_id
            ) from None
    payload = obj.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be an object", "payload", msg_id)
    error = obj.get("error")
    if error is not None:
        _check_error(error, msg_id)
    return Envelope(type_, msg_id, timestamp, payload, error)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_error(error: Any, msg_id: str | None) -> None:
    if not isinstance(error, dict):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be an object", "error", msg_id)
    for key in ("code", "message"):
        if not isinstance(error.get(key), str):
            raise RemoteProtocolError(INVALID_MESSAGE, "missing or not a string",
                                      f"error.{key}", msg_id)


# --------------------------------------------------------------------------- field checks


def _get(obj: Mapping[str, Any], key: str, kinds: tuple[type, ...], path: str,
         msg_id: str | None, required: bool = True) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise RemoteProtocolError(INVALID_MESSAGE, "is required", f"{path}.{key}", msg_id)
        return None
    # bool is an int in Python; a JSON true is never a number here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise RemoteProtocolError(INVALID_MESSAGE, f"must be {names}", f"{path}.{key}", msg_id)
    return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               list: "an array", bool: "a boolean"}


def _short_str(obj: Mapping[str, Any], key: str, path: str, msg_id: str | None,
               limit: int, required: bool = True) -> Any:
    value = _get(obj, key, (str,), path, msg_id, required)
    if value is not None and not 0 < len(value) <= limit:
        raise RemoteProtocolError(INVALID_MESSAGE, f"must be 1 to {limit} characters",
                                  f"{path}.{key}", msg_id)
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        not isinstance(value, float) or math.isfinite(value))


# --------------------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    metrics: Mapping[str, float]
    source: str | None = None  # absent: the device's own readings (the guide's payload)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Subscription:
    channel: str
    filters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandRequest:
    """An operator's command for a device (``command``), or its delivery (``commands.update``)."""

    command_id: str
    device_id: str
    name: str
    args: Mapping[str, str]
    ttl_s: float | None = None


@dataclass(frozen=True)
class CommandResult:
    command_id: str
    device_id: str
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: int

    def to_payload(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "device_id": self.device_id,
                "status": self.status, "exit_code": self.exit_code, "stdout": self.stdout,
                "stderr": self.stderr, "duration_ms": self.duration_ms}


def _payload(env: Envelope) -> Mapping[str, Any]:
    if env.payload is None:
        raise RemoteProtocolError(INVALID_MESSAGE, "is required", "payload", env.id)
    return env.payload


def parse_telemetry(env: Envelope) -> Telemetry:
    payload = _payload(env)
    device_id = _short_str(payload, "device_id", "payload", env.id, MAX_DEVICE_ID_CHARS)
    metrics = _metrics(payload, "payload", env.id)
    source, tags = _source_and_tags(payload, "payload", env.id)
    return Telemetry(device_id, metrics, source, tags)


def _source_and_tags(obj: Mapping[str, Any], path: str, msg_id: str | None
                     ) -> tuple[str | None, dict[str, str]]:
    """A sample's optional ``source`` (1-128 characters) and ``tags`` (at most 32 strings
    of at most 256 characters, keys 1-128)."""
    source = _short_str(obj, "source", path, msg_id, MAX_SOURCE_CHARS, required=False)
    if source is not None and not _is_unicode(source):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be valid Unicode", f"{path}.source",
                                  msg_id)
    tags = _get(obj, "tags", (dict,), path, msg_id, required=False) or {}
    if len(tags) > MAX_TAGS:
        raise RemoteProtocolError(INVALID_MESSAGE, f"more than {MAX_TAGS} tags",
                                  f"{path}.tags", msg_id)
    for key, value in tags.items():
        if not 0 < len(key) <= MAX_TAG_KEY_CHARS or not isinstance(value, str) or \
                len(value) > MAX_TAG_VALUE_CHARS or not _is_unicode(key + value):
            raise RemoteProtocolError(
                INVALID_MESSAGE, f"must be a string of at most {MAX_TAG_VALUE_CHARS} "
                f"characters (keys 1 to {MAX_TAG_KEY_CHARS})", f"{path}.tags.{key[:128]}",
                msg_id)
    return source, dict(tags)


def _metrics(obj: Mapping[str, Any], path: str, msg_id: str | None) -> Mapping[str, float]:
    metrics = _get(obj, "metrics", (dict,), path, msg_id)
    if len(metrics) > MAX_METRICS:
        raise RemoteProtocolError(INVALID_MESSAGE, f"more than {MAX_METRICS} metrics",
                                  f"{path}.metrics", msg_id)
    for key, value in metrics.items():
        if not _number(value):
            raise RemoteProtocolError(INVALID_MESSAGE, "must be a finite number",
                                      f"{path}.metrics.{key}", msg_id)
    return metrics


def parse_subscription(env: Envelope, need_filters: bool = True) -> Subscription:
    payload = _payload(env)
    channel = _get(payload, "channel", (str,), "payload", env.id)
    if channel not in CHANNELS:
        raise RemoteProtocolError(
            INVALID_CHANNEL, f"unknown channel {channel[:64]!r}; channels are "
            + ", ".join(CHANNELS), "payload.channel", env.id)
    filters = _get(payload, "filters", (dict,), "payload", env.id, required=False) or {}
    if need_filters:
        if len(filters) > MAX_FILTERS:
            raise RemoteProtocolError(INVALID_MESSAGE, f"more than {MAX_FILTERS} filters",
                                      "payload.filters", env.id)
        for key, value in filters.items():
            if not (value is None or isinstance(value, (str, int, float, bool))):
                raise RemoteProtocolError(INVALID_MESSAGE, "a filter value must be a scalar",
                                          f"payload.filters.{key}", env.id)
        # Kept for the life of the connection: bounded like everything a client leaves.
        if len(dumps(filters).encode("utf-8")) > MAX_FILTER_BYTES:
            raise RemoteProtocolError(INVALID_MESSAGE, f"over {MAX_FILTER_BYTES} bytes as JSON",
                                      "payload.filters", env.id)
    return Subscription(channel, filters)


def _parse_args(payload: Mapping[str, Any], msg_id: str | None) -> dict[str, str]:
    args = _get(payload, "args", (dict,), "payload", msg_id, required=False) or {}
    if len(args) > MAX_COMMAND_ARGS:
        raise RemoteProtocolError(INVALID_MESSAGE, f"more than {MAX_COMMAND_ARGS} arguments",
                                  "payload.args", msg_id)
    for key, value in args.items():
        if not isinstance(value, str) or len(value) > MAX_ARG_CHARS:
            raise RemoteProtocolError(
                INVALID_MESSAGE, f"must be a string of at most {MAX_ARG_CHARS} characters",
                f"payload.args.{key}", msg_id)
    return dict(args)


def parse_command(env: Envelope) -> CommandRequest:
    """An operator's ``command``; its ``command_id`` is the message id."""
    payload = _payload(env)
    if env.id is None:
        raise RemoteProtocolError(INVALID_MESSAGE, "is required", "id")
    device_id = _short_str(payload, "device_id", "payload", env.id, MAX_DEVICE_ID_CHARS)
    name = _short_str(payload, "name", "payload", env.id, 128)
    ttl = _get(payload, "ttl_s", (int, float), "payload", env.id, required=False)
    if ttl is not None and not (_number(ttl) and 0 < ttl <= 86400):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be a number in (0, 86400]",
                                  "payload.ttl_s", env.id)
    return CommandRequest(env.id, device_id, name, _parse_args(payload, env.id), ttl)


def parse_command_delivery(env: Envelope) -> CommandRequest:
    """A ``commands.update`` broadcast that carries a command for this device."""
    payload = _payload(env)
    command_id = _short_str(payload, "command_id", "payload", env.id, MAX_ID_CHARS)
    device_id = _short_str(payload, "device_id", "payload", env.id, MAX_DEVICE_ID_CHARS)
    name = _short_str(payload, "name", "payload", env.id, 128)
    return CommandRequest(command_id, device_id, name, _parse_args(payload, env.id))


def parse_command_result(env: Envelope) -> CommandResult:
    payload = _payload(env)
    status = _get(payload, "status", (str,), "payload", env.id)
    if status not in COMMAND_STATUSES:
        raise RemoteProtocolError(INVALID_MESSAGE, "must be one of " + ", ".join(COMMAND_STATUSES),
                                  "payload.status", env.id)
    exit_code = _get(payload, "exit_code", (int,), "payload", env.id, required=False)
    duration = _get(payload, "duration_ms", (int,), "payload", env.id)
    return CommandResult(
        _short_str(payload, "command_id", "payload", env.id, MAX_ID_CHARS),
        _short_str(payload, "device_id", "payload", env.id, MAX_DEVICE_ID_CHARS),
        status, exit_code,
        _get(payload, "stdout", (str,), "payload", env.id, required=False) or "",
        _get(payload, "stderr", (str,), "payload", env.id, required=False) or "",
        duration)


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class BatchItem:
    id: str
    timestamp: str
    metrics: Mapping[str, float]
    source: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def payload(self, device_id: str) -> dict[str, Any]:
        """The telemetry payload this item stands for (stored and broadcast as if alone)."""
        return telemetry_payload(device_id, self.metrics, self.source, self.tags)


def telemetry_payload(device_id: str, metrics: Mapping[str, Any], source: str | None = None,
                      tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"device_id", "source"?, "metrics", "tags"?}``: source and tags only when given
    (a sample without them is the guide's payload, byte for byte)."""
    out: dict[str, Any] = {"device_id": device_id}
    if source is not None:
        out["source"] = source
    out["metrics"] = metrics
    if tags:
        out["tags"] = tags
    return out


@dataclass(frozen=True)
class ItemRejected:
    index: int
    id: str | None
    field: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "field": self.field,
                "message": self.message}


@dataclass(frozen=True)
class TelemetryBatch:
    device_id: str
    items: list[BatchItem]  # the valid ones, in order
    rejected: list[ItemRejected]  # one per invalid item; the others are still taken


def batch_text(batch_id: str, now: float, device_id: str, item_texts: list[str]) -> str:
    """The wire text of a batch whose items are already JSON (see :func:`batch_item_text`).
    The caller keeps it under the offered ``max_bytes``."""
    head = dumps({"type": TELEMETRY_BATCH, "id": batch_id, "timestamp": format_timestamp(now),
                  "payload": {"device_id": device_id, "items": []}})
    return f"{head[:-3]}{','.join(item_texts)}]}}}}"


def batch_item_text(msg_id: str, timestamp: str, metrics: Mapping[str, Any],
                    source: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """An item: ``{"id", "timestamp", "source"?, "metrics", "tags"?}`` (source and tags
    only when the sample has them)."""
    item: dict[str, Any] = {"id": msg_id, "timestamp": timestamp}
    if source is not None:
        item["source"] = source
    item["metrics"] = metrics
    if tags:
        item["tags"] = tags
    return dumps(item)


def parse_telemetry_batch(env: Envelope, max_items: int = MAX_BATCH_ITEMS) -> TelemetryBatch:
    """A batch: the envelope must be right (else RemoteProtocolError); each bad item is
    named in ``rejected`` (``payload.items.3.metrics.cpu_usage``) and the rest is kept."""
    device_id, raw = parse_batch_head(env, max_items)
    items: list[BatchItem] = []
    rejected: list[ItemRejected] = []
    for index, item in enumerate(raw):
        parsed = parse_batch_item(item, index, env.id)
        if isinstance(parsed, ItemRejected):
            rejected.append(parsed)
        else:
            items.append(parsed)
    return TelemetryBatch(device_id, items, rejected)


def parse_batch_head(env: Envelope, max_items: int = MAX_BATCH_ITEMS) -> tuple[str, list[Any]]:
    """What a batch must have as a whole (else RemoteProtocolError): its device id and its
    items, not checked yet (:func:`parse_batch_item` checks each; a server may spread
    them over several steps)."""
    payload = _payload(env)
    device_id = _short_str(payload, "device_id", "payload", env.id, MAX_DEVICE_ID_CHARS)
    raw = _get(payload, "items", (list,), "payload", env.id)
    if not 0 < len(raw) <= max_items:
        raise RemoteProtocolError(INVALID_MESSAGE, f"must hold 1 to {max_items} items",
                                  "payload.items", env.id)
    return device_id, raw


def parse_batch_item(item: Any, index: int, msg_id: str | None) -> BatchItem | ItemRejected:
    """Item ``index`` of a batch, checked like a telemetry payload, or why it is refused."""
    try:
        return _batch_item(item, f"payload.items.{index}", msg_id)
    except RemoteProtocolError as exc:
        return item_rejected(index, item, exc.field or f"payload.items.{index}", exc.message)


def item_rejected(index: int, item: Any, field_path: str, message: str) -> ItemRejected:
    """The ack's entry for a refused item. Its id is echoed cut to MAX_ID_CHARS (an id too
    long is one reason to refuse it) and the field to MAX_FIELD_CHARS, so that the entry's
    size is bounded whatever the item held; a client matches rejections by index."""
    item_id = item.get("id") if isinstance(item, dict) else None
    return ItemRejected(index, item_id[:MAX_ID_CHARS] if isinstance(item_id, str) and
                        _is_unicode(item_id) else None, field_path[:MAX_FIELD_CHARS], message)


def rejected_list(rejected: list[ItemRejected], budget: int) -> list[dict[str, Any]]:
    """The ack's ``rejected`` list, at most ``budget`` bytes of JSON: every entry in full
    while the rest still fit as ``{"index": N}``, then the rest as ``{"index": N}`` only
    (1,000 of those take 14 KB), so an ack always fits and names every refused item."""
    short = [len(str(r.index)) + 11 for r in rejected]  # '{"index":N},'
    reserve, used, out = sum(short), 2, []
    for entry, small in zip(rejected, short):
        reserve -= small
        full = entry.to_dict()
        size = len(dumps(full).encode("utf-8")) + 1
        if used + size + reserve <= budget:
            out.append(full)
            used += size
        else:
            out.append({"index": entry.index})
            used += small
    return out


def _batch_item(item: Any, path: str, msg_id: str | None) -> BatchItem:
    if not isinstance(item, dict):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be an object", path, msg_id)
    item_id = _short_str(item, "id", path, msg_id, MAX_ID_CHARS)
    if not _is_unicode(item_id):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be valid Unicode", f"{path}.id", msg_id)
    timestamp = _get(item, "timestamp", (str,), path, msg_id)
    try:
        parse_timestamp(timestamp)
    except ValueError:
        raise RemoteProtocolError(INVALID_MESSAGE, "not an ISO-8601 timestamp with a zone",
                                  f"{path}.timestamp", msg_id) from None
    metrics = _metrics(item, path, msg_id)
    source, tags = _source_and_tags(item, path, msg_id)
    return BatchItem(item_id, timestamp, metrics, source, tags)


def check_client_envelope(env: Envelope) -> None:
    """A client may send this type, and the message has an id; the payload is left to the
    type's ``parse_*`` function (the companion server calls each exactly once)."""
    if env.type not in CLIENT_TYPES:
        raise RemoteProtocolError(UNKNOWN_MESSAGE_TYPE, f"Unknown message type: {env.type[:64]}",
                                  "type", env.id)
    if env.id is None:
        raise RemoteProtocolError(INVALID_MESSAGE, "is required", "id")


def matches_filters(payload: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    """True when every filter key equals the payload's field (the guide's rule)."""
    return all(payload.get(key) == value for key, value in filters.items())


# --------------------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class BatchOffer:
    """The server's ``capabilities["telemetry.batch"]``: the most a batch may hold."""

    max_items: int
    max_bytes: int


@dataclass(frozen=True)
class Welcome:
    client_id: str
    server_time: float
    batch: BatchOffer | None = None  # None: send single ``telemetry`` messages only
    renews_tokens: bool = False  # the server may send ``token.renewed`` (TOKEN_RENEW)


@dataclass(frozen=True)
class ServerError:
    code: str
    message: str
    msg_id: str | None
    field: str | None = None


def parse_welcome(env: Envelope) -> Welcome:
    payload = _payload(env)
    client_id = _get(payload, "client_id", (str,), "payload", env.id)
    raw_time = _get(payload, "server_time", (str,), "payload", env.id)
    try:
        server_time = parse_timestamp(raw_time)
    except ValueError:
        raise RemoteProtocolError(INVALID_MESSAGE, "not an ISO-8601 timestamp",
                                  "payload.server_time", env.id) from None
    capabilities = payload.get("capabilities")
    return Welcome(client_id, server_time, _batch_offer(capabilities),
                   isinstance(capabilities, dict) and
                   isinstance(capabilities.get(TOKEN_RENEW), dict))


def _batch_offer(capabilities: Any) -> BatchOffer | None:
    """The batch offer if it is there and sane; anything else is "not offered"."""
    offer = capabilities.get(TELEMETRY_BATCH) if isinstance(capabilities, dict) else None
    if not isinstance(offer, dict):
        return None
    items, size = offer.get("max_items"), offer.get("max_bytes")
    if not (isinstance(items, int) and isinstance(size, int) and not isinstance(items, bool)
            and not isinstance(size, bool) and items >= 2 and size >= 1024):
        return None
    return BatchOffer(items, size)


def welcome_payload(client_id: str, now: float, batch: BatchOffer | None,
                    renew_at: float | None = None) -> dict[str, Any]:
    """The ``connected`` payload; ``capabilities`` only when something is offered:
    ``telemetry.batch`` with its limits, ``token.renew`` with the share of a token's
    lifetime after which the server sends a fresh one."""
    payload: dict[str, Any] = {"client_id": client_id, "server_time": format_timestamp(now)}
    capabilities: dict[str, Any] = {}
    if batch is not None:
        capabilities[TELEMETRY_BATCH] = {"max_items": batch.max_items,
                                         "max_bytes": batch.max_bytes}
    if renew_at is not None:
        capabilities[TOKEN_RENEW] = {"at": renew_at}
    if capabilities:
        payload["capabilities"] = capabilities
    return payload


def parse_token_renewed(env: Envelope) -> str:
    """The fresh token of a ``token.renewed`` message (server to device)."""
    payload = _payload(env)
    token = _get(payload, "token", (str,), "payload", env.id)
    if not 0 < len(token) <= MAX_RENEWED_TOKEN_CHARS or not token.isascii() or any(
            c.isspace() or not c.isprintable() for c in token):
        raise RemoteProtocolError(INVALID_MESSAGE, "must be one token of at most "
                                  f"{MAX_RENEWED_TOKEN_CHARS} printable ASCII characters",
                                  "payload.token", env.id)
    return token


def parse_error(env: Envelope) -> ServerError:
    if env.error is None:
        raise RemoteProtocolError(INVALID_MESSAGE, "is required", "error", env.id)
    fld = env.error.get("field")
    return ServerError(env.error["code"], env.error["message"], env.id,
                       fld if isinstance(fld, str) else None)

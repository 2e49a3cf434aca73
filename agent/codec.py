"""The outbox's codec: what a message is on disk, and how a stored row becomes wire text.

The queue (``outbox.py``) stores opaque rows and knows nothing of payloads; this
module is the other half. Its rules:

* **Encoding** (:meth:`MessageCodec.encode`): a message (type, payload, time)
  becomes a :class:`~agent.outbox.Row` of cells: ``type`` an integer code
  (``TYPE_CODES``), ``ts`` milliseconds since the epoch when that formats back
  to exactly the text given, ``payload`` the JSON text deflated with a preset
  dictionary when that is smaller (a BLOB led by a byte naming the encoding:
  ``DEFLATE_1`` for the system input's samples and command results,
  ``DEFLATE_2`` for samples with a ``source``),
  ``size`` the bytes of the JSON text, ``created`` NULL when the ``ts`` is the
  creation time. Nothing is encoded that the protocol cannot carry: a message
  whose wire text would be over ``protocol.MAX_MESSAGE_BYTES`` with the longest
  id the queue gives is refused (``LocalProtocolError``) before anything is
  stored.
* **Decoding** (:meth:`MessageCodec.decode`): cells back to a :class:`Record`
  whose wire text is the text encoded, byte for byte, or an
  :class:`~agent.outbox.Unreadable` with the reason, never an exception. A
  damaged card can leave anything in a cell: text that is not UTF-8 where a
  BLOB was (the queue's connection hands such a cell over as
  ``store.BadText``), an integer where the payload was, a deflate stream that
  no longer inflates, text that is not a JSON object (NaN included), a payload
  over the wire limit, an unknown type code, a time that is not one.
* **Compatibility**: a dictionary or a code is never changed once released;
  rows of every schema read alike (TEXT cells are read as they are).
"""

from __future__ import annotations

import functools
import json
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Optional, Tuple, Union

from . import protocol as p
from . import store
from .outbox import ID_MAX_CHARS, Row, Unreadable

# --------------------------------------------------------------------------- how a row is stored
# Never change a dictionary or a code once released: rows written with it must still read.
# A new dictionary gets a new leading byte (and an entry in _ZDICTS); a new type, a new code.

# Preset dictionary of the deflate codec 1: a command result, then a telemetry sample
# (deflate finds the text at the end of the dictionary at the shortest distances, so the
# most common goes last). Its metric order is the one of the release that made it; the
# sampler has since moved agent_rss_bytes to just after disk_state_usage (metrics.py), which
# costs a match or two, never a wrong byte: a released dictionary is never edited.
ZDICT_1 = (
    b'{"command_id":"","device_id":"","status":"succeeded","exit_code":0,"stdout":"",'
    b'"stderr":"","duration_ms":0}'
    b'{"device_id":"","metrics":{"cpu_usage":0.0,"memory_usage":0.0,'
    b'"memory_available_bytes":0,"swap_usage":0.0,"uptime_s":0,"disk_root_usage":0,'
    b'"disk_state_usage":0,"net_bytes_sent":0,"net_bytes_recv":0,"load_1m":0,"load_5m":0,'
    b'"load_15m":0,"cpu_temp_c":0,"agent_rss_bytes":0,"agent_queue_depth":0,'
    b'"agent_queue_bytes":0,"agent_oldest_queued_age_s":0,"agent_dropped":0,'
    b'"agent_reconnects":0,"agent_clock_offset_s":0}}'
)
DEFLATE_1 = 1  # leading byte of a BLOB payload: raw deflate (RFC 1951) with ZDICT_1
# Preset dictionary of the deflate codec 2, for the samples of application inputs (the
# socket, scripts: ``{"device_id", "source", "metrics", "tags"}``): ZDICT_1's command
# result, then their keys and the words such payloads repeat, the most common last.
# Whatever names the application uses that are not here still compress (deflate finds
# them within the payload itself); they just cost their own bytes once per row.
ZDICT_2 = (
    ZDICT_1[:ZDICT_1.index(b'{"device_id":"","metrics"')]
    + b'"count":0,"total":0,"value":0.0,"state":0,"status":0,"rate":0.0,"level":0.0,'
    b'"pressure":0.0,"humidity":0.0,"flow":0.0,"speed":0.0,"power_w":0.0,"energy_wh":0,'
    b'"voltage":0.0,"current":0.0,"temperature":0.0,"temp_c":0.0,"errors":0,'
    b'"tags":{"host":"","line":"","shift":"","site":"","unit":"","zone":""}}'
    b'{"device_id":"","source":"","metrics":{"count":0,"temp_c":0.0},"tags":{"":""}}'
)
DEFLATE_2 = 2  # leading byte of a BLOB payload: raw deflate with ZDICT_2
_ZDICTS = {DEFLATE_1: ZDICT_1, DEFLATE_2: ZDICT_2}
_LEVEL, _WBITS, _MEMLEVEL = 6, -12, 5  # 4 KiB window, small state: ~10 us a sample
TYPE_CODES = {"telemetry": 1, "command.result": 2}  # stored as a small integer
_TYPES = {code: name for name, code in TYPE_CODES.items()}


# A compressor with ZDICT_1 loaded, copied for each payload: loading the dictionary (hashing
# it into the compressor's tables) was a fifth of a put's time.
_DEFLATER_1 = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEMLEVEL,
                               zlib.Z_DEFAULT_STRATEGY, ZDICT_1)


_DEFLATER_2 = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEMLEVEL,
                               zlib.Z_DEFAULT_STRATEGY, ZDICT_2)
_APP_SAMPLE = b'{"device_id":"'  # ...then "source" after the id: see pack_payload


def pack_payload(data: bytes) -> Optional[bytes]:
    """The stored form of a payload's UTF-8 ``data``: a leading byte naming the dictionary
    (DEFLATE_2 for a sample with a source, DEFLATE_1 for everything else, so the system
    input's rows are byte for byte what they always were) and the deflated bytes, or None
    when that is not smaller (the text is stored as it is)."""
    app = data.startswith(_APP_SAMPLE) and b'","source":"' in data[:200]
    c = (_DEFLATER_2 if app else _DEFLATER_1).copy()  # thread-safe: zlib locks the original
    packed = c.compress(data) + c.flush()
    lead = b"\x02" if app else b"\x01"
    return lead + packed if len(packed) + 1 < len(data) else None


def unpack_payload(value: Union[str, bytes]) -> str:
    """The payload text of a stored value: TEXT as it is (every row before compression, and
    rows compression did not shrink), a BLOB by its leading byte. ValueError when it cannot
    be read (an unknown leading byte, from a newer version; damaged bytes)."""
    if isinstance(value, str):
        return value
    zdict = _ZDICTS.get(value[0]) if value else None
    if zdict is None:
        raise ValueError(f"unknown payload encoding {value[:1]!r}")
    try:
        d = zlib.decompressobj(-15, zdict=zdict)  # the largest window reads any smaller one
        data = d.decompress(value[1:]) + d.flush()
    except zlib.error as exc:
        raise ValueError(f"damaged payload: {exc}") from None
    if not d.eof or d.unused_data:
        raise ValueError("damaged payload: the deflate stream does not end where the row does")
    return data.decode("utf-8")


_EPOCH, _SECOND = datetime(1970, 1, 1), timedelta(seconds=1)


@functools.lru_cache(maxsize=8)
def _second_of(prefix: str) -> Optional[int]:
    """Seconds since the epoch of ``YYYY-MM-DDTHH:MM:SS`` (UTC), only when formatting them
    back gives ``prefix`` exactly; else None."""
    try:
        second = (datetime.fromisoformat(prefix) - _EPOCH) // _SECOND
    except (ValueError, TypeError):  # not a date; a date with a zone
        return None
    return second if _format_second(second) == prefix else None


@functools.lru_cache(maxsize=8)
def _format_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def pack_ts(ts: str) -> Union[int, str]:
    """A timestamp as stored: milliseconds since the epoch (6 bytes instead of 24) when
    :func:`unpack_ts` gives ``ts`` back exactly (protocol.format_timestamp's form), else
    the text."""
    if len(ts) == 24 and ts[19] == "." and ts[23] == "Z" and ts[20:23].isascii() and \
            ts[20:23].isdigit():
        second = _second_of(ts[:19])
        if second is not None:
            return second * 1000 + int(ts[20:23])
    return ts


def unpack_ts(value: Union[int, str]) -> str:
    if isinstance(value, str):
        return value
    second, milli = divmod(value, 1000)
    return f"{_format_second(second)}.{milli:03d}Z"


def unpack_type(value: Union[int, str]) -> str:
    if isinstance(value, str):
        return value
    try:
        return _TYPES[value]
    except KeyError:
        raise ValueError(f"unknown type code {value}") from None



# --------------------------------------------------------------------------- reading cells back


_MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def _kind(value: Any) -> str:
    return "text that is not UTF-8" if isinstance(value, store.BadText) else \
        {int: "an integer", float: "a real", str: "text", bytes: "a blob"}.get(
            type(value), type(value).__name__)


def _stored_type(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value in _TYPES:
        return _TYPES[value]
    if type(value) is str and value in TYPE_CODES:  # rows of schemas before codes
        return value
    raise ValueError(f"type is {_kind(value)} naming no known message type")


def _stored_ts(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TS_MS:
        return unpack_ts(value)
    if type(value) is str:
        try:
            p.parse_timestamp(value)
        except (ValueError, TypeError, OverflowError):
            raise ValueError("ts is text that is not an ISO-8601 timestamp") from None
        return value
    raise ValueError(f"ts is {_kind(value)}, not a time")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _stored_payload(value: Any) -> str:
    if type(value) is str:
        text = value
    elif type(value) is bytes:
        text = unpack_payload(value)
    else:
        raise ValueError(f"payload is {_kind(value)}")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("payload is JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"payload is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("payload is JSON but not an object")
    if len(text) > p.MAX_MESSAGE_BYTES or len(text.encode("utf-8")) > p.MAX_MESSAGE_BYTES:
        raise ValueError("payload is over the protocol's size limit")
    return text


def wire_size_ok(type_: str, msg_id: str, ts: str, size: int,
                 limit: int = p.MAX_MESSAGE_BYTES) -> bool:
    """True when the envelope of a ``size``-byte payload certainly fits ``limit``, without
    building it: 39 bytes of keys and punctuation, and at most 2 + 6 bytes per character
    for each JSON string (``\\uXXXX``). False means "build it and see" (near the limit)."""
    return 45 + 6 * (len(type_) + len(msg_id) + len(ts)) + size <= limit


@dataclass(frozen=True)
class Record:
    """One stored message; ``payload`` is its JSON text, exactly as it will be sent."""

    seq: int
    id: str
    type: str
    ts: str
    payload: str

    def envelope_text(self) -> str:
        """The wire text, built without re-encoding the payload."""
        return p.envelope_text(self.type, self.id, self.ts, self.payload)




# --------------------------------------------------------------------------- the codec


class MessageCodec:
    """Messages (samples, command results) to rows and back; see the module docstring."""

    def encode(self, type_: str, payload: Mapping[str, Any], ts: str,
               now: Optional[float] = None) -> Row:
        """The row of a message created at ``now`` (default: now); LocalProtocolError when
        its wire text is over the protocol's size limit (exactly, in :meth:`record`)."""
        text = p.dumps(payload)
        data = text.encode("utf-8")
        size = len(data)
        # Near the limit (rare), :meth:`record` checks exactly, once the id is known.
        near = not wire_size_ok(type_, "0" * ID_MAX_CHARS, ts, size)
        ts_value = pack_ts(ts)
        created = time.time() if now is None else now
        created_value = None if isinstance(ts_value, int) and \
            abs(created * 1000 - ts_value) < 1 else created  # NULL: the ts says it
        return Row(TYPE_CODES.get(type_, type_), ts_value, pack_payload(data) or text, size,
                   created_value, (type_, ts, text, near))

    @staticmethod
    def record(seq: int, msg_id: str, row: Row) -> Record:
        """The record of a row about to be stored (no decoding: the row carries its text).
        LocalProtocolError when its wire text is over the protocol's limit: the queue
        stores nothing then (the server could never take it, and it would block the
        queue)."""
        type_, ts, text, near = row.plain
        if near:
            p.envelope_text(type_, msg_id, ts, text)  # exact; raises over the limit
        return Record(seq, msg_id, type_, ts, text)

    @staticmethod
    def decode(seq: int, msg_id: str, type_: Any, ts: Any, payload: Any
               ) -> Union[Record, Unreadable]:
        """Stored cells as a Record, or Unreadable with the reason: never an exception, so
        one row can never stop the send loop."""
        try:
            return Record(seq, msg_id, _stored_type(type_), _stored_ts(ts),
                          _stored_payload(payload))
        except ValueError as exc:
            return Unreadable(f"unreadable row: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever a damaged cell makes a decoder raise
            return Unreadable(f"unreadable row: {type(exc).__name__}: {exc}")

    @staticmethod
    def describe(type_: Any, ts: Any, payload: Any) -> Tuple[Any, Any, Any]:
        """(type, ts, payload) as text for the set_aside table, or as stored when they
        cannot be read (kept for inspection)."""
        try:
            return unpack_type(type_), unpack_ts(ts), unpack_payload(payload)
        except Exception:  # noqa: BLE001 - a damaged row: kept as stored (never NULL: the
            # set_aside table's columns are NOT NULL)
            return str(type_), str(ts), b"" if payload is None else payload

    @staticmethod
    def created(created: Any, ts: Any) -> Optional[float]:
        """A row's creation time from its cells: created is NULL when the ts, stored as
        milliseconds, is that time. None when neither gives one (a damaged cell)."""
        try:
            if created is not None:
                return float(created)
            return ts / 1000 if isinstance(ts, int) else None
        except (TypeError, ValueError, OverflowError):
            return None


CODEC = MessageCodec()

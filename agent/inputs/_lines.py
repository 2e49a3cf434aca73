"""One line of an application's data -> one :class:`~agent.inputs.Sample`, or a reason.

Sans I/O: text and ``now`` in, a Sample out or :class:`LineError` naming the field.
The socket input, the script inputs and ``nexus-agent send`` all read lines here, so
the three can never disagree about what a line means. Two forms, told apart by the
first character (``{`` is JSON):

* JSON: ``{"source": "line3", "metrics": {"count": 12, "temp_c": 41.5},
  "tags": {"shift": "b"}, "timestamp": "2026-12-02T10:00:00.000Z"}``. ``source``
  and ``metrics`` (at least one finite number; a boolean is not one) are
  required; ``tags`` (strings to strings) and ``timestamp`` (ISO-8601 with a
  zone) are optional; any other key is refused, so a typo is never dropped
  silently.
* InfluxDB line protocol: ``line3,shift=b count=12i,temp_c=41.5 1764669600000000000``:
  the measurement is the source, the tags are tags, the fields are metrics
  (``12i``/``12u`` integers, floats; strings and booleans refused), and the
  optional timestamp is in nanoseconds. Backslash escapes as InfluxDB's
  (``\\,``, ``\\ ``, ``\\=``).

Limits (the trust boundary: the socket is open to a group of local programs): a
source name is 1-128 characters ``[A-Za-z0-9._:/-]`` starting with a letter or
digit, and ``system`` is the agent's own; a metric or tag key 1-128 characters
without control characters, a tag value at most 256; at most 256 metrics
(``protocol.MAX_METRICS``) and 32 tags; a time between 1970 and 9999.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as p
from . import Sample

RESERVED_SOURCE = "system"  # the system input's samples carry no source on the wire
SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MAX_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
MAX_TAGS = 32
MAX_TIME_S = 253402300799.0  # 9999-12-31T23:59:59Z
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INT = re.compile(r"^[+-]?[0-9]+$")
JSON_KEYS = ("source", "metrics", "tags", "timestamp")


class LineError(ValueError):
    """A line that is not a sample; ``field`` names what is wrong (``metrics.count``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse(text: str, now: float) -> Sample:
    """The sample of one line (without its newline), time-stamped ``now`` when the line
    has no time of its own; LineError otherwise."""
    text = text.strip()
    if not text:
        raise LineError("line", "is empty")
    if text[0] == "{":
        return _parse_json(text, now)
    return _parse_influx(text, now)


# --------------------------------------------------------------------------- checks


def check_source(value: Any, field: str = "source") -> str:
    if not isinstance(value, str):
        raise LineError(field, "must be a string")
    if not SOURCE.match(value):
        raise LineError(field, "must be 1 to 128 letters, digits or . _ : / - "
                        "(starting with a letter or digit)")
    if value == RESERVED_SOURCE:
        raise LineError(field, f"{RESERVED_SOURCE!r} is the agent's own samples' source")
    return value


def _key(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_CHARS or \
            _CONTROL.search(value):
        raise LineError(field, f"a key must be 1 to {MAX_KEY_CHARS} characters without "
                        "control characters")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError(field, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise LineError(field, "must be a finite number")
    if isinstance(value, int) and abs(value) >= 2 ** 63:
        raise LineError(field, "is out of range (a 64-bit integer)")
    return value


def check_metrics(raw: Any, field: str = "metrics") -> Dict[str, float]:
    if not isinstance(raw, dict):
        raise LineError(field, "must be an object of numbers")
    if not raw:
        raise LineError(field, "must hold at least one number")
    if len(raw) > p.MAX_METRICS:
        raise LineError(field, f"more than {p.MAX_METRICS} metrics")
    return {_key(k, f"{field}.{k}"[:200]): _number(v, f"{field}.{k}") for k, v in raw.items()}


def check_tags(raw: Any, field: str = "tags") -> Dict[str, str]:
    if not isinstance(raw, dict):
        raise LineError(field, "must be an object of strings")
    if len(raw) > MAX_TAGS:
        raise LineError(field, f"more than {MAX_TAGS} tags")
    tags: Dict[str, str] = {}
    for key, value in raw.items():
        _key(key, f"{field}.{key}"[:200])
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE_CHARS or \
                _CONTROL.search(value):
            raise LineError(f"{field}.{key}", f"must be a string of at most "
                            f"{MAX_TAG_VALUE_CHARS} characters without control characters")
        tags[key] = value
    return tags


def _time(seconds: float, field: str) -> float:
    if not 0 < seconds < MAX_TIME_S:
        raise LineError(field, "is not a time between 1970 and 9999")
    return seconds


# --------------------------------------------------------------------------- JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_json(text: str, now: float) -> Sample:
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise LineError("line", "JSON nested too deeply") from None
    except ValueError as exc:
        raise LineError("line", f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LineError("line", "JSON but not an object")
    for key in obj:
        if key not in JSON_KEYS:
            raise LineError(str(key)[:128], f"unknown key (keys: {', '.join(JSON_KEYS)})")
    if "source" not in obj:
        raise LineError("source", "is required")
    if "metrics" not in obj:
        raise LineError("metrics", "is required")
    source = check_source(obj["source"])
    metrics = check_metrics(obj["metrics"])
    tags = check_tags(obj["tags"]) if obj.get("tags") is not None else {}
    when = now
    if obj.get("timestamp") is not None:
        try:
            when = p.parse_timestamp(obj["timestamp"])
        except (ValueError, TypeError, OverflowError):
            raise LineError("timestamp", "must be ISO-8601 with a zone "
                            "(2026-12-02T10:00:00.000Z)") from None
        _time(when, "timestamp")
    return Sample(source, when, metrics, tags)


# --------------------------------------------------------------------------- line protocol


def _split(text: str, seps: str) -> List[str]:
    """``text`` split at unescaped characters of ``seps`` (outside double quotes); the
    escapes are kept (removed by :func:`_unescape`). ``seps`` is one character."""
    if "\\" not in text and '"' not in text:  # the usual line: no escapes, no quotes
        return text.split(seps)
    parts: List[str] = []
    start, i, quoted = 0, 0, False
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c in seps and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([,= \\])", r"\1", text) if "\\" in text else text


def _pair(text: str, field: str) -> Tuple[str, str]:
    parts = _split(text, "=")
    if len(parts) != 2 or not parts[0]:
        raise LineError(field, f"{text[:64]!r} is not key=value")
    return _unescape(parts[0]), parts[1]


def _field_value(raw: str, field: str) -> float:
    if not raw:
        raise LineError(field, "has no value")
    if raw[0] == '"':
        raise LineError(field, "is a string field; only numbers are metrics (send text as "
                        "a tag)")
    if raw in ("t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"):
        raise LineError(field, "is a boolean; only numbers are metrics")
    if raw[-1] in "iu" and _INT.match(raw[:-1]):
        return _number(int(raw[:-1]), field)
    try:
        value = float(raw)
    except ValueError:
        raise LineError(field, f"{raw[:64]!r} is not a number") from None
    return _number(value, field)


def _parse_influx(text: str, now: float) -> Sample:
    sections = [s for s in _split(text, " ") if s != ""]
    if len(sections) < 2:
        raise LineError("fields", "missing: a line is 'source[,tag=value...] "
                        "metric=number[,...] [timestamp_ns]' or a JSON object")
    if len(sections) > 3:
        raise LineError("line", "more than measurement, fields and timestamp (escape "
                        "spaces as '\\ ')")
    head = _split(sections[0], ",")
    source = check_source(_unescape(head[0]), "measurement")
    tags: Dict[str, str] = {}
    for item in head[1:]:
        key, value = _pair(item, "tags")
        tags[key] = _unescape(value)
    tags = check_tags(tags)
    metrics: Dict[str, Any] = {}
    for item in _split(sections[1], ","):
        key, raw = _pair(item, "fields")
        metrics[key] = _field_value(raw, f"metrics.{key}"[:200])
    metrics = check_metrics(metrics)
    when: Optional[float] = None
    if len(sections) == 3:
        if not _INT.match(sections[2]):
            raise LineError("timestamp", "must be an integer of nanoseconds since the epoch")
        when = _time(int(sections[2]) / 1e9, "timestamp")
    return Sample(source, now if when is None else when, metrics, tags)


def to_json(sample: Sample) -> str:
    """The JSON line of a sample (``nexus-agent send``), which :func:`parse` reads back."""
    obj: Dict[str, Any] = {"source": sample.source, "metrics": dict(sample.metrics)}
    if sample.tags:
        obj["tags"] = dict(sample.tags)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)

"""Modbus without I/O: the ``inputs.modbus`` section, request planning, value decoding,
and each device's health (what to log, what ``status`` shows).

Rules:

* No sockets, threads, clocks or pymodbus here (the caller passes ``now``): the
  config check, ``nexus-agent modbus read`` and the bench use this module without the
  extra installed. The only pymodbus code is ``modbus_client.py``.
* A device is read in requests planned once from its points (:func:`plan`): the points
  of one table sorted by address, merged while the gap between two is at most
  ``GAP_REGISTERS`` registers or ``GAP_BITS`` bits and the request stays within the
  device's maximum (125 registers, 2,000 bits by default: the protocol's limits).
  A point that made a merged request fail with an exception response is read on its
  own from then on (``isolated``), so the exception names it and the others are read.
* Registers are big-endian within a word (the standard); ``word_order`` says which
  word of a multi-word value comes first. A value is ``raw * scale + offset``; a bool
  is 0 or 1. A value that is not a finite number (a float register holding NaN) is a
  point error, never sent: the wire's JSON has no NaN.
* :class:`DeviceHealth` turns each poll's outcome into counters and, only when the
  device's condition changes, one line to log (never one per poll).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

TABLES = ("coil", "discrete", "holding", "input")
BIT_TABLES = frozenset(("coil", "discrete"))
# type -> (registers, struct code); bool is one bit of a coil or discrete input
TYPES: Dict[str, Tuple[int, str]] = {
    "bool": (0, "?"), "int16": (1, "h"), "uint16": (1, "H"), "int32": (2, "i"),
    "uint32": (2, "I"), "int64": (4, "q"), "uint64": (4, "Q"), "float32": (2, "f"),
    "float64": (4, "d")}
MAX_REGISTERS = 125  # per read request, by the protocol (function codes 3 and 4)
MAX_BITS = 2000  # function codes 1 and 2
GAP_REGISTERS = 8  # read up to this many unused registers rather than send another request
GAP_BITS = 64
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
PARITIES = ("N", "E", "O")
EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
              4: "device failure", 5: "acknowledge", 6: "device busy",
              10: "gateway path unavailable", 11: "gateway target failed to respond"}


@dataclass(frozen=True)
class Endpoint:
    """Where a device is: a TCP host and port, or a serial device with its line settings."""

    kind: str  # "tcp" or "rtu"
    host: str = ""
    port: int = 502
    device: str = ""  # the serial device's path
    baudrate: int = 0
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def label(self) -> str:
        """The port it uses: one conversation at a time per label."""
        return f"tcp://{self.host}:{self.port}" if self.kind == "tcp" else f"rtu://{self.device}"


@dataclass(frozen=True)
class Point:
    name: str
    table: str
    address: int
    type: str
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def size(self) -> int:
        """Registers it takes, or 1 (bit) for a bool."""
        return TYPES[self.type][0] or 1

    @property
    def end(self) -> int:
        return self.address + self.size - 1


@dataclass(frozen=True)
class Device:
    name: str
    url: str
    endpoint: Endpoint
    unit: int
    interval_s: float
    timeout_s: float
    points: Tuple[Point, ...]
    max_registers: int = MAX_REGISTERS
    max_bits: int = MAX_BITS


# --------------------------------------------------------------------------- the section


def _number(raw: Mapping[str, Any], key: str, path: str, low: float, high: float,
            default: Optional[float] = None, integer: bool = False) -> Any:
    if key not in raw:
        if default is None:
            raise ConfigError(f"{path}.{key}", "is required")
        return default
    value = raw[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{path}.{key}", f"must be {'an integer' if integer else 'a number'}"
                          f", not {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigError(f"{path}.{key}", f"must be between {low:g} and {high:g}, not "
                          f"{value:g}")
    return value if integer else float(value)


def _name(raw: Mapping[str, Any], path: str) -> str:
    value = raw.get("name")
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(f"{path}.name", "is required: 1 to 64 letters, digits or . _ : - "
                          "(starting with a letter or digit)")
    return value


def _keys(raw: Any, path: str, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a mapping")
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}.{key}", f"unknown key (known keys: {', '.join(known)})")
    return raw


def parse_url(value: Any, key: str) -> Endpoint:
    """``tcp://host[:port]`` or ``rtu:///dev/ttyX?baudrate=9600[&parity=N&stopbits=1&bytesize=8]``."""
    if not isinstance(value, str):
        raise ConfigError(key, "is required: tcp://host:port or rtu:///dev/tty...?baudrate=N")
    parts = urlsplit(value)
    if parts.scheme == "tcp":
        try:
            port = parts.port or 502
        except ValueError:
            raise ConfigError(key, "has a port that is not a number from 1 to 65535") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or \
                parts.fragment or parts.username:
            raise ConfigError(key, f"must be tcp://host:port, not {value!r}")
        return Endpoint("tcp", host=parts.hostname, port=port)
    if parts.scheme == "rtu":
        if parts.netloc or not parts.path.startswith("/") or parts.fragment:
            raise ConfigError(key, "must be rtu:///dev/<serial device>?baudrate=N (three "
                              f"slashes: no host), not {value!r}")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"baudrate", "parity", "stopbits", "bytesize"}
        if unknown:
            raise ConfigError(key, f"unknown option {sorted(unknown)[0]!r} (options: "
                              "baudrate, parity, stopbits, bytesize)")
        line = {"baudrate": options.get("baudrate", ""), "stopbits": options.get("stopbits",
                "1"), "bytesize": options.get("bytesize", "8")}
        if not all(text.isdigit() for text in line.values()):
            raise ConfigError(key, "needs baudrate=<number> (and numeric stopbits, bytesize)")
        numbers = {name: int(text) for name, text in line.items()}
        parity = options.get("parity", "N").upper()
        if not 50 <= numbers["baudrate"] <= 4_000_000 or numbers["stopbits"] not in (1, 2) \
                or numbers["bytesize"] not in (7, 8) or parity not in PARITIES:
            raise ConfigError(key, "has a line setting out of range (baudrate 50-4000000, "
                              "parity N/E/O, stopbits 1/2, bytesize 7/8)")
        return Endpoint("rtu", device=parts.path, baudrate=numbers["baudrate"],
                        parity=parity, stopbits=numbers["stopbits"],
                        bytesize=numbers["bytesize"])
    raise ConfigError(key, f"must be a tcp:// or rtu:// URL, not {value!r}")


def _point(raw: Any, path: str) -> Point:
    raw = _keys(raw, path, ("name", "table", "address", "type", "word_order", "scale",
                            "offset"))
    name = _name(raw, path)
    table, type_ = raw.get("table"), raw.get("type")
    if table not in TABLES:
        raise ConfigError(f"{path}.table", f"must be one of {', '.join(TABLES)}, not {table!r}")
    if type_ not in TYPES:
        raise ConfigError(f"{path}.type", f"must be one of {', '.join(TYPES)}, not {type_!r}")
    if (table in BIT_TABLES) != (type_ == "bool"):
        raise ConfigError(f"{path}.type", f"{type_} does not fit table {table}: coil and "
                          "discrete hold bool points only, and bool is only in those")
    address = _number(raw, "address", path, 0, 65535, integer=True)
    point = Point(name, table, address, type_)
    if point.end > 65535:
        raise ConfigError(f"{path}.address", f"a {type_} at {address} ends at register "
                          f"{point.end}, beyond 65535")
    word_order = raw.get("word_order", "big")
    if word_order not in ("big", "little"):
        raise ConfigError(f"{path}.word_order", f"must be big or little, not {word_order!r}")
    for key in ("word_order",) if point.size < 2 else ():
        if key in raw:
            raise ConfigError(f"{path}.{key}", f"only applies to a type of two or four "
                              f"registers, not {type_}")
    for key in ("scale", "offset") if type_ == "bool" else ():
        if key in raw:
            raise ConfigError(f"{path}.{key}", "does not apply to a bool (sent as 0 or 1)")
    scale = _number(raw, "scale", path, -1e12, 1e12, default=1.0)
    offset = _number(raw, "offset", path, -1e12, 1e12, default=0.0)
    return Point(name, table, address, type_, word_order, scale, offset)


DEVICE_KEYS = ("name", "url", "unit", "interval_s", "timeout_s", "points",
               "max_registers_per_request", "max_bits_per_request")


def _device(raw: Any, path: str) -> Device:
    raw = _keys(raw, path, DEVICE_KEYS)
    name = _name(raw, path)
    if name == "system":  # the sample's source on the wire; "system" means no source
        raise ConfigError(f"{path}.name", "'system' is the agent's own samples' source")
    endpoint = parse_url(raw.get("url"), f"{path}.url")
    unit = _number(raw, "unit", path, 0, 255, integer=True)
    points_raw = raw.get("points")
    if not isinstance(points_raw, list) or not points_raw:
        raise ConfigError(f"{path}.points", "is required: a list of at least one point")
    points = tuple(_point(p, f"{path}.points[{i}]") for i, p in enumerate(points_raw))
    _no_overlaps(points, f"{path}.points")
    return Device(
        name, raw["url"], endpoint, unit,
        interval_s=_number(raw, "interval_s", path, 0.05, 86400, default=5.0),
        timeout_s=_number(raw, "timeout_s", path, 0.01, 60, default=1.0),
        points=points,
        max_registers=_number(raw, "max_registers_per_request", path, 4, MAX_REGISTERS,
                              default=MAX_REGISTERS, integer=True),
        max_bits=_number(raw, "max_bits_per_request", path, 1, MAX_BITS, default=MAX_BITS,
                         integer=True))


def _no_overlaps(points: Sequence[Point], path: str) -> None:
    seen: Dict[str, int] = {}
    for i, point in enumerate(points):
        if point.name in seen:
            raise ConfigError(f"{path}[{i}].name", f"{point.name!r} is also {path}"
                              f"[{seen[point.name]}]: a device's point names are its metrics")
        seen[point.name] = i
    last: Dict[str, int] = {}  # table -> the index of the point that ends last so far
    for i in sorted(range(len(points)), key=lambda j: (points[j].table, points[j].address)):
        point, prev = points[i], last.get(points[i].table)
        if prev is not None and point.address <= points[prev].end:
            first, second = sorted((prev, i))
            raise ConfigError(f"{path}[{second}].address", f"{points[second].name} overlaps "
                              f"{points[first].name} ({path}[{first}]) in table {point.table}")
        if prev is None or point.end > points[prev].end:
            last[point.table] = i


def check(raw: Any, key: str = "inputs.modbus") -> Tuple[Device, ...]:
    """The checked ``inputs.modbus`` section: a list of devices."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, "must be a list of devices")
    devices = tuple(_device(d, f"{key}[{i}]") for i, d in enumerate(raw))
    names: Dict[str, int] = {}
    lines: Dict[str, Tuple[int, Endpoint]] = {}
    for i, device in enumerate(devices):
        if device.name in names:
            raise ConfigError(f"{key}[{i}].name", f"{device.name!r} is also "
                              f"{key}[{names[device.name]}]")
        names[device.name] = i
        other = lines.setdefault(device.endpoint.label, (i, device.endpoint))
        if other[1] != device.endpoint:
            raise ConfigError(f"{key}[{i}].url", f"{device.endpoint.device} is also "
                              f"{key}[{other[0]}].url with other line settings: one bus has "
                              "one speed")
    return devices


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Request:
    """One read: ``count`` registers or bits of ``table`` from ``address``."""

    table: str
    address: int
    count: int
    points: Tuple[Point, ...]


def plan(device: Device, isolated: FrozenSet[str] = frozenset()) -> Tuple[Request, ...]:
    """The requests that read every point of ``device``, merged (module docstring)."""
    requests: List[Request] = []
    for table in TABLES:
        bits = table in BIT_TABLES
        limit = device.max_bits if bits else device.max_registers
        gap = GAP_BITS if bits else GAP_REGISTERS
        group: List[Point] = []
        for point in sorted((p for p in device.points if p.table == table),
                            key=lambda p: p.address):
            if group and (point.name in isolated or group[0].name in isolated
                          or point.address - group[-1].end - 1 > gap
                          or point.end - group[0].address + 1 > limit):
                requests.append(_request(group))
                group = []
            group.append(point)
        if group:
            requests.append(_request(group))
    return tuple(requests)


def _request(points: Sequence[Point]) -> Request:
    start = points[0].address
    return Request(points[0].table, start, max(p.end for p in points) - start + 1,
                   tuple(points))


# --------------------------------------------------------------------------- decoding


class PointError(ValueError):
    """A point that could not be read: ``kind`` (timeout, connection, exception, value,
    error) and what a person needs to know."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def decode(point: Point, data: Sequence[int]) -> float:
    """The value of ``point`` from its own registers (or its one bit)."""
    if point.type == "bool":
        return 1 if data[0] else 0
    if point.size == 1:  # the common case without struct: about 3 times faster
        raw: Any = data[0] & 0xFFFF
        if point.type == "int16" and raw & 0x8000:
            raw -= 0x10000
        return raw if point.scale == 1.0 and point.offset == 0.0 else \
            raw * point.scale + point.offset
    words = list(data[:point.size])
    if point.word_order == "little":
        words.reverse()
    raw = struct.unpack(">" + TYPES[point.type][1],
                        b"".join((w & 0xFFFF).to_bytes(2, "big") for w in words))[0]
    plain = point.scale == 1.0 and point.offset == 0.0  # an integer stays exact
    value = raw if plain else raw * point.scale + point.offset
    if isinstance(value, float) and not math.isfinite(value):
        raise PointError("value", f"not a finite number ({value})")
    return value


def encode(type_: str, value: float, word_order: str = "big") -> List[int]:
    """The registers that hold ``value`` (the inverse of :func:`decode`; for test peers)."""
    if type_ == "bool":
        return [1 if value else 0]
    code = TYPES[type_][1]
    data = struct.pack(">" + code, value if code in "fd" else int(value))
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if word_order == "little" else words


def values(request: Request, data: Sequence[int]) -> Dict[str, Any]:
    """Each point of ``request`` -> its value, or the PointError that stands for it."""
    out: Dict[str, Any] = {}
    for point in request.points:
        start = point.address - request.address
        try:
            out[point.name] = decode(point, data[start:start + point.size])
        except PointError as exc:
            out[point.name] = exc
    return out


Read = Callable[[str, int, int, int], List[int]]  # (table, address, count, unit) -> data


def poll(device: Device, read: Read, isolated: FrozenSet[str] = frozenset(),
         requests: Optional[Sequence[Request]] = None
         ) -> Tuple[Dict[str, Any], List[str], FrozenSet[str]]:
    """Read every point of ``device`` once through ``read`` (which raises PointError), in
    ``requests`` (``plan(device, isolated)`` unless the caller kept it).

    Returns point -> value or PointError (in the config's order), the kind of each failed
    request, and the points to read on their own from now on. A merged request answered
    with an exception is read again point by point at once, so the exception names its
    point and the others are read. A device that does not answer at all (timeout,
    connection) is not asked the rest of this poll: they would only wait as long again.
    """
    result: Dict[str, Any] = {}
    kinds: List[str] = []
    pending = list(plan(device, isolated) if requests is None else requests)
    while pending:
        request = pending.pop(0)
        try:
            data = read(request.table, request.address, request.count, device.unit)
        except PointError as exc:
            kinds.append(exc.kind)
            if exc.kind == "exception" and len(request.points) > 1:
                isolated = isolated | {p.name for p in request.points}
                pending[:0] = [_request([p]) for p in request.points]
                continue
            failed = request.points if exc.kind == "exception" else \
                request.points + tuple(p for r in pending for p in r.points)
            result.update((p.name, exc) for p in failed)
            if exc.kind != "exception":
                break
            continue
        result.update(values(request, data))
    return {p.name: result[p.name] for p in device.points}, kinds, isolated


# --------------------------------------------------------------------------- health


@dataclass
class DeviceHealth:
    """What ``status`` shows for one device; changed by its port's thread only."""

    name: str
    url: str
    unit: int
    polls: int = 0
    last_good: Optional[float] = None  # wall clock of the last poll that read every point
    last_read: Optional[float] = None  # ... that read at least one
    errors: Dict[str, int] = field(default_factory=dict)  # kind -> requests that failed
    failing: Dict[str, str] = field(default_factory=dict)  # point -> why, as of the last poll
    condition: str = "not read yet"

    def record(self, result: Mapping[str, Any], error_kinds: Sequence[str],
               now: float) -> Optional[str]:
        """Count one poll (point -> value or PointError, and the kind of each failed
        request); a line to log if the device's condition changed, else None."""
        self.polls += 1
        for kind in error_kinds:
            self.errors[kind] = self.errors.get(kind, 0) + 1
        errors = {name: v for name, v in result.items() if isinstance(v, PointError)}
        self.failing = {name: str(v) for name, v in errors.items()}
        read = len(result) - len(errors)
        if read:
            self.last_read = now
        if not errors:
            self.last_good = now
            condition = "reading"
        elif not read:
            condition = "not read: " + _reasons(_label(v) for v in errors.values())
        else:
            condition = "points failing: " + ", ".join(
                f"{name} ({_label(v)})" for name, v in sorted(errors.items()))
        if condition == self.condition:  # the kinds, not the details: those vary by poll
            return None
        before, self.condition = self.condition, condition
        if condition == "reading" and before == "not read yet":
            return None  # a device that works from the start is not news
        detail = f" ({next(iter(errors.values())).detail})" if errors and not read else ""
        return f"modbus device {self.name} ({self.url}, unit {self.unit}): {condition}{detail}"

    def report(self) -> Dict[str, Any]:
        return {"url": self.url, "unit": self.unit, "polls": self.polls,
                "last_good": self.last_good, "last_read": self.last_read,
                "errors": dict(self.errors), "failing": dict(self.failing),
                "condition": self.condition}


def _label(error: PointError) -> str:
    """What a point's failure is, without what varies from poll to poll (a timeout's or a
    refused connection's wording): an exception and a bad value keep their detail."""
    return error.kind if error.kind in ("timeout", "connection", "error") else str(error)


def _reasons(whys: Any) -> str:
    distinct = sorted(set(whys))
    return distinct[0] if len(distinct) == 1 else "; ".join(distinct)


def exception_name(code: int) -> str:
    return f"exception {code} ({EXCEPTIONS.get(code, 'unknown')})"

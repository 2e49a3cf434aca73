"""``nexus-agent modbus read [--config PATH] [NAME]``: read the configured Modbus points
once and print each value or error, for commissioning the wiring.

Every device of ``inputs.modbus`` (or only NAME) is read the way the daemon reads it
(the same merged requests, word orders, scale and offset), one device after another.
A serial port the running daemon holds may answer garbled or not at all: stop the
daemon while commissioning an RTU bus. Exit status: 0 every point read, 1 some point
not read, 2 no such device, 78 a bad config or pymodbus missing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List

from . import cli, modbus

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: List[str]) -> int:
    ap = cli.parser("nexus-agent modbus read", __doc__)
    ap.add_argument("name", nargs="?", help="only this device (its name in inputs.modbus)")
    args = ap.parse_args(argv)
    cfg = cli.load_config(args.config)
    if cfg is None:
        return cli.EXIT_CONFIG
    devices = cfg.inputs.get("inputs.modbus", ())
    if not devices:
        print(f"nexus-agent: {args.config} has no inputs.modbus devices", file=sys.stderr)
        return cli.EXIT_CONFIG
    if args.name is not None:
        devices = tuple(d for d in devices if d.name == args.name)
        if not devices:
            names = ", ".join(d.name for d in cfg.inputs["inputs.modbus"])
            print(f"nexus-agent: no Modbus device {args.name!r} (devices: {names})",
                  file=sys.stderr)
            return EXIT_USAGE
    try:
        from .modbus_client import Port
    except ImportError:
        print("nexus-agent: config error: inputs.modbus: needs pymodbus, the modbus extra "
              "(docs/deploy.md)", file=sys.stderr)
        return cli.EXIT_CONFIG
    ports: Dict[str, Any] = {}
    for device in devices:  # like the daemon: one port per bus, its longest timeout
        label = device.endpoint.label
        timeout = max(device.timeout_s, ports[label].timeout_s if label in ports else 0.0)
        ports[label] = Port(device.endpoint, timeout)
    failed = False
    try:
        for device in devices:
            failed |= not read_one(device, ports[device.endpoint.label])
    finally:
        for port in ports.values():
            port.close()
    return EXIT_FAILED if failed else EXIT_OK


def read_one(device: modbus.Device, port: Any) -> bool:
    """Print one device's points; True if every one was read."""
    count = len(modbus.plan(device))
    began = time.monotonic()
    result, kinds, _ = modbus.poll(device, port.read)
    took = (time.monotonic() - began) * 1000
    failures = f" ({len(kinds)} failed: {', '.join(sorted(set(kinds)))})" if kinds else ""
    print(f"{device.name} ({device.url}, unit {device.unit}): {len(device.points)} points, "
          f"{count} requests planned{failures}, {took:.0f} ms")
    width = max(len(p.name) for p in device.points)
    for point in device.points:
        value = result[point.name]
        where = f"{point.table} {point.address} {point.type}"
        if isinstance(value, modbus.PointError):
            print(f"  {point.name:<{width}}  NOT READ  {value}  [{where}]")
        else:
            print(f"  {point.name:<{width}}  = {value!r}  [{where}]")
    return not any(isinstance(v, modbus.PointError) for v in result.values())

"""``nexus-ctl``: the operator's command line.

    nexus-ctl [--url URL] watch [--device ID] [--count N]
    nexus-ctl [--url URL] command DEVICE NAME [key=value ...] [--wait S] [--ttl S]

The operator token comes from ``--token-file``, else ``$NEXUS_TOKEN``; for a
local companion server, with ``$NEXUS_JWT_SECRET`` set and no token, a
short-lived operator token is minted on the spot.

Exit codes of ``command`` (for provisioning scripts): 0 succeeded; 1 failed
(the command ran and exited non-zero); 3 rejected by the device; 4 timed out
on the device; 5 refused by the server (token refused, device offline,
forbidden); 6 no result within ``--wait`` or no connection; 2 bad usage,
including a missing, unreadable or group-readable operator token file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from . import protocol as p
from .auth import read_token
from .errors import AuthError

EXIT = {"succeeded": 0, "failed": 1, "usage": 2, "rejected": 3, "timed_out": 4,
        "server_error": 5, "no_result": 6}
DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"


def operator_token(token_file: Optional[str]) -> str:
    if token_file or os.environ.get("NEXUS_TOKEN"):
        return read_token(token_file)
    if os.environ.get("NEXUS_JWT_SECRET"):
        from .server.tokens import load_secret_keys

        return load_secret_keys(None).mint("nexus-ctl", "operator", 3600)
    raise AuthError("no operator token: pass --token-file, or set NEXUS_TOKEN "
                    "(or NEXUS_JWT_SECRET for a local companion server)")


def connect(url: str, token: str, timeout: float = 10.0) -> Any:
    """An open, welcomed connection (websocket-client); AuthRefused if the token is not."""
    from .transport import open_welcomed

    return open_welcomed(url, token, timeout=timeout)


def format_update(payload: Dict[str, Any]) -> str:
    """One readable line for a telemetry.update: an application's sample (it has a
    ``source``) with all its metrics and tags, the device's own with the main figures."""
    m = payload.get("metrics", {})
    parts = [payload.get("sample_time", "?"), str(payload.get("device_id", "?"))]
    if "source" in payload:
        parts.append(f"source={payload['source']}")
        parts += [f"{key}={value}" for key, value in m.items()]
        tags = payload.get("tags") or {}
        if tags:
            parts.append("tags: " + " ".join(f"{k}={v}" for k, v in tags.items()))
        return "  ".join(parts)
    for key, label, unit in (("cpu_usage", "cpu", "%"), ("memory_usage", "mem", "%"),
                             ("cpu_temp_c", "temp", "C"), ("load_1m", "load", ""),
                             ("agent_queue_depth", "queued", ""), ("agent_dropped", "dropped", "")):
        if key in m:
            value = m[key]
            parts.append(f"{label}={value:.1f}{unit}" if isinstance(value, float)
                         else f"{label}={value}{unit}")
    return "  ".join(parts)


def watch(ws: Any, device: Optional[str], count: Optional[int], out: TextIO,
          as_json: bool = False, say_closed: bool = True) -> int:
    """Print telemetry updates until ``count`` or the connection ends (said on stderr
    unless ``say_closed`` is False: ``make run`` stops its own server under it)."""
    filters = {"device_id": device} if device else {}
    ws.send(p.encode(p.make("subscribe", time.time(), {"channel": "telemetry",
                                                       "filters": filters})))
    seen = 0
    ws.settimeout(None)
    while count is None or seen < count:
        try:
            text = ws.recv()
        except Exception:  # noqa: BLE001 - websocket-client's closed/broken connection errors
            text = ""
        if not text:
            if say_closed:
                print("nexus-ctl: the server closed the connection", file=sys.stderr)
            return 0 if count is None else EXIT["no_result"]
        env = p.decode(text)
        if env.type == "telemetry.update" and env.payload is not None:
            try:
                print(json.dumps(env.payload) if as_json else format_update(dict(env.payload)),
                      file=out, flush=True)
            except BrokenPipeError:  # `nexus-ctl watch | head`: the reader is done
                if out is sys.stdout:
                    _quiet_stdout()
                return 0
            seen += 1
        elif env.type == "error":
            print(f"nexus-ctl: server error: {p.parse_error(env)}", file=sys.stderr)
            return EXIT["server_error"]
    return 0


def command(ws: Any, device: str, name: str, pairs: List[str], wait_s: float,
            ttl_s: Optional[float], out: TextIO) -> int:
    args: Dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            print(f"nexus-ctl: argument {pair!r} is not key=value", file=sys.stderr)
            return EXIT["usage"]
        args[key] = value
    request = p.make("command", time.time(), p.command_payload(device, name, args, ttl_s),
                     p.new_id("cmd"))
    ws.send(p.encode(request))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            env = p.decode(ws.recv())
        except Exception:  # noqa: BLE001 - a timeout of websocket-client's own type
            break
        if env.id != request.id:
            continue
        if env.type == "error":
            error = p.parse_error(env)
            print(f"nexus-ctl: {error.code}: {error.message}", file=sys.stderr)
            if error.code == p.DEVICE_OFFLINE and ttl_s is None and \
                    "takes no commands" not in error.message:
                print("nexus-ctl: --ttl SECONDS keeps the command for the device until it "
                      "connects", file=sys.stderr)
            return EXIT["server_error"]
        if env.type == "command.result":
            result = p.parse_command_result(env)
            out.write(result.stdout)
            sys.stderr.write(result.stderr)
            if result.stderr and not result.stderr.endswith("\n"):
                sys.stderr.write("\n")  # a rejection's reason has none: the status line is apart
            print(f"nexus-ctl: {describe_result(result)}", file=sys.stderr)
            return EXIT[result.status]
    print(f"nexus-ctl: no result within {wait_s:g} s", file=sys.stderr)
    return EXIT["no_result"]


def describe_result(result: p.CommandResult) -> str:
    """``succeeded (exit code 0, 12 ms)``; a command that never ran has no exit code."""
    if result.exit_code is None:
        return f"{result.status} ({result.duration_ms} ms)"
    return f"{result.status} (exit code {result.exit_code}, {result.duration_ms} ms)"


def _quiet_stdout() -> None:
    """The reader of stdout is gone (``| head``): point stdout at /dev/null, so the flush at
    exit does not fail again with a traceback and exit 120 (the Python docs' recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nexus-ctl", description="Nexus operator tool.")
    ap.add_argument("--url", default=os.environ.get("NEXUS_URL", DEFAULT_URL),
                    help=f"server endpoint (default $NEXUS_URL or {DEFAULT_URL})")
    ap.add_argument("--token-file", help="file holding the operator token (mode 0600); "
                    "without it the token itself is read from $NEXUS_TOKEN, or minted from "
                    "$NEXUS_JWT_SECRET for a local companion server")
    sub = ap.add_subparsers(dest="action", required=True)
    w = sub.add_parser("watch", help="print live telemetry as it arrives")
    w.add_argument("--device", help="only this device")
    w.add_argument("--count", type=int, help="stop after N updates")
    w.add_argument("--json", action="store_true", help="one JSON payload per line")
    c = sub.add_parser("command", help="run an allow-listed command on a device")
    c.add_argument("device")
    c.add_argument("name")
    c.add_argument("args", nargs="*", metavar="key=value")
    c.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result")
    c.add_argument("--ttl", type=float, help="if the device is offline, keep the command "
                   "this many seconds for it instead of failing")
    args = ap.parse_args(argv)
    from .transport import AuthRefused

    try:
        token = operator_token(args.token_file)
    except AuthError as exc:
        print(f"nexus-ctl: {exc}", file=sys.stderr)
        return EXIT["usage"]  # a missing or unsafe local token: the server never saw it
    try:
        ws = connect(args.url, token)
    except AuthRefused as exc:
        print(f"nexus-ctl: {exc}", file=sys.stderr)
        return EXIT["server_error"]
    except Exception as exc:  # noqa: BLE001 - connection failures come in many types
        print(f"nexus-ctl: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return EXIT["no_result"]
    try:
        if args.action == "watch":
            return watch(ws, args.device, args.count, sys.stdout, args.json)
        return command(ws, args.device, args.name, args.args, args.wait, args.ttl, sys.stdout)
    except KeyboardInterrupt:
        return 0
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())

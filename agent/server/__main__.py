"""``nexus-server``: the companion server, and ``nexus-server token`` to mint tokens.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT; more of them while it
stops change nothing: the stop is bounded by the close timeout), 2 for bad
usage or a missing secret, 1 when the port cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ..errors import AuthError
from ..logsetup import setup_logging
from ..signals import STOP_SIGNALS, SignalInbox, leave


def _serve_args(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="nexus-server",
        description="Companion Nexus server: ws://HOST:PORT/v1/ws. "
        "Also: 'nexus-server token --device ID' mints a token.")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8765, help="port to bind (default 8765; 0 = any)")
    ap.add_argument("--db", default=":memory:",
                    help="SQLite file that keeps received telemetry (default: in memory)")
    ap.add_argument("--handshake-timeout", type=float, default=5.0,
                    help="seconds from TCP accept to the end of the WebSocket handshake "
                    "(default 5)")
    ap.add_argument("--max-unauthenticated", type=int, default=1024,
                    help="connections whose token is not checked yet; past it new ones are "
                    "dropped at accept (default 1024)")
    ap.add_argument("--max-rows-per-device", type=int, default=10_000,
                    help="telemetry rows each device keeps in the store; its oldest go "
                    "first (default 10000)")
    ap.add_argument("--max-rows", type=int, default=100_000,
                    help="telemetry rows in the whole store, a last resort: the largest "
                    "devices' oldest go first (default 100000)")
    ap.add_argument("--secret-file", help="file holding the JWT secret "
                    "(default: $NEXUS_JWT_SECRET)")
    ap.add_argument("--ping-interval", type=float, default=30.0,
                    help="seconds between protocol pings (default 30)")
    ap.add_argument("--ping-timeout", type=float, default=30.0,
                    help="seconds to wait for a pong before closing (default 30)")
    ap.add_argument("--rate-limit", type=int, default=100,
                    help="messages a minute per identity (a device or an operator token's "
                    "subject, across its connections; default 100)")
    ap.add_argument("--samples-per-minute", type=int, default=40_000,
                    help="telemetry samples a minute per device, batch items included "
                    "(default 40000: a day offline at 1 s drains in 2 min 10 s)")
    ap.add_argument("--max-operator-connections", type=int, default=8,
                    help="connections per operator identity; a newer one closes the oldest "
                    "(4001; default 8)")
    ap.add_argument("--no-batches", action="store_true",
                    help="do not offer telemetry.batch (serve the guide's protocol only)")
    ap.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// (with --tls-key)")
    ap.add_argument("--tls-key", help="PEM private key for --tls-cert")
    ap.add_argument("--redis", metavar="URL", help="join a cluster of nodes sharing one fleet "
                    "through this Redis (redis://HOST:PORT/DB; extra 'cluster')")
    ap.add_argument("--node-id", default="", help="this node's name in the cluster "
                    "(default HOST-PID)")
    ap.add_argument("--dedupe-s", type=int, default=600, help="seconds a stored telemetry id "
                    "is remembered cluster-wide (default 600)")
    ap.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="event loop: uvloop when installed (auto, the default; it comes with "
                    "the 'server' extra), or insist on one")
    ap.add_argument("--print-page-token", action="store_true",
                    help="print the fleet page's URL with a fresh operator token even when "
                    "stdout is not a terminal (by default it is printed only on a terminal: "
                    "under systemd stdout goes to the journal, which others may read)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every connection event")
    return ap.parse_args(argv)


def _token_args(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nexus-server token",
                                 description="Print a signed token for a device or an operator.")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="DEVICE_ID", help="a device token for DEVICE_ID")
    who.add_argument("--operator", metavar="NAME", help="an operator token for NAME")
    ap.add_argument("--ttl", type=float, default=86400.0,
                    help="lifetime in seconds (default 86400)")
    ap.add_argument("--secret-file", help="file holding the JWT secret "
                    "(default: $NEXUS_JWT_SECRET)")
    return ap.parse_args(argv)


def _token(argv: List[str]) -> int:
    from . import tokens

    args = _token_args(argv)
    try:
        secret = tokens.load_secret(args.secret_file)
    except AuthError as exc:
        print(f"nexus-server token: {exc}", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("nexus-server token: --ttl must be positive", file=sys.stderr)
        return 2
    role, subject = ("device", args.device) if args.device else ("operator", args.operator)
    print(tokens.mint(secret, subject, role, args.ttl))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["token"]:
        return _token(argv[1:])
    # Handlers only record; the main thread does the shutdown (see agent/signals.py).
    inbox = SignalInbox(STOP_SIGNALS)
    args = _serve_args(argv)
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    for name in ("dedupe_s", "rate_limit", "samples_per_minute", "max_operator_connections",
                 "max_rows", "max_rows_per_device", "handshake_timeout",
                 "max_unauthenticated"):
        if getattr(args, name) <= 0:
            print(f"nexus-server: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        from .app import CompanionServer, ServerSettings
        from .page import PAGE_SUBJECT, PAGE_TOKEN_TTL_S, page_url
        from .tokens import load_secret, mint

        if args.redis:
            from . import cluster  # noqa: F401 - redis-py, the 'cluster' extra
    except ImportError as exc:
        extra = "cluster" if args.redis and exc.name and exc.name.startswith("redis") else "server"
        print(f"nexus-server: {exc.name} is missing; install the '{extra}' extra "
              f"(pip install 'nexus-edge-agent[{extra}]')", file=sys.stderr)
        return 2
    try:
        secret = load_secret(args.secret_file)
    except AuthError as exc:
        print(f"nexus-server: {exc}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("nexus-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    settings = ServerSettings(args.host, args.port, args.db, args.ping_interval,
                              args.ping_timeout, args.rate_limit, tls_cert=args.tls_cert,
                              tls_key=args.tls_key, offer_batches=not args.no_batches,
                              redis_url=args.redis, node_id=args.node_id,
                              dedupe_s=args.dedupe_s, loop=args.loop,
                              samples_per_minute=args.samples_per_minute,
                              max_operator_connections=args.max_operator_connections,
                              max_rows=args.max_rows,
                              max_rows_per_device=args.max_rows_per_device,
                              handshake_timeout_s=args.handshake_timeout,
                              max_unauthenticated=args.max_unauthenticated)
    try:
        server = CompanionServer(settings, secret)
    except ImportError as exc:  # --loop uvloop without uvloop installed
        print(f"nexus-server: {exc.name} is missing; install the 'server' extra "
              "(pip install 'nexus-edge-agent[server]') or use --loop auto", file=sys.stderr)
        return 2
    except OSError as exc:  # a busy port, or an unreadable TLS certificate or key
        print(f"nexus-server: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    server.start()
    print(f"nexus-server listening on {server.url}", flush=True)  # first line: tests parse it
    # The fleet page, with a fresh operator token in the fragment (never in a request line),
    # only where a person reads it: a 12-hour operator token in a journal or a log file is
    # a credential anyone who reads that file may use.
    if args.print_page_token or sys.stdout.isatty():
        page_token = mint(secret, PAGE_SUBJECT, "operator", PAGE_TOKEN_TTL_S)
        print(f"page: {page_url(server.url, page_token)}", flush=True)
    else:
        print(f"page: {page_url(server.url, '')[:-len('#token=')]} (its token is printed only "
              "on a terminal or with --print-page-token; or mint one with 'nexus-server token "
              "--operator NAME')", flush=True)
    print(f"event loop: {server.loop_name}", flush=True)  # bench/fleet.py reports it
    while not inbox.wait(None):
        pass
    server.stop()
    leave(0)  # no finalization: a late second stop signal must not kill us on the way out
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

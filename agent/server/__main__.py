"""``nexus-server``: the companion server, and ``nexus-server token`` to mint tokens.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT; more of them while it
stops change nothing: the stop is bounded by the close timeout), 2 for bad
usage or a missing secret, 1 when the port cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, List, Optional

from ..errors import AuthError
from ..logsetup import setup_logging
from ..signals import STOP_SIGNALS, SignalInbox, leave

if TYPE_CHECKING:
    from . import tokens


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
    keys = ap.add_mutually_exclusive_group()
    keys.add_argument("--secret-file", help="file holding the HS256 JWT secret "
                      "(default: $NEXUS_JWT_SECRET)")
    keys.add_argument("--public-key", metavar="FILE", help="verify tokens with this PEM "
                      "public key only (Ed25519: EdDSA, RSA: RS256); the node then holds "
                      "nothing that mints tokens, so it offers no renewal")
    keys.add_argument("--signing-key", metavar="FILE", help="mint and verify tokens with "
                      "this PEM private key (Ed25519: EdDSA, RSA: RS256): renewals, the page")
    ap.add_argument("--renew-at", type=float, default=0.8, metavar="SHARE",
                    help="send a device a fresh token once its token has passed this share "
                    "of its lifetime (default 0.8; offered only by a node that can mint)")
    ap.add_argument("--no-renew", action="store_true", help="offer no token renewal")
    ap.add_argument("--max-token-lifetime", type=float, default=365.0, metavar="DAYS",
                    help="a renewed token keeps its lifetime up to this (default 365)")
    ap.add_argument("--client-ca", metavar="FILE", help="with --tls-cert: verify client "
                    "certificates against this CA bundle; a device that presents one needs "
                    "no token (its id: SAN URI urn:nexus:device:ID, else its CN); with "
                    "--client-cert-header: the header's certificate must be issued by it")
    ap.add_argument("--require-client-cert", action="store_true",
                    help="refuse devices without a client certificate (operators keep tokens)")
    ap.add_argument("--client-cert-header", metavar="NAME", help="behind a TLS terminator "
                    "(deploy/nginx/nexus-mtls.conf): the header carrying the verified client "
                    "certificate (URL-escaped PEM), taken only from --trusted-proxy")
    ap.add_argument("--trusted-proxy", action="append", metavar="ADDR",
                    help="an address or network allowed to send --client-cert-header "
                    "(repeatable; default 127.0.0.1 and ::1)")
    ap.add_argument("--deny-file", metavar="FILE", help="identities refused, one a line "
                    "('device ID', 'operator NAME', 'claim NAME'); re-read within a second of "
                    "a change, and open connections of a newly denied identity are closed")
    ap.add_argument("--claim-ca-cert", metavar="FILE", help="take claims (nexus-agent "
                    "provision --claim): sign a claimed device's certificate request with this "
                    "device CA (with --claim-ca-key; put the CA in --client-ca or nginx's too)")
    ap.add_argument("--claim-ca-key", metavar="FILE", help="the private key of --claim-ca-cert")
    ap.add_argument("--claim-days", type=int, default=365,
                    help="validity of a claimed device's certificate (default 365)")
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
    who.add_argument("--claim", metavar="NAME", help="a claim token named NAME, for factory "
                     "images: each device claims its own certificate with it (nexus-agent "
                     "provision --claim; needs --prefix and --max-devices)")
    ap.add_argument("--prefix", default=None, help="with --claim: the ids it may claim start "
                    "with this (keep other devices' ids out of it)")
    ap.add_argument("--max-devices", type=int, default=None,
                    help="with --claim: how many device ids it may claim in all")
    ap.add_argument("--ttl", type=float, default=86400.0,
                    help="lifetime in seconds (default 86400)")
    keys = ap.add_mutually_exclusive_group()
    keys.add_argument("--secret-file", help="file holding the HS256 JWT secret "
                      "(default: $NEXUS_JWT_SECRET)")
    keys.add_argument("--private-key", metavar="FILE", help="sign with this PEM private key "
                      "(Ed25519: EdDSA, RSA: RS256); nodes verify with its public half")
    return ap.parse_args(argv)


def _load_keys(secret_file: Optional[str], public_key: Optional[str] = None,
               private_key: Optional[str] = None) -> tokens.TokenKeys:
    """The token keys the flags name (AuthError names what is wrong; ImportError without
    the 'server' extra's cryptography for a key file)."""
    from . import tokens

    if public_key:
        return tokens.load_public_key(public_key)
    if private_key:
        return tokens.load_private_key(private_key)
    return tokens.load_secret_keys(secret_file)


def _token(argv: List[str]) -> int:
    args = _token_args(argv)
    if args.ttl <= 0:
        print("nexus-server token: --ttl must be positive", file=sys.stderr)
        return 2
    try:
        keys = _load_keys(args.secret_file, private_key=args.private_key)
    except AuthError as exc:
        print(f"nexus-server token: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"nexus-server token: {exc.name} is missing; install the 'server' extra",
              file=sys.stderr)
        return 2
    if args.claim:
        from . import tokens

        if args.prefix is None or args.max_devices is None:
            print("nexus-server token: --claim needs --prefix and --max-devices",
                  file=sys.stderr)
            return 2
        # The limits tokens.verify enforces: a token past them would be refused at every claim.
        problem = tokens.claim_limits_problem(args.prefix, args.max_devices)
        if problem:
            print(f"nexus-server token: --claim: {problem}", file=sys.stderr)
            return 2
        print(keys.mint(args.claim, "claim", args.ttl, prefix=args.prefix,
                        max=args.max_devices))
        return 0
    role, subject = ("device", args.device) if args.device else ("operator", args.operator)
    print(keys.mint(subject, role, args.ttl))
    return 0


def _check_identity_args(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the TLS, certificate and renewal flags, or None."""
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.client_ca and not (args.tls_cert or args.client_cert_header):
        return ("--client-ca needs --tls-cert and --tls-key (it verifies in the TLS handshake) "
                "or --client-cert-header (it checks the terminator's certificates)")
    if args.require_client_cert and not (args.client_ca or args.client_cert_header):
        return "--require-client-cert needs --client-ca or --client-cert-header"
    if args.max_token_lifetime <= 0:
        return "--max-token-lifetime must be positive"
    if not 0.0 < args.renew_at < 1.0:
        return "--renew-at must be between 0 and 1 (a share of a token's lifetime)"
    if bool(args.claim_ca_cert) != bool(args.claim_ca_key):
        return "--claim-ca-cert and --claim-ca-key go together"
    if args.claim_ca_cert and args.redis:
        return ("claims are recorded in one node's store: run --claim-ca-cert on a node "
                "outside the cluster (devices then connect to the cluster with their "
                "certificate)")
    if args.claim_ca_cert and args.db == ":memory:":
        return ("--claim-ca-cert needs --db FILE: an id is claimed once, ever, so the record "
                "of claims must outlive a restart")
    if not 0 < args.claim_days <= 3650:
        return "--claim-days must be from 1 to 3650"
    if args.client_cert_header:
        try:
            from .certs import parse_networks
            parse_networks(args.trusted_proxy or ())
        except ValueError as exc:
            return str(exc)
    return None


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
    problem = _check_identity_args(args)  # before the imports: a wrong flag is named first
    if problem:
        print(f"nexus-server: {problem}", file=sys.stderr)
        return 2
    try:
        from .app import CompanionServer, ServerSettings
        from .certs import TRUSTED_PROXIES
        from .page import PAGE_SUBJECT, PAGE_TOKEN_TTL_S, page_url
        if (args.public_key or args.signing_key or args.client_ca or args.client_cert_header
                or args.claim_ca_cert):
            import cryptography  # noqa: F401 - key files and certificates: the 'server' extra

        if args.redis:
            from . import cluster  # noqa: F401 - redis-py, the 'cluster' extra
    except ImportError as exc:
        extra = "cluster" if args.redis and exc.name and exc.name.startswith("redis") else "server"
        print(f"nexus-server: {exc.name} is missing; install the '{extra}' extra "
              f"(pip install 'nexus-edge-agent[{extra}]')", file=sys.stderr)
        return 2
    try:
        keys = _load_keys(args.secret_file, args.public_key, args.signing_key)
    except AuthError as exc:
        print(f"nexus-server: {exc}", file=sys.stderr)
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
                              max_unauthenticated=args.max_unauthenticated,
                              client_ca=args.client_ca,
                              require_client_cert=args.require_client_cert,
                              client_cert_header=args.client_cert_header,
                              trusted_proxies=tuple(args.trusted_proxy or TRUSTED_PROXIES),
                              renew_at=None if args.no_renew else args.renew_at,
                              max_token_lifetime_s=args.max_token_lifetime * 86400.0,
                              claim_ca_cert=args.claim_ca_cert, claim_ca_key=args.claim_ca_key,
                              claim_days=args.claim_days, deny_file=args.deny_file)
    try:
        server = CompanionServer(settings, keys)
    except ImportError as exc:  # --loop uvloop without uvloop installed
        print(f"nexus-server: {exc.name} is missing; install the 'server' extra "
              "(pip install 'nexus-edge-agent[server]') or use --loop auto", file=sys.stderr)
        return 2
    except AuthError as exc:  # the claim CA's certificate or key, the deny file
        print(f"nexus-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a busy port, or an unreadable TLS certificate or key
        print(f"nexus-server: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    server.start()
    print(f"nexus-server listening on {server.url}", flush=True)  # first line: tests parse it
    # The fleet page, with a fresh operator token in the fragment (never in a request line),
    # only where a person reads it: a 12-hour operator token in a journal or a log file is
    # a credential anyone who reads that file may use.
    if not keys.can_mint:
        print(f"page: {page_url(server.url, '')[:-len('#token=')]} (this node holds a public "
              "key only: mint an operator token with 'nexus-server token --private-key FILE "
              "--operator NAME' and add it as #token=...)", flush=True)
    elif args.print_page_token or sys.stdout.isatty():
        page_token = keys.mint(PAGE_SUBJECT, "operator", PAGE_TOKEN_TTL_S)
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

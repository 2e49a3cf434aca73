"""The only code that talks to the server: connect, send, read, reconnect.

The rules of a connection (welcome, ack window, pace, pings, ack timeout,
RATE_LIMITED, rejects, commands) live in ``session.py``, sans I/O: it returns
typed events, which ``_Connection._apply`` carries out, the one place they are
acted on. This module is the I/O around them:

* One thread (the one running :meth:`Transport.run`) owns the socket and all
  per-connection state. Other threads reach it only through the outbox (new
  messages) and :meth:`Transport.wake` (a byte on a pipe, so ``select`` returns
  at once instead of polling).
* What is sent comes from the outbox, oldest first; a message leaves the
  outbox only on its ``ack``; whatever is in flight when a connection drops is
  sent again, with the same id, on the next one.
* Live messages go first (``SendPlan``): those stored since the connect leave
  as soon as the window and pace allow; the backlog (what was waiting at
  connect time) takes what is left, as batches when the server offers them, so
  a long backlog never starves live data. Each stream is in order.
* Reconnects go on forever: full-jitter exponential backoff capped at
  ``max_delay_s``, reset only after a connection that worked (welcome received,
  at least one ack or pong) and stayed up for ``STABLE_S``: a server that acks
  once and closes sees the delays grow like any other failure. A refused token
  (close 4000, HTTP 401/403; also when it expires during a connection) backs
  off at the cap and is logged once until it changes, unless there is already
  another token to present (a provisioning script rotated the token file, or
  the server's renewal is kept in state_dir, ``auth.current_token``): that one
  is tried after the base delay.
* Through an HTTP proxy (``server.proxy``, else the environment's): only the
  connect options differ (``proxy_options``: websocket-client's CONNECT
  tunnel); a failure names the proxy and backs off like any other.
* What the server sends is bounded: a frame over ``MAX_INCOMING_MESSAGE`` is
  refused before its payload is read, and so is a fragmented message whose
  parts add up to more. Frames are read one at a time with a timeout that ends
  at the session's next deadline, so a peer that trickles bytes or fragments
  cannot hold the loop: pings, ack timeouts and sends go on.
* A message the server refuses for good is set aside in the outbox (see
  ``Outbox.set_aside``), never retried forever in front of the others: one
  answered with ``INVALID_MESSAGE``; one over the protocol's size limit; and
  one that was the oldest in flight when the server closed the connection
  with a refusing code (1003, 1007, 1009, 1011) ``STRIKES`` times in a row.
* A batch is never struck: a connection that ends while a batch is in flight,
  however it ends (a refusing close code, a timeout, a reset by a proxy in
  between; not a clean 1000/1001 close or a refused token), halves the batch
  size (a proxy in front of the server may refuse frames the server offered to
  take), down to ``MIN_BATCH_BYTES``, below which batches stop for the run and
  single messages go; ``GROW_AFTER`` batches acked in a row at a halved size
  double it again, so a flaky link costs the drain's speed only for a while.
  The strikes count against single messages only.
* Stopping: no new sends; wait up to ``DRAIN_S`` for in-flight acks (cut
  short by :meth:`Transport.hurry`); close with 1000. Nothing is lost by a
  stop: unacked messages stay in the outbox.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from . import auth
from . import protocol as p
from .config import Config
from .connstate import ConnectionStats
from .errors import AuthError, ProtocolError
from .logsetup import redact
from .outbox import Outbox
from .sendplan import MAX_BATCH_BYTES, SendPlan
from .session import (
    Acked,
    CommandArrived,
    End,
    Ended,
    Event,
    Opened,
    Outgoing,
    Refused,
    Send,
    Session,
    SessionConfig,
    TokenRenewed,
    Worked,
)

if TYPE_CHECKING:  # the queue module is loaded only with an allow-list
    import queue

log = logging.getLogger("nexus.transport")

MAX_INCOMING_MESSAGE = 1 << 20  # a frame, or a fragmented message all together
# One batch in flight at a time: each is up to hundreds of KB held until its ack, and on
# a link where acks take longer than the pace's interval more would not go faster anyway.
BATCHES_IN_FLIGHT = 1
DRAIN_S = 2.0
SAFETY_WAKE_S = 10.0  # the longest the loop sleeps with nothing due (wake-ups come by pipe)
MAX_FRAMES_PER_READ = 64
# Close codes that say "I will not take what you sent" (not "I am going away").
REFUSING_CLOSE_CODES = (1003, 1007, p.CLOSE_TOO_BIG, p.CLOSE_INTERNAL)
STRIKES = 3  # refusing closes in a row with the same oldest message before it is set aside
MIN_BATCH_BYTES = 8 * 1024  # halved below this, batches stop: singles go (see the docstring)
GROW_AFTER = 20  # batches acked at a halved size before it doubles again
STABLE_S = 10.0  # a connection must last this long (and get an ack) to reset the backoff


class ConnectionLost(Exception):
    """This connection is over; ``code`` is the close code when the server sent one, and
    ``ended`` the session's account when the session's rules ended it."""

    def __init__(self, reason: str, code: Optional[int] = None,
                 ended: Optional[Ended] = None) -> None:
        super().__init__(reason)
        self.code = code
        self.ended = ended


class AuthRefused(ConnectionLost):
    """The server refused our token (close 4000, AUTH_FAILED, or 401/403 at the handshake)."""


def _lost(ended: Ended) -> ConnectionLost:
    kind = AuthRefused if ended.why is End.AUTH_REFUSED else ConnectionLost
    return kind(ended.reason, ended.code, ended)


def import_websocket(url: str) -> Any:
    """Import websocket-client; for a ``ws://`` URL, without loading ``ssl`` (about 3 MB).

    websocket-client imports ssl only if it can (``HAVE_SSL``); hiding the module
    for the duration of that import keeps it out of a plain-TCP agent. A later
    switch to ``wss://`` then needs a restart, which ``service`` says.
    """
    if "websocket" in sys.modules or not url.startswith("ws://") or "ssl" in sys.modules:
        import websocket

        return websocket
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import websocket
    finally:
        del sys.modules["ssl"]
    return websocket


def tls_options(url: str, ca_file: Optional[str],
                client: Optional[Tuple[str, str, Optional[str]]] = None
                ) -> Optional[Dict[str, Any]]:
    """websocket-client's ``sslopt`` for ``url``: verify the server, against ``ca_file`` if
    given (a private CA), else the system store; present ``client`` (certificate, key,
    passphrase file) when given (mTLS). None for ``ws://`` (no ssl import)."""
    if not url.startswith("wss://"):
        return None
    import ssl

    options: Dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True}
    if ca_file:
        options["ca_certs"] = ca_file
    if client is not None:
        cert, key, passphrase_file = client
        auth.check_token_file(key, "client key")  # 0600, like a token: it is the identity
        options["certfile"], options["keyfile"] = cert, key
        if passphrase_file:
            options["password"] = auth.read_secret_line(passphrase_file,
                                                        "client key passphrase file")
    return options


# --------------------------------------------------------------------------- pacing


class Jitter:
    """Uniform random numbers for the backoff's jitter, from ``os.urandom``: the ``random``
    module (and ``secrets``, which imports it) cost about 0.15 MB of RSS in the daemon for
    a call or two a reconnect (docs/performance.md, "Footprint"). Tests may pass a
    ``random.Random`` instead: anything with ``uniform(low, high)``."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * (int.from_bytes(os.urandom(7), "big") / 2.0 ** 56)


def backoff_delays(base: float, cap: float, rng: Any) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**n)]."""
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))
        attempt += 1


# --------------------------------------------------------------------------- opening


def tcp_socket(ws_mod: Any, url: str, timeout: float) -> Optional[socket.socket]:
    """The TCP connection for a ``ws://`` URL with an ASCII host and no proxy, opened here
    the way websocket-client opens its own (every address in turn, its socket options:
    TCP_NODELAY and keepalive); None when websocket-client should open it (``wss://``,
    a proxy from the environment, a non-ASCII host name).

    Why: ``socket.getaddrinfo`` encodes a ``str`` host with the ``idna`` codec, which
    loads ``encodings.idna``, ``stringprep`` and ``unicodedata`` (0.3 to 0.45 MB of RSS
    for the whole run) for a host name that is plain ASCII; a ``bytes`` host skips the
    codec.
    """
    if not url.startswith("ws://"):
        return None
    ws_url, ws_socket = ws_mod._url, ws_mod._socket  # its URL parser and socket options

    hostname, port, _, _ = ws_url.parse_url(url)
    try:
        host = hostname.encode("ascii")
    except UnicodeEncodeError:
        return None
    if ws_url.get_proxy_info(hostname, False)[0]:
        return None  # http_proxy applies: websocket-client tunnels through it
    error: Optional[OSError] = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0,
                                                              socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            for option in ws_socket.DEFAULT_SOCKET_OPTION:
                sock.setsockopt(*option)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {hostname}")


def proxy_options(ws_mod: Any, url: str, proxy: Optional[str],
                  auth_file: Optional[str]) -> Dict[str, Any]:
    """websocket-client's proxy arguments for ``url``: ``server.proxy`` if set, else the
    environment's ``https_proxy`` (``wss://``) or ``http_proxy`` (``ws://``) unless
    ``no_proxy`` names the host (websocket-client's own reading of them, which also keeps
    credentials written in that URL). ``auth_file`` (``user:password``) replaces those.
    {} for a direct connection. Always HTTP CONNECT, for ``ws://`` as for ``wss://``.
    AuthError for an unusable ``auth_file``; nothing here is logged."""
    hostname, _, _, secure = ws_mod._url.parse_url(url)
    if proxy:
        parts = urlsplit(proxy)  # checked by config: http://host:port
        host: Optional[str] = parts.hostname
        port, creds = parts.port, None
    else:
        # no_proxy is read here, the same way for every websocket-client: before 1.0 an
        # unset no_proxy meant "localhost, 127.0.0.1" and ".example" matched nothing
        # (Debian 11 ships 0.57); since then neither.
        if _no_proxy_for(hostname):
            return {}
        host, port, creds = ws_mod._url.get_proxy_info(hostname, secure, no_proxy=[""])
        if not host:
            return {}
    if auth_file:
        creds = auth.read_proxy_auth(auth_file)
    # http_no_proxy [""]: the decision is made above; the library must not make it again
    # with its own default list (0.57 would skip an explicit proxy for 127.0.0.1).
    return {"http_proxy_host": host, "http_proxy_port": port or 80, "http_proxy_auth": creds,
            "proxy_type": "http", "http_no_proxy": [""]}


def _no_proxy_for(hostname: str) -> bool:
    """Whether ``no_proxy`` (or ``NO_PROXY``) exempts ``hostname``, as curl reads it: ``*``
    alone; a name, which also covers its subdomains (a leading dot is the same, a trailing
    dot and a ``:port`` are ignored); an address (brackets or not) or a network (CIDR)
    for an IP host."""
    import ipaddress

    value = os.environ.get("no_proxy", os.environ.get("NO_PROXY", "")).strip()
    if value == "*":
        return True
    host = hostname.strip("[]").rstrip(".").lower()
    for entry in (_no_proxy_entry(e) for e in value.split(",")):
        if not entry:
            continue
        if host == entry or host.endswith("." + entry):
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _no_proxy_entry(entry: str) -> str:
    """One ``no_proxy`` entry as a bare lower-case name, address or network."""
    entry = entry.strip().lower()
    if entry.startswith("["):  # [::1] or [::1]:443
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:  # name:port (an IPv6 address has more colons)
        entry = entry.split(":", 1)[0]
    return entry.strip(".")


def dial(ws_mod: Any, url: str, header: List[str], timeout: float,
         ca_file: Optional[str], proxy: Optional[Dict[str, Any]] = None,
         client: Optional[Tuple[str, str, Optional[str]]] = None) -> Any:
    """``create_connection``, a refused handshake sorted: 401/403 is AuthRefused, any other
    HTTP status ConnectionLost; through ``proxy`` (``proxy_options``), a failure says so;
    network errors come through as they are."""
    sock = None if proxy else tcp_socket(ws_mod, url, timeout)
    try:
        return ws_mod.create_connection(url, header=header, timeout=timeout,
                                        sslopt=tls_options(url, ca_file, client),
                                        socket=sock,
                                        **(proxy or {}))
    except ws_mod.WebSocketBadStatusException as exc:
        if exc.status_code in (401, 403):
            raise AuthRefused(f"HTTP {exc.status_code} at the handshake") from None
        raise ConnectionLost(f"HTTP {exc.status_code} at the handshake") from None
    except (ws_mod.WebSocketProxyException, OSError, ws_mod.WebSocketException) as exc:
        if sock is not None:
            sock.close()
        if not proxy:
            raise
        where = f"through the proxy {proxy['http_proxy_host']}:{proxy['http_proxy_port']}"
        if "status: 407" in str(exc):
            raise ConnectionLost(f"{where}: the proxy wants credentials (HTTP 407); check "
                                 "server.proxy_auth_file") from None
        raise ConnectionLost(f"{where}: {_describe(exc)}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def open_welcomed(url: str, token: Optional[str], ca_file: Optional[str] = None,
                  timeout: float = 10.0, proxy: Optional[str] = None,
                  proxy_auth_file: Optional[str] = None,
                  client: Optional[Tuple[str, str, Optional[str]]] = None) -> Any:
    """A header-authenticated connection that got its ``connected`` (nexus-ctl, provision),
    through ``proxy`` or the environment's as the agent would (``proxy_options``); with
    ``client`` (cert, key, passphrase file) it presents a client certificate, and with no
    ``token`` it sends none.

    AuthRefused when the server refuses the token; ConnectionLost, OSError or a
    websocket-client error when it cannot be reached or answers something else.
    """
    ws_mod = import_websocket(url)
    header = [f"Authorization: Bearer {token}"] if token else []
    ws = dial(ws_mod, url, header, timeout, ca_file,
              proxy_options(ws_mod, url, proxy, proxy_auth_file), client)
    _limit_frames(ws, MAX_INCOMING_MESSAGE)  # a lying server's answer is bounded here too
    try:
        env = p.decode(ws.recv())
        if env.type == "error":
            raise AuthRefused(f"server refused the token: {p.parse_error(env).message}")
        if env.type != "connected":
            raise ConnectionLost(f"unexpected first message {env.type!r}")
    except (AuthRefused, ConnectionLost):
        ws.close()
        raise
    except Exception as exc:  # noqa: BLE001 - a timeout or close of websocket-client's own type
        ws.close()
        raise ConnectionLost(f"no welcome from {url}: {exc}") from None
    return ws


# --------------------------------------------------------------------------- the transport


class Transport:
    def __init__(self, config: Config, outbox: Outbox, health: ConnectionStats,
                 commands: Optional[queue.SimpleQueue[Optional[p.CommandRequest]]] = None,
                 rng: Optional[Any] = None) -> None:
        self.config = config
        self.outbox = outbox
        self.health = health
        # Command requests go to the command runner's thread through this queue, and nothing
        # else: the transport never waits on the runner (its ledger fsyncs) nor calls it.
        self.commands = commands
        self.rng = rng or Jitter()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._auth_refused_logged = False
        self._token_used = ""  # the token of the last connection attempt
        self._ws_module: Any = None
        self.worked = False
        self._hurry = threading.Event()
        self.batches_allowed = True  # off for good once a server refuses a whole batch
        self.batch_bytes = MAX_BATCH_BYTES  # halved by each batch a connection died with
        self._batch_successes = 0  # batches acked since the size last changed
        self._strikes: Tuple[str, int] = ("", 0)  # (oldest in-flight id, refusing closes)

    # ------------------------------------------------------------------ other threads

    def wake(self) -> None:
        """Make the transport look at the outbox now (called after a put)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def hurry(self) -> None:
        """Stopping a second time: do not wait for in-flight acks (main thread only)."""
        self._hurry.set()
        self.wake()

    def set_config(self, config: Config) -> None:
        """Take a reloaded config; it applies from the next connection."""
        self.config = config

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Connect, serve, reconnect, until ``stop`` is set."""
        cfg = self.config.reconnect
        delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
        while not stop.is_set():
            self.worked = False  # set by the session on its first ack or pong
            started = time.monotonic()
            try:
                self._connection(stop)
            except AuthRefused as exc:
                self._note_auth_refused(str(exc))
                self._set_aside_refused_renewal()
                cap = self.config.reconnect.max_delay_s
                self._after_connection(str(exc))
                if self._token_rotated():
                    log.info("the token file holds a new token; trying it")
                    stop.wait(self.config.reconnect.base_delay_s)
                else:
                    stop.wait(self.rng.uniform(cap / 2, cap))
                continue
            except (ConnectionLost, OSError, ProtocolError) as exc:
                self._after_connection(str(exc))
            except Exception as exc:  # noqa: BLE001 - websocket-client raises its own tree
                self._after_connection(_describe(exc))
            if stop.is_set():
                break
            if self.worked and time.monotonic() - started >= STABLE_S:
                # However it ended, this connection worked for a while: start over at base.
                cfg = self.config.reconnect
                delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
            delay = next(delays)
            log.info("reconnecting in %.1f s", delay)
            stop.wait(delay)
        self.health.update(connected=False)

    def _after_connection(self, reason: str) -> None:
        reason = redact(reason)  # a library's message may quote the URL, ?token= and all
        was_connected = self.health.connected
        self.health.update(connected=False, last_error=reason)
        self.health.add("reconnects")
        if was_connected:
            log.warning("connection lost: %s", reason)
        else:
            log.info("cannot connect: %s", reason)

    def refuse(self, record_id: str, reason: str) -> None:
        """Take a message the server will never accept out of the queue (logged, counted)."""
        if self.outbox.set_aside(record_id, reason):
            self.health.fact_changed()
            log.error("set aside message %s: %s; it is kept in the outbox's set_aside table "
                      "and not sent again", record_id, reason)

    def _strike(self, oldest: Optional[str], code: Optional[int], reason: str) -> None:
        """A connection ended: if the server refused it, count against the oldest in flight."""
        if code not in REFUSING_CLOSE_CODES or oldest is None:
            return
        count = self._strikes[1] + 1 if self._strikes[0] == oldest else 1
        self._strikes = (oldest, count)
        if count >= STRIKES:
            self._strikes = ("", 0)
            self.refuse(oldest, f"the server closed the connection {count} times in a row "
                           f"while it was the oldest message in flight ({reason})")

    def keep_token(self, token: str) -> None:
        """A fresh token from the server: checked against what the agent can know of it (a
        JWT for this device, not expired), then kept in ``state_dir/renewed-token`` for the
        next connections (atomically; on failure the old one stays, and says so). The
        provisioned token file is never written (auth.py says why)."""
        path = auth.renewed_token_path(self.config.state_dir)
        problem = auth.token_problem(token, self.config.device_id, time.time())
        if problem is not None:
            log.error("ignored a renewed token from the server: %s", problem)
            return
        try:
            auth.store_token(path, token)
        except OSError as exc:
            log.error("could not write the renewed token to %s (%s); the current one is "
                      "kept and is used until it expires", path, exc.strerror or exc)
            return
        expires = auth.expiry(token)
        self.health.update(token_expires=expires)
        log.info("the server renewed the token; it is used from the next connection on "
                 "(expires %s)", "never" if expires is None else
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)))

    def _shrink_batches(self, size: int, reason: str) -> None:
        """A connection died with a batch of ``size`` bytes in flight: halve what a batch may
        hold, or stop batches below MIN_BATCH_BYTES (for the rest of this run)."""
        self.batch_bytes = min(self.batch_bytes, size) // 2
        self._batch_successes = 0
        if self.batch_bytes < MIN_BATCH_BYTES:
            self.batches_allowed = False
            log.error("the connection ended with a telemetry.batch in flight (%s); batches are "
                      "off for the rest of this run: single messages from now on", reason)
        else:
            log.warning("the connection ended with a telemetry.batch of %d bytes in flight "
                        "(%s); batches hold at most %d bytes from now on", size, reason,
                        self.batch_bytes)

    def _token_rotated(self) -> bool:
        """The token to present now (the token file, NEXUS_TOKEN, or a renewal) is another
        than the one refused."""
        try:
            return self._pick_token() != self._token_used
        except AuthError:
            return False

    def _set_aside_refused_renewal(self) -> None:
        """The server refused the renewal we presented (signed by another server, by a key
        since changed, or issued in the future): it would win over the provisioned token at
        every connect, forever, so it is moved aside (``renewed-token.refused``) while the
        provisioned token is usable. Not otherwise: on a device that lives on renewals it is
        the only hope (the refusal may pass: a node whose clock is behind the minter's)."""
        cfg = self.config
        path = auth.renewed_token_path(cfg.state_dir)
        try:
            if auth.read_token(path) != self._token_used:
                return  # the provisioned token was refused, or a newer renewal came since
            provisioned = auth.check_credentials(cfg.server.token_file, cfg.server.client_key)
            if provisioned is None or auth.token_problem(provisioned, cfg.device_id,
                                                         time.time()) is not None:
                return
            os.replace(path, path + ".refused")
        except (AuthError, OSError):
            return
        log.warning("the server refused the renewed token; it is set aside (%s.refused) and "
                    "the provisioned token is presented again", path)

    def _pick_token(self) -> Optional[str]:
        cfg = self.config
        return auth.current_token(cfg.server.token_file, cfg.server.client_key, cfg.state_dir,
                                  cfg.device_id, time.time())

    def _note_auth_refused(self, reason: str) -> None:
        if not self._auth_refused_logged:
            log.error("the server refused the token (%s); retrying about every %.0f s; check "
                      "server.token_file or NEXUS_TOKEN (logged once until it changes)", reason,
                      self.config.reconnect.max_delay_s)
            self._auth_refused_logged = True

    # ------------------------------------------------------------------ one connection

    def _open(self) -> Any:
        server = self.config.server
        client = None if server.client_cert is None or server.client_key is None else \
            (server.client_cert, server.client_key, server.client_key_passphrase_file)
        token = self._token()  # re-read on every connect (rotation)
        if self._ws_module is None:
            self._ws_module = import_websocket(server.url)
        ws_mod = self._ws_module
        url, header = server.url, []
        if token is not None and server.auth == "query":
            url += ("&" if "?" in url else "?") + "token=" + quote(token, safe="")
        elif token is not None:
            header.append(f"Authorization: Bearer {token}")
        proxy = proxy_options(ws_mod, server.url, server.proxy, server.proxy_auth_file)
        ws = dial(ws_mod, url, header, server.connect_timeout_s, server.ca_file, proxy,
                  client)
        _limit_frames(ws, MAX_INCOMING_MESSAGE)
        return ws

    def _token(self) -> Optional[str]:
        """The token to present, or None when a client certificate stands in for it (a
        certificate and no token file, no $NEXUS_TOKEN)."""
        token = self._pick_token()
        self._token_used = token or ""
        cert = self.config.server.client_cert
        facts = None
        if cert:  # (a ws:// agent without one never loads ssl or subprocess for this)
            from . import certinfo

            facts = certinfo.read(cert)  # cached: openssl once per file
        self.health.update(token_expires=None if token is None else auth.expiry(token),
                           certificate_expires=None if facts is None else facts.expires)
        return token

    def _connection(self, stop: threading.Event) -> None:
        """One connection from open to close (or to the exception that ended it)."""
        try:
            ws = self._open()
        except AuthError as exc:
            raise ConnectionLost(f"no usable credentials: {exc}") from None
        connection = _Connection(self, ws)
        try:
            connection.serve(stop)
        except ConnectionLost as exc:
            self._after_end(exc.ended or connection.session.lost(str(exc), exc.code))
            raise
        except Exception as exc:  # a reset, a failed send: websocket-client's or the OS's
            self._after_end(connection.session.lost(_describe(exc)))
            raise
        finally:
            connection.close()

    def _after_end(self, ended: Ended) -> None:
        """What the session's account of an ended connection changes for the next ones:
        batches off, smaller batches, or a strike against the oldest message in flight."""
        if ended.why is End.BATCHES_REFUSED:
            self.batches_allowed = False
            log.error("%s", ended.reason)
        elif ended.batch_bytes is not None and ended.why is not End.AUTH_REFUSED and \
                ended.code not in (p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY):
            # However it ended (a refusing close, a timeout, a reset by a proxy in between):
            # a batch in flight may be why. Halved now, grown back after GROW_AFTER acks.
            self._shrink_batches(ended.batch_bytes, ended.reason)
        else:
            self._strike(ended.oldest, ended.code, ended.reason)

    def _batch_acked(self) -> None:
        """A batch was acked: after GROW_AFTER in a row at a halved size, double it again (a
        connection lost once, by a flaky link, must not cost the drain's speed for good)."""
        if self.batch_bytes >= MAX_BATCH_BYTES:
            return
        self._batch_successes += 1
        if self._batch_successes >= GROW_AFTER:
            self._batch_successes = 0
            self.batch_bytes = min(MAX_BATCH_BYTES, self.batch_bytes * 2)
            log.info("batches hold at most %d bytes again", self.batch_bytes)


class _Connection:
    """One connection's I/O: the socket, ``select`` and the outbox around a
    :class:`~agent.session.Session`, which holds every rule. Transport thread only."""

    def __init__(self, transport: Transport, ws: Any) -> None:
        self.t = transport
        self.ws = ws
        cfg = transport.config
        self.session = Session(SessionConfig(
            cfg.device_id, cfg.server.connect_timeout_s, cfg.server.ping_interval_s,
            cfg.server.ping_timeout_s, cfg.server.ack_timeout_s, cfg.server.ack_window,
            cfg.server.max_messages_per_minute, transport.commands is not None,
            batches=transport.batches_allowed,
            renew_tokens=True), time.monotonic())
        self.plan: Optional[SendPlan] = None
        self.message = _Reassembly(MAX_INCOMING_MESSAGE)
        self.read_timeout = cfg.server.connect_timeout_s  # what a send may block for

    # ------------------------------------------------------------------ main loop

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            self._fill(now)
            self._apply(self.session.tick(now, time.time()))
            # Every wake-up comes by pipe (a put, a command result, stop, hurry) or is a
            # session deadline; SAFETY_WAKE_S is only a net under that, long enough not to
            # cost CPU when idle at a 5 s interval (it used to be 1 s).
            self._wait_and_read(min(self.session.deadline(now), now + SAFETY_WAKE_S) - now)
        self._drain()

    def _fill(self, now: float) -> None:
        """Send stored messages while the session allows (window, rate, pause)."""
        if self.plan is None:
            return
        events: List[Event] = []
        while self.session.may_send(now):
            message = self.session.next_retry() or self._next_stored()
            if message is None:
                break
            events += self.session.send(message, now)
            self.t.health.add("sent", sent_items=len(message.items) or 1)
        self._apply(events)

    def _next_stored(self) -> Optional[Outgoing]:
        assert self.plan is not None
        # Only with a batch offer can a batch be in flight (singles skip the count: it ran
        # over the whole window for every message of a drain).
        batches = 0 if self.plan.batch is None else self.session.batches_unacked
        while True:
            record = self.plan.next(batch_allowed=batches < BATCHES_IN_FLIGHT)
            if record is None:
                return None
            if isinstance(record, list):  # a telemetry.batch
                batch_id = p.new_id("batch")
                text = p.batch_text(batch_id, time.time(), self.t.config.device_id,
                                    [item for _, item in record])
                return Outgoing(batch_id, text, tuple(msg_id for msg_id, _ in record))
            try:
                return Outgoing(record.id, record.envelope_text())
            except p.LocalProtocolError as exc:  # stored by an older version, or a bug
                self.t.refuse(record.id, f"over the protocol's size limit ({exc.message})")

    def _apply(self, events: List[Event]) -> None:
        """Carry out the session's events, in order: the one place they are acted on."""
        acked: List[str] = []
        try:
            for event in events:
                if isinstance(event, Send):
                    self.ws.send(event.text)
                elif isinstance(event, Acked):
                    acked.extend(event.ids)
                    if event.batch:
                        self.t._batch_acked()
                elif isinstance(event, Refused):
                    self.t.refuse(event.id, event.reason)
                elif isinstance(event, CommandArrived):
                    assert self.t.commands is not None
                    self.t.commands.put(event.request)
                elif isinstance(event, Opened):
                    self._welcomed(event.welcome)
                elif isinstance(event, Worked):
                    self.t.worked = True
                elif isinstance(event, TokenRenewed):
                    self.t.keep_token(event.token)
                elif isinstance(event, Ended):
                    raise _lost(event)
        finally:
            if acked:  # one transaction for a burst of acks, even when the connection ends
                self.t.outbox.ack(acked)
                self.t.health.acked_now(len(acked), time.time())

    def _welcomed(self, welcome: p.Welcome) -> None:
        t, s = self.t, self.session
        self.plan = SendPlan(t.outbox, t.outbox.stats().last_seq, s.cfg.ack_window,
                             s.batch_offer, t.config.device_id, t.batch_bytes)
        offset = welcome.server_time - time.time()
        t.health.update(connected=True, clock_offset_s=round(offset, 3))
        if t._auth_refused_logged:
            log.warning("the server accepts the token again")
            t._auth_refused_logged = False
        log.info("connected as %s (clock offset to the server %+.3f s%s)", welcome.client_id,
                 offset, "; telemetry.batch offered" if s.batch_offer else "")

    def _wait_and_read(self, timeout: float) -> None:
        sock = self.ws.sock
        if sock is None:
            raise ConnectionLost("socket closed")
        if not _has_unread(sock, self.ws):
            readable, _, _ = select.select([sock, self.t._wake_r], [], [], max(0.0, timeout))
            if self.t._wake_r in readable:
                _drain_pipe(self.t._wake_r)
                if self.plan is not None:
                    self.plan.new_rows()
            if sock not in readable:
                return
        # Read every frame already waiting, then apply their events together. Each read may
        # wait only until the next timer: a peer that trickles a frame must not hold this
        # thread.
        now = time.monotonic()
        sock.settimeout(max(0.05, min(self.session.deadline(now), now + 1.0) - now))
        events: List[Event] = []
        try:
            for _ in range(MAX_FRAMES_PER_READ):
                events += self._read_frame()
                if self.session.ended is not None or (
                        not _has_unread(sock, self.ws) and not select.select([sock], [], [], 0)[0]):
                    break
        except self.t._ws_module.WebSocketTimeoutException:
            pass  # part of a frame came; websocket-client keeps it and goes on next time
        finally:
            sock.settimeout(self.read_timeout)
            self._apply(events)  # even when the connection drops mid-burst

    def _read_frame(self) -> List[Event]:
        """Read one frame (not one message: fragments are put together here, bounded)."""
        abnf = self.t._ws_module.ABNF
        frame = self.ws.recv_frame()
        opcode = frame.opcode
        self.session.frame_seen(time.monotonic())
        if opcode == abnf.OPCODE_PING:
            self.ws.pong(frame.data)  # websocket-client checked it is a valid control frame
        elif opcode == abnf.OPCODE_CLOSE:
            data = frame.data
            code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
            return self.session.closed(code, data[2:].decode("utf-8", "replace"))
        elif opcode in (abnf.OPCODE_TEXT, abnf.OPCODE_BINARY, abnf.OPCODE_CONT):
            data = self.message.add(opcode == abnf.OPCODE_CONT, frame.fin, frame.data)
            if data is not None:
                return self.session.receive(data, time.monotonic(), time.time())
        return []

    # ------------------------------------------------------------------ closing

    def _drain(self) -> None:
        """Stopping: wait briefly for the acks of what is in flight, then close with 1000."""
        deadline = time.monotonic() + DRAIN_S
        while self.session.unacked and time.monotonic() < deadline and \
                not self.t._hurry.is_set():
            self._wait_and_read(deadline - time.monotonic())

    def close(self) -> None:
        try:
            self.ws.close(status=p.CLOSE_NORMAL, timeout=1.0)
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            pass
        if self.session.unacked:
            log.info("%d messages were in flight; they stay queued and are sent again",
                     self.session.unacked)


def _has_unread(sock: Any, ws: Any) -> bool:
    """Bytes already read from the socket but not yet parsed: TLS's decrypted buffer, and
    websocket-client's own (it reads up to 16 KiB at a time, so a burst of acks sits there
    after the first is parsed, invisible to ``select``)."""
    pending = getattr(sock, "pending", None)
    return bool((pending and pending()) or ws.frame_buffer.recv_buffer)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


class _Reassembly:
    """Puts a fragmented message together, refusing one over ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: List[bytes] = []
        self.size = 0
        self.open = False

    def add(self, continuation: bool, fin: bool, data: bytes) -> Optional[bytes]:
        """The whole message once its last frame is in, else None."""
        if continuation != self.open:
            what = "a continuation frame without a start" if continuation else \
                "a new message inside a fragmented one"
            raise ConnectionLost(f"the server broke the fragmentation rules: {what}", 1002)
        self.size += len(data)
        if self.size > self.limit:
            raise ConnectionLost(f"the server sent a message of over {self.limit} bytes "
                                 "(in fragments)", p.CLOSE_TOO_BIG)
        if fin and not self.parts:
            self.size = 0
            return data
        self.parts.append(data)
        self.open = not fin
        if not fin:
            return None
        whole = b"".join(self.parts)
        self.parts, self.size = [], 0
        return whole


def _limit_frames(ws: Any, limit: int) -> None:
    """Refuse frames over ``limit`` bytes before their payload is read into memory.

    websocket-client has no such limit; its frame buffer reads the length, then
    the payload. We check in between.
    """
    buffer = ws.frame_buffer
    read_length = buffer.recv_length

    def checked_recv_length() -> None:
        read_length()
        if buffer.length is not None and buffer.length > limit:
            raise ConnectionLost(f"the server sent a frame of {buffer.length} bytes "
                                 f"(limit {limit})", p.CLOSE_TOO_BIG)

    buffer.recv_length = checked_recv_length


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


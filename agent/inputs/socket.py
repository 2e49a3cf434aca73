"""The ingest socket: applications on the device hand the agent samples over a Unix socket.

Section ``inputs.socket`` (:class:`SocketSection`). Rules:

* **The trust boundary.** A Unix stream socket, mode ``0660`` by default (never
  any access for others: the config refuses it), created under a temporary name,
  given its mode, then renamed into place, so it is never reachable with looser
  permissions. Who may write: the agent's user and group (docs/deploy.md). Every
  size and rate is bounded by a setting with a default (below); nothing a client
  sends reaches a shell, a file name or the log unescaped.
* **A line in, a line out.** Each line is one sample, JSON or InfluxDB line
  protocol (``inputs/_lines.py``). Each gets exactly one answer line, in order:
  ``ok <message id>`` once ``Outbox.put`` returned, that is once the sample is
  committed as durably as ``queue.durability`` promises (``normal``: a kill of
  the agent loses nothing; ``full``: nor a power cut), or ``error <field>:
  <what is wrong>``. A bad line costs only itself. A line longer than
  ``max_line_bytes`` is answered ``error line: ...`` at the limit, and what
  follows up to the next newline is read and dropped, never kept.
* **One thread, no polling.** ``nexus-input-socket`` runs one ``selectors``
  loop over the listening socket, the clients and a wake-up pipe (written at
  shutdown, :meth:`SocketInput.wake`). With no client it sleeps in ``select``
  without a timeout: an idle agent does not wake for the socket. Why one thread
  and not one per client: the store (``Outbox.put``) is serialised by the queue's
  lock anyway, so threads would add only memory and GIL hand-offs; every socket is
  non-blocking, so a client that does not read its answers, or sends half a
  line and stops, holds up nobody.
* **Bounded memory per client**: at most ``max_line_bytes`` plus one read
  (64 KiB) of input and ``OUT_LIMIT`` of unsent answers. A client that does not
  read its answers is not read from until it does (its own backpressure); one
  silent for ``idle_timeout_s`` is closed. ``max_clients`` at once; the next is
  answered ``error clients: ...`` and closed.
* **Fairness** (a flooding client never starves the system input): per source
  at most ``max_samples_per_s`` samples a second (a token bucket with a second's
  burst; over it: ``error rate: ...``, the line is not stored, the client
  retries); and the socket takes samples only while the outbox is less than
  ``queue_share`` full (of ``queue.max_bytes``, whatever fills it; over it,
  when the server has been unreachable for long: ``error queue: ...``): the
  rest stays for the system input's samples and command results, which the
  outbox would otherwise drop oldest-first to make room. On the wire, live
  records waiting together go as one batch when the server offers batches
  (``sendplan.py``), so a system sample waits behind at most a batch of an
  application's samples.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..errors import ConfigError, ProtocolError
from . import CountingInput, InputEnv, Store
from . import _lines, _settings

SECTION = "inputs.socket"
SOURCE = "socket"  # the input's own name (its thread, its health); samples carry theirs
FILENAME = "ingest.sock"
READ_BYTES = 65536
OUT_LIMIT = 65536  # unsent answers per client before it is no longer read from
MAX_PATH_BYTES = 107  # sun_path
MAX_SOURCES_TRACKED = 4096  # rate buckets kept; idle full ones are forgotten past this
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")

log = logging.getLogger("nexus.inputs.socket")


@dataclass(frozen=True)
class SocketSection:
    path: Optional[str] = None  # None: $RUNTIME_DIRECTORY/ingest.sock, else state_dir's
    mode: int = 0o660
    max_line_bytes: int = 65536
    max_clients: int = 16
    max_samples_per_s: float = 1000.0  # per source
    queue_share: float = 0.8  # samples taken while the outbox is less full than this
    idle_timeout_s: float = 300.0


_DEFAULTS = SocketSection()


def check(raw: object, key: str, base_dir: str) -> SocketSection:
    values = _settings.mapping(raw, key, ("path", "mode", "max_line_bytes", "max_clients",
                                          "max_samples_per_s", "queue_share",
                                          "idle_timeout_s"))
    path = None
    if "path" in values:
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(
            _settings.text(values["path"], f"{key}.path"))))
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            raise ConfigError(f"{key}.path", f"is longer than the {MAX_PATH_BYTES} bytes a "
                              "Unix socket's path may have")
    return SocketSection(
        path=path,
        mode=_mode(values.get("mode", "0660"), f"{key}.mode"),
        max_line_bytes=_settings.number(values.get("max_line_bytes", _DEFAULTS.max_line_bytes),
                                        f"{key}.max_line_bytes", 256, 1 << 20, integer=True),
        max_clients=_settings.number(values.get("max_clients", _DEFAULTS.max_clients),
                                     f"{key}.max_clients", 1, 1024, integer=True),
        max_samples_per_s=_settings.number(values.get("max_samples_per_s",
                                                      _DEFAULTS.max_samples_per_s),
                                           f"{key}.max_samples_per_s", 0.01, 1e6),
        queue_share=_settings.number(values.get("queue_share", _DEFAULTS.queue_share),
                                     f"{key}.queue_share", 0.05, 1.0),
        idle_timeout_s=_settings.number(values.get("idle_timeout_s", _DEFAULTS.idle_timeout_s),
                                        f"{key}.idle_timeout_s", 1, 86400))


def _mode(value: object, key: str) -> int:
    """``"0660"`` (a string, as YAML would otherwise read 0660 as octal or not), or the
    number itself; never any permission for others."""
    if isinstance(value, str) and re.match(r"^0?[0-7]{3}$", value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        mode = value
    else:
        raise ConfigError(key, 'must be an octal mode in quotes, such as "0660"')
    if mode & 0o007:
        raise ConfigError(key, f"{mode:04o} lets every local user write samples; give "
                          "access through the group instead (0660)")
    if not mode & 0o200:
        raise ConfigError(key, f"{mode:04o} does not let the agent's own user write")
    return mode


def default_path(state_dir: str) -> str:
    """Where the socket is when ``path`` is not set: systemd's RuntimeDirectory (tmpfs,
    gone at stop), else ``state_dir``."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime or state_dir, FILENAME)


# --------------------------------------------------------------------------- the listener


def listen(path: str, mode: int, key: str) -> socket.socket:
    """A listening, non-blocking socket at ``path`` with ``mode``; ConfigError naming
    ``key`` when it cannot be (a path that is something else, a folder this user cannot
    write, a socket another process listens on). A stale socket (an agent that was
    killed) is replaced."""
    folder = os.path.dirname(path) or "."
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise ConfigError(key, f"cannot look at {path}: {exc.strerror}") from None
    if found is not None:
        if not stat.S_ISSOCK(found.st_mode):
            raise ConfigError(key, f"{path} exists and is not a socket; remove it or set "
                              "another path")
        if _listening(path):
            raise ConfigError(key, f"another process listens on {path}")
    try:
        os.makedirs(folder, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create the folder {folder}: {exc.strerror}") from None
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{folder} is not a folder this user (uid {os.geteuid()}) "
                          "can write")
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _unlink(temporary)
        # Bound under a temporary name, given its mode, then renamed: the socket never
        # exists under its own name with the umask's permissions.
        sock.bind(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        _unlink(temporary)
        raise ConfigError(key, f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- clients


class RateLimit:
    """A token bucket per source: ``rate`` a second, a second's worth of burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: Dict[str, Tuple[float, float]] = {}  # source -> (tokens, at)

    def take(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.get(source, (self.rate, now))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        if len(self._buckets) >= MAX_SOURCES_TRACKED and source not in self._buckets:
            self._forget(now)
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def _forget(self, now: float) -> None:
        """Drop the buckets that have refilled (forgetting them changes nothing)."""
        for name, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.rate:
                del self._buckets[name]


class _Client:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.skipping = False  # inside a line over the limit: dropped up to its newline
        self.eof = False  # the client shut its writing side: answer what came, then close
        self.active = now
        self.events = selectors.EVENT_READ


def _answer_text(text: str) -> bytes:
    """One answer line: nothing a client sent can add a line or a terminal escape."""
    return (_UNPRINTABLE.sub("?", text)[:1000] + "\n").encode("utf-8", "replace")


class SocketInput(CountingInput):
    """See the module docstring."""

    def __init__(self, section: SocketSection, path: str, queue_fill: Callable[[], float],
                 on_fact: Callable[[], None]) -> None:
        super().__init__(SOURCE, SECTION, on_fact)
        self.settings = section
        self.path = path
        self.queue_fill = queue_fill
        self.listener = listen(path, section.mode, f"{SECTION}.path")
        self._inode = os.stat(path).st_ino
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.rate = RateLimit(section.max_samples_per_s)
        self.clients: Dict[int, _Client] = {}
        self._sel: Optional[selectors.BaseSelector] = None
        self._closed = False

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # full: a wake-up is pending; closed: the loop has ended

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, store: Store) -> None:
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not stop.is_set():
                for key, events in sel.select(self._timeout(time.monotonic())):
                    if key.data == "listen":
                        self._accept(time.monotonic())
                    elif key.data == "wake":
                        _drain(self._wake_r)
                    else:
                        self._serve_guarded(key.data, events, store)
                self._close_idle(time.monotonic())
        finally:
            self.close()

    def _timeout(self, now: float) -> Optional[float]:
        """None (sleep until something happens) without clients: no polling when idle."""
        if not self.clients:
            return None
        oldest = min(c.active for c in self.clients.values())
        return max(0.0, oldest + self.settings.idle_timeout_s - now)

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client is left in the backlog
                log.warning("ingest socket: cannot accept a client: %s", exc.strerror)
                return
            sock.setblocking(False)
            if len(self.clients) >= self.settings.max_clients:
                _turn_away(sock, f"error clients: {self.settings.max_clients} clients are "
                           f"connected already ({SECTION}.max_clients)")
                continue
            client = _Client(sock, now)
            self.clients[sock.fileno()] = client
            assert self._sel is not None
            self._sel.register(sock, selectors.EVENT_READ, client)

    def _serve_guarded(self, client: _Client, events: int, store: Store) -> None:
        """One client's turn; a bug it triggers costs that client its connection, never
        the input its thread (which the watchdog would take for a stuck agent)."""
        try:
            self._serve(client, events, store)
        except Exception:  # noqa: BLE001 - one client must not end the ingest socket
            log.exception("ingest socket: a client's turn failed; that client is closed")
            self._drop(client)

    def _serve(self, client: _Client, events: int, store: Store) -> None:
        client.active = time.monotonic()
        try:
            if events & selectors.EVENT_READ:
                self._read(client)
            self._answer_lines(client, store)
            if client.outbox:
                sent = client.sock.send(client.outbox)
                del client.outbox[:sent]
                if not client.outbox:
                    self._answer_lines(client, store)  # lines held back for the answers
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the client went away (EPIPE, ECONNRESET)
            self._drop(client)
            return
        if client.eof and not client.outbox and b"\n" not in client.inbox:
            self._drop(client)
            return
        self._watch(client)

    def _read(self, client: _Client) -> None:
        data = client.sock.recv(READ_BYTES)
        if not data:
            client.eof = True
            if client.inbox and not client.skipping:
                client.inbox += b"\n"  # a last line without its newline is still a line
            return
        if client.skipping:
            end = data.find(b"\n")
            if end < 0:
                return  # still inside the long line: dropped, never kept
            data, client.skipping = data[end + 1:], False
        client.inbox += data  # at most max_line_bytes + READ_BYTES: see _answer_lines

    def _too_long(self) -> bytes:
        self._refuse()
        return _answer_text(f"error line: longer than {self.settings.max_line_bytes} bytes "
                            f"({SECTION}.max_line_bytes); skipped to the next newline")

    def _answer_lines(self, client: _Client, store: Store) -> None:
        """Answer the complete lines received, in order, while the answers fit."""
        while len(client.outbox) < OUT_LIMIT:
            end = client.inbox.find(b"\n")
            if end < 0:
                if len(client.inbox) > self.settings.max_line_bytes:
                    # The limit reached without a newline: answered now, never kept; what
                    # follows is dropped up to the next newline (_read).
                    client.outbox += self._too_long()
                    client.inbox.clear()
                    client.skipping = not client.eof
                return
            line = bytes(client.inbox[:end])
            del client.inbox[:end + 1]
            if len(line) > self.settings.max_line_bytes:
                client.outbox += self._too_long()
            else:
                client.outbox += _answer_text(self.handle(line, store, time.time(),
                                                          time.monotonic()))

    def handle(self, line: bytes, store: Store, now: float, clock: float) -> str:
        """The answer to one line (without its newline): ``ok <id>`` or ``error ...``."""
        try:
            sample = _lines.parse(line.decode("utf-8").rstrip("\r"), now)
        except UnicodeDecodeError:
            self._refuse()
            return "error line: not UTF-8 text"
        except _lines.LineError as exc:
            self._refuse()
            return f"error {exc.field}: {exc.reason}"
        if not self.rate.take(sample.source, clock):
            self._refuse()
            return (f"error rate: source {sample.source} is over "
                    f"{self.settings.max_samples_per_s:g} samples a second "
                    f"({SECTION}.max_samples_per_s); not stored, send it again later")
        if self.queue_fill() >= self.settings.queue_share:
            self._refuse()
            return (f"error queue: the outbox is {self.settings.queue_share:.0%} full "
                    f"({SECTION}.queue_share of queue.max_bytes; is the server unreachable?); "
                    "the rest is kept for the device's own samples: not stored, send it "
                    "again later")
        try:
            msg_id = self.store_one(store, sample)
        except (ProtocolError, ValueError) as exc:  # over the wire's limits
            self._refuse()
            return f"error line: cannot be sent ({exc})"
        if msg_id is None:
            return "error store: the outbox cannot store samples now (disk full or failing?)"
        return f"ok {msg_id}"

    def _watch(self, client: _Client) -> None:
        """Read while the answers are sent and no whole line waits; write while answers
        wait. A client that does not read is not read from (its own backpressure)."""
        events = 0
        if not client.eof and len(client.outbox) < OUT_LIMIT and b"\n" not in client.inbox:
            events |= selectors.EVENT_READ
        if client.outbox:
            events |= selectors.EVENT_WRITE
        if events == 0:  # only when it shut its side with answers pending: not reachable
            events = selectors.EVENT_WRITE
        if events != client.events:
            assert self._sel is not None
            self._sel.modify(client.sock, events, client)
            client.events = events

    def _close_idle(self, now: float) -> None:
        for client in [c for c in self.clients.values()
                       if now - c.active >= self.settings.idle_timeout_s]:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        if self._sel is not None:
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()

    def close(self) -> None:
        """Close every client and the listener, and remove the socket if it is still ours
        (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for client in list(self.clients.values()):
            self._drop(client)
        if self._sel is not None:
            self._sel.close()
        self.listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        # The wake-up pipe stays open until the process ends, like the service's look
        # pipe: the main thread may still write to it, and a closed descriptor's number
        # could by then belong to another file.


def _turn_away(sock: socket.socket, answer: str) -> None:
    """Answer one line and close: what the client sent already is read and dropped first,
    so the close is a FIN and the answer arrives (unread data would make it a reset)."""
    try:
        sock.send(_answer_text(answer))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(READ_BYTES)
    except OSError:
        pass
    sock.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def build(section: SocketSection, env: InputEnv) -> SocketInput:
    path = section.path or default_path(env.state_dir)
    return SocketInput(section, path, env.queue_fill, env.on_fact)

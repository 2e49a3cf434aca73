"""Runs one argv, never through a shell, and reports what happened.

Rules:

* ``subprocess.Popen(argv)`` with ``shell`` left False: the argv from the
  allow-list is executed as it is, and nothing in it is interpreted.
* The child gets its own session and process group (``start_new_session``), a
  clean environment (``PATH`` and ``LANG`` only), ``/`` as working directory,
  no stdin, and no file descriptors but its pipes. Nothing of these comes from
  the server.
* At the timeout the whole process group gets SIGTERM, then SIGKILL one second
  later, so children die with their parent. What a finished command leaves
  running in its group is ended the same way: a command is not a way to start
  daemons. A child that leaves the group on
  purpose (``setsid``) escapes this; systemd's cgroup still ends it when the
  service stops.
* stdout and stderr are read as they come (the child never blocks on a full
  pipe) and kept up to ``max_output_bytes`` each; the rest is counted and
  dropped, and the kept text ends with a marker saying how much was cut.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8"}
KILL_GRACE_S = 1.0
LINGER_S = 0.5  # how long to keep reading after the child exits (its children may hold the pipe)


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | timed_out
    exit_code: Optional[int]
    stdout: str
    stderr: str
    duration_ms: int


class _Capture:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        text = self.kept.decode("utf-8", "replace")
        if self.dropped:
            text += f"\n[truncated: {self.dropped} more bytes]"
        return text


def run(argv: Sequence[str], timeout_s: float, max_output_bytes: int,
        user: Optional[str] = None) -> Outcome:
    """Run ``argv`` to completion or timeout; never raises for the child's own failures."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv from the allow-list, no shell
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=dict(CLEAN_ENV), cwd="/", close_fds=True,
            start_new_session=True, user=user)
    except OSError as exc:
        return Outcome("failed", None, "", f"cannot start {argv[0]}: {exc.strerror}",
                       _ms_since(start))
    captures = _read_until_exit(proc, start + timeout_s, max_output_bytes)
    timed_out = proc.returncode is None
    code = proc.returncode
    _kill_group(proc)  # at the timeout; or what the command left behind in its group
    status = "timed_out" if timed_out else ("succeeded" if code == 0 else "failed")
    return Outcome(status, None if timed_out else code, captures["stdout"].text(),
                   captures["stderr"].text(), _ms_since(start))


def _read_until_exit(proc: subprocess.Popen, deadline: float,
                     limit: int) -> Dict[str, _Capture]:
    captures = {"stdout": _Capture(limit), "stderr": _Capture(limit)}
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    exited_at: Optional[float] = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if now >= deadline or (exited_at is not None and now - exited_at > LINGER_S):
                break
            for key, _ in sel.select(timeout=min(0.1, max(deadline - now, 0))):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    captures[key.data].add(chunk)
                else:
                    sel.unregister(key.fileobj)
        if exited_at is None and time.monotonic() < deadline:
            proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return captures


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                # The leader is gone; children that ignored SIGTERM still get SIGKILL.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def describe(argv: List[str]) -> str:
    """A log-safe one-line rendering of argv."""
    return " ".join(repr(a) if not a or any(c.isspace() for c in a) else a for a in argv)

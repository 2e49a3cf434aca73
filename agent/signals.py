"""Signals that can never hang a process: handlers only record, the main loop acts.

Why: a Python signal handler runs on the main thread between two bytecodes,
possibly in the middle of ``Event.set()`` or a logging call on that same
thread. ``Event.set`` takes a non-reentrant lock, so a handler that calls it
can deadlock against the code it interrupted (seen here: SIGINT then SIGTERM
0.1 ms apart hung about 3 % of runs). So:

* the handler only appends the signal number to a ``collections.deque``
  (``append`` is one C call: no Python-level lock, nothing to re-enter);
* ``signal.set_wakeup_fd`` makes the interpreter's C-level handler write a
  byte to a non-blocking pipe, so :meth:`SignalInbox.wait` can ``select`` on
  it and return at once, even for a signal that arrives just before the
  ``select`` (no lost wake-up, no polling);
* the main loop calls :meth:`wait` and acts on the numbers it returns.

One :class:`SignalInbox` per process, created on the main thread, as early as
possible (before anything slow), so a signal in the first moments after exec
is recorded rather than taking its default action. A program keeps it until
it exits: the kernel applies a signal's disposition when it delivers it, and
the thread it picks may run late, so a second signal sent a microsecond after
the first can arrive after the stop is done; restoring the default handler
then would kill the process on its way out (seen here: 1 run in 10 of
nexus-server exited -15). ``close()`` restores the previous handlers, for
tests and embedders; it is safe to call twice.
"""

from __future__ import annotations

import collections
import os
import select
import signal
from typing import Deque, Dict, Iterable, List, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DAEMON_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)  # SIGHUP: reload


class SignalInbox:
    def __init__(self, signums: Iterable[int]) -> None:
        self._pending: Deque[int] = collections.deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old: Dict[int, object] = {}
        for signum in signums:
            self._old[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        # Nothing else here, ever: no lock, no Event, no logging (see the module docstring).
        self._pending.append(signum)

    def wait(self, timeout: Optional[float], also: Optional[int] = None) -> List[int]:
        """The signals received since the last call, waiting up to ``timeout`` s for one.

        ``also``: a non-blocking pipe's read end that other threads write to when the
        caller should look at something (the agent's status facts); the wait ends when
        it is readable too, and it is emptied."""
        if not self._pending and self._r >= 0:
            fds = [self._r] if also is None else [self._r, also]
            try:
                select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; belt and braces
                pass
            self._drain()
        if also is not None:
            _drain(also)
        out: List[int] = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    def _drain(self) -> None:
        _drain(self._r)

    def close(self) -> None:
        """Restore the previous handlers and wake-up fd; safe to call twice."""
        if self._r < 0:
            return
        for signum, old in self._old.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)
        self._r = self._w = -1


def _drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def leave(code: int) -> None:
    """End a program that has finished its own shutdown, without interpreter finalization.

    Finalization puts the default handlers back, and a stop signal that the kernel
    delivers late (a second one sent right after the first) would then kill the
    process with that signal instead of the exit code it chose (seen: nexus-server
    exited -15 in 1 run of 5 after SIGINT then SIGTERM). Everything is closed by then;
    only the standard streams and the log handlers need flushing.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)

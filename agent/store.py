"""Opening the agent's SQLite files (``outbox.db``, ``commands.db``) without losing them.

Rules, in the order :func:`open_db` applies them:

* **Locked or busy** (another process holds the file): waited out for up to
  ``lock_wait_s``, said once in the log; after that :class:`StoreError` with
  ``temporary=True`` (the agent exits 75, EX_TEMPFAIL, and systemd tries
  again later). The file is never touched: the data in it is intact.
* **Cannot be opened or written** (read-only ``state_dir``, permissions, an
  I/O error, a full disk): :class:`StoreError` naming the file and the reason;
  never moved aside. Read-only and permission problems are deployment errors
  (``temporary=False``: exit 78, no crash loop); I/O errors may pass.
* **Corrupt** (SQLite says ``SQLITE_CORRUPT``/``SQLITE_NOTADB``, which Python
  raises as a plain ``sqlite3.DatabaseError``, or ``PRAGMA quick_check`` is
  not ``ok``): the file and its ``-wal``/``-shm`` are renamed to
  ``<file>.corrupt-<time>``, logged as an error, and a fresh file is made.
  Only this case loses what was in the file, and it says so.

One agent per ``state_dir``, in every ``queue.lock`` mode: :class:`DirLock` holds
``flock`` on ``state_dir/agent.lock`` for the life of the process (the kernel
drops it when the process dies, however it dies), with the holder's pid in the
file for the message a second agent gets: the same wait and ``StoreError``
(exit 75) as a locked file. SQLite's own locks cannot say this: with
``shared`` two agents would both run, collide on every seq and connect as the
same device.

``sqlite3.OperationalError`` is a subclass of ``DatabaseError``, which is why
corruption is recognised by the exact type and never by ``isinstance``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from typing import Callable, Optional, Union

from .errors import NexusError

log = logging.getLogger("nexus.store")

LOCK_WAIT_S = 10.0  # under systemd's TimeoutStartSec and TimeoutStopSec
CACHE_KIB = 256  # SQLite's page cache per connection (its default is 2,000 KiB)
_LOCKED = ("locked", "busy")
_DEPLOYMENT = ("readonly", "read-only", "unable to open", "permission")
_SYNCHRONOUS = {"FULL": "FULL", "NORMAL": "NORMAL"}  # no other value reaches a PRAGMA


class StoreError(NexusError):
    """A state file that cannot be used now; ``temporary`` when trying later may work."""

    def __init__(self, path: str, reason: str, temporary: bool) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.temporary = temporary


def is_corruption(exc: BaseException) -> bool:
    """True only for SQLite's own verdict that the file is damaged or not a database."""
    return type(exc) is sqlite3.DatabaseError


def is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc).lower() for word in _LOCKED)


def _connect(path: str, busy_timeout_s: float, synchronous: str,
             page_size: Optional[int], exclusive: bool) -> sqlite3.Connection:
    # isolation_level=None: callers issue BEGIN/COMMIT themselves.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                         timeout=busy_timeout_s)
    try:
        if exclusive:
            # Before the first access: SQLite then keeps the WAL index in this process's
            # memory (no -shm file, whose pages the kernel writes back every ~30 s) and
            # holds the file's lock from the first read until close. Another process
            # cannot read the file meanwhile; one that tries gets "database is locked".
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        if page_size:
            # Only a new file takes it (before WAL mode is set); an existing one keeps its own.
            db.execute(f"PRAGMA page_size={int(page_size)}")
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced (survives a power cut). NORMAL (WAL): a commit is in
        # the OS page cache when it returns, which survives a killed process; the WAL is
        # synced at checkpoints (never corrupt), and the outbox syncs it on a timer.
        db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
        # The queue is read front to back and written at the end: a small page cache does
        # as well as SQLite's default 2 MB, which a long backlog would fill (RAM on a Pi).
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        problems = [row[0] for row in db.execute("PRAGMA quick_check(20)")]
        if problems != ["ok"] and not all(_row_damage(line) for line in problems):
            raise sqlite3.DatabaseError("quick_check failed: " + "; ".join(problems)[:300])
    except BaseException:
        db.close()
        raise
    return db


def _row_damage(line: str) -> bool:
    """A quick_check finding about a cell (a NULL where NOT NULL is declared), not about
    the file's structure: the row is set aside when it is read, the file is kept."""
    return line.startswith("NULL value in ")


def open_db(path: str, setup: Callable[[sqlite3.Connection], object],
            lock_wait_s: float = LOCK_WAIT_S, what: str = "file", synchronous: str = "FULL",
            page_size: Optional[int] = None, exclusive: bool = False) -> sqlite3.Connection:
    """A checked connection to ``path`` with ``setup`` (schema, meta rows) applied.

    ``synchronous`` is FULL (every commit synced) or NORMAL; ``page_size`` applies to a
    file created now; ``exclusive``: this connection alone has the file until it closes
    (SQLite's EXCLUSIVE locking mode, the WAL index in memory).

    Raises StoreError for what must not be thrown away (a lock, an unwritable or failing
    disk); moves a corrupt file aside and starts afresh (logged).
    """
    deadline = time.monotonic() + lock_wait_s
    waiting_logged = False
    replaced = 0  # corrupt files moved aside by this call
    while True:
        try:
            db = _connect(path, min(1.0, lock_wait_s), synchronous, page_size, exclusive)
            try:
                setup(db)
            except BaseException:
                db.close()
                raise
            if waiting_logged:
                log.warning("%s %s: the lock was released; carrying on with its data", what,
                            path)
            return db
        except UnicodeDecodeError as exc:
            # SQLite's own message was not UTF-8: a name in the schema is damaged.
            if replaced:
                raise StoreError(path, f"a fresh file fails too: {exc}", temporary=True) from None
            set_aside_corrupt(path, f"damaged schema text ({exc})", what)
            replaced += 1
            continue
        except sqlite3.DatabaseError as exc:
            if is_locked(exc):
                if time.monotonic() >= deadline:
                    raise StoreError(path, f"locked by another process for over "
                                     f"{lock_wait_s:g} s (the file is left as it is)",
                                     temporary=True) from None
                if not waiting_logged:
                    log.warning("%s %s is locked by another process; waiting up to %g s",
                                what, path, lock_wait_s)
                    waiting_logged = True
                continue
            if not is_corruption(exc):
                reason = str(exc)
                deployment = any(word in reason.lower() for word in _DEPLOYMENT)
                raise StoreError(path, f"cannot open or write it: {reason}"
                                 + (" (is state_dir writable by this user?)" if deployment
                                    else ""), temporary=not deployment) from None
            if replaced:
                raise StoreError(path, f"a fresh file fails too: {exc}", temporary=True) from None
            set_aside_corrupt(path, str(exc), what)
            replaced += 1
            # Loop: the fresh file opens like any other (and may itself be locked or fail).


class BadText(bytes):
    """A TEXT cell that is not UTF-8, as its bytes (see :func:`text_factory`)."""


def text_factory(data: bytes) -> Union[str, BadText]:
    """A connection's text conversion that never fails a query: a cell that is not UTF-8
    (a flipped serial-type bit turns a BLOB into such TEXT; quick_check does not see it)
    comes back as BadText. sqlite3's default raises OperationalError for the whole query,
    which would stop every read of a queue at the damaged row."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return BadText(data)


class DirLock:
    """``flock`` on ``<state_dir>/agent.lock``, held until :meth:`close` or the process ends."""

    NAME = "agent.lock"

    def __init__(self, state_dir: str, wait_s: float = LOCK_WAIT_S) -> None:
        self.path = os.path.join(state_dir, self.NAME)
        # O_CLOEXEC: a command the agent runs must not inherit (and outlive us holding) it.
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                          0o600)
        try:
            self._take(wait_s)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()}\n".encode(), 0)
        except BaseException:
            self.close()
            raise

    def _take(self, wait_s: float) -> None:
        assert self._fd is not None
        deadline = time.monotonic() + wait_s
        logged = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or \
                    "pid unknown"
                if time.monotonic() >= deadline:
                    raise StoreError(self.path, f"another nexus-agent ({holder}) uses this "
                                     f"state_dir; waited {wait_s:g} s", temporary=True) from None
                if not logged:
                    log.warning("%s: another nexus-agent (%s) uses this state_dir; waiting up "
                                "to %g s", self.path, holder, wait_s)
                    logged = True
                time.sleep(0.1)  # flock has no timed wait; ten tries a second for 10 s at most

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def set_aside_corrupt(path: str, reason: str, what: str) -> Optional[str]:
    """Rename a corrupt ``path`` (and its -wal/-shm) out of the way; the new name."""
    target = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    moved = False
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, target + suffix)
            moved = True
    log.error("%s %s is corrupt (%s): moved it to %s and started a fresh one; what it held "
              "is not used", what, path, reason, target)
    return target if moved else None

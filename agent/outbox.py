"""The disk-backed outbox: every message lives here from the moment it exists
until the server acknowledges it.

Design
------
Constraints: a device may be offline for hours, reboot, lose power or be
SIGKILLed at any instant, and must lose nothing it had stored; the disk is an
SD card that must not fill up; a corrupt file must never become a crash loop.

On-disk layout: one SQLite database ``outbox.db`` in ``state_dir``, WAL mode,
``synchronous=FULL`` (a commit is on disk before ``put`` returns: one fsync per
message, cheap at telemetry rates, and the only setting that survives power
loss as well as a killed process).

* ``messages(seq, id, type, ts, payload, size)``: ``seq`` is the order of
  creation and never reused (``AUTOINCREMENT``); ``id`` is assigned once, as
  ``<epoch>-<seq>``, and sent unchanged on every resend, so the server can drop
  duplicates. ``epoch`` is random per database file, so the ids of a fresh file
  (after corruption) cannot collide with those of the old one.
* ``meta(key, value)``: ``epoch`` and the running ``dropped`` count.

What an acknowledgement means: the server's ``ack`` for an id says it has the
message; only then is the row deleted. Delivery is therefore at-least-once.

Bounds: the sum of ``size`` (bytes of the payload) stays under ``max_bytes``;
a ``put`` that would exceed it first deletes the oldest rows and adds them to
``dropped``. The daemon never stops for a full queue. Nothing enters that the
protocol cannot carry: a message whose wire text is over
``protocol.MAX_MESSAGE_BYTES`` is refused by ``put`` (LocalProtocolError).

Set aside: a message the server refuses for good (``INVALID_MESSAGE``, or a
connection it keeps closing while that message is the oldest in flight) is
moved by :meth:`set_aside` to the ``set_aside`` table with the reason, so it
never blocks the messages behind it. The last ``SET_ASIDE_KEEP`` are kept for
inspection; the running count is ``meta.set_aside``.

Opening: ``store.open_db`` decides (a lock is waited out, an unwritable or
failing disk is reported, only real corruption moves the file aside to
``outbox.db.corrupt-<time>`` and starts a fresh one).

Threads: only this object touches the database; its methods take one lock, so
the sampler (``put``), the transport (``read_after``, ``ack``) and the status
reporter (``stats``) may call it from their own threads.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Mapping, Optional

from . import protocol as p
from . import store

log = logging.getLogger("nexus.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    ts TEXT NOT NULL,
    payload TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS set_aside (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    ts TEXT NOT NULL,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""
SET_ASIDE_KEEP = 100


@dataclass(frozen=True)
class Record:
    """One stored message; ``payload`` is its JSON text, exactly as it will be sent."""

    seq: int
    id: str
    type: str
    ts: str
    payload: str

    def envelope_text(self) -> str:
        """The wire text, built without re-encoding the payload."""
        return p.envelope_text(self.type, self.id, self.ts, self.payload)


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    oldest_created: Optional[float]
    dropped: int
    last_seq: int
    set_aside: int = 0


class Outbox:
    def __init__(self, state_dir: str, max_bytes: int, filename: str = "outbox.db",
                 lock_wait_s: float = store.LOCK_WAIT_S) -> None:
        self.path = os.path.join(state_dir, filename)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._db = store.open_db(self.path, self._setup, lock_wait_s, "outbox")
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._epoch = self._meta("epoch")
        self._dropped = int(self._meta("dropped"))
        self._set_aside = int(self._meta("set_aside"))
        self._last_seq = int(self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'messages'"
        ).fetchone()[0])
        if self._depth:
            log.info("outbox %s: resuming %d unacknowledged messages (%d bytes)", self.path,
                     self._depth, self._bytes)

    # ------------------------------------------------------------------ opening

    @classmethod
    def _setup(cls, db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        cls._init_meta(db)

    @staticmethod
    def _init_meta(db: sqlite3.Connection) -> None:
        db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(4),))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', '0')")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('set_aside', '0')")

    def _meta(self, key: str) -> str:
        return str(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. Caller holds self._lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ writing

    def put(self, type_: str, payload: Mapping[str, Any], ts: str,
            now: Optional[float] = None) -> Record:
        """Store a message durably and return it with its permanent id.

        LocalProtocolError (nothing stored) when its wire text would be over the protocol's
        size limit: the server could never accept it, and it would block the queue.
        """
        text = p.dumps(payload)
        size = len(text.encode("utf-8"))
        created = time.time() if now is None else now
        with self._lock:
            seq = self._last_seq + 1
            msg_id = f"{self._epoch}-{seq}"
            p.envelope_text(type_, msg_id, ts, text)  # raises when over the limit
        with self._lock, self._transaction() as db:
            self._make_room(db, size)
            seq = self._last_seq + 1
            msg_id = f"{self._epoch}-{seq}"
            db.execute("INSERT INTO messages (seq, id, type, ts, payload, size, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (seq, msg_id, type_, ts, text, size, created))
            self._last_seq, self._depth, self._bytes = seq, self._depth + 1, self._bytes + size
        return Record(seq, msg_id, type_, ts, text)

    def _make_room(self, db: sqlite3.Connection, size: int) -> None:
        """Delete the oldest rows until ``size`` more bytes fit under max_bytes."""
        while self._depth and self._bytes + size > self.max_bytes:
            rows = db.execute("SELECT seq, size FROM messages ORDER BY seq LIMIT 64").fetchall()
            excess = self._bytes + size - self.max_bytes
            freed, last = 0, rows[-1][0]
            for seq, row_size in rows:
                freed, last = freed + row_size, seq
                if freed >= excess:
                    break
            count = db.execute("DELETE FROM messages WHERE seq <= ?", (last,)).rowcount
            self._depth, self._bytes = self._depth - count, self._bytes - freed
            self._dropped += count
            db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (str(self._dropped),))
            log.warning("outbox full (%d bytes max): dropped the %d oldest messages "
                        "(%d dropped in all)", self.max_bytes, count, self._dropped)

    def ack(self, ids: Iterable[str]) -> int:
        """Delete acknowledged messages (unknown ids are ignored); how many were deleted."""
        unique = list(dict.fromkeys(ids))
        deleted = 0
        with self._lock, self._transaction() as db:
            for start in range(0, len(unique), 500):  # old SQLite allows 999 variables
                chunk = unique[start:start + 500]
                marks = ",".join("?" * len(chunk))
                freed, count = db.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages WHERE id IN ({marks})",
                    chunk).fetchone()
                db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                self._bytes -= int(freed)
                deleted += int(count)
            self._depth -= deleted
        return deleted

    def set_aside(self, msg_id: str, reason: str) -> bool:
        """Move one message out of the queue into ``set_aside`` (see the module docstring);
        False when it is no longer queued."""
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT seq, id, type, ts, payload, size FROM messages WHERE id = ?",
                             (msg_id,)).fetchone()
            if row is None:
                return False
            db.execute("INSERT OR REPLACE INTO set_aside VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (*row[:5], reason[:500], time.time()))
            db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
            db.execute("DELETE FROM set_aside WHERE seq NOT IN "
                       "(SELECT seq FROM set_aside ORDER BY seq DESC LIMIT ?)", (SET_ASIDE_KEEP,))
            self._set_aside += 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'set_aside'", (str(self._set_aside),))
            self._depth, self._bytes = self._depth - 1, self._bytes - int(row[5])
        return True

    # ------------------------------------------------------------------ reading

    def read_after(self, seq: int, limit: int, upto: Optional[int] = None) -> List[Record]:
        """Up to ``limit`` messages with ``seq`` above ``seq`` (and at most ``upto``), in order."""
        query = "SELECT seq, id, type, ts, payload FROM messages WHERE seq > ?"
        args: List[Any] = [seq]
        if upto is not None:
            query += " AND seq <= ?"
            args.append(upto)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [Record(*row) for row in rows]

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = self._db.execute(
                "SELECT created FROM messages ORDER BY seq LIMIT 1").fetchone()
            return OutboxStats(self._depth, self._bytes, oldest[0] if oldest else None,
                               self._dropped, self._last_seq, self._set_aside)

    def close(self) -> None:
        """Checkpoint and close; safe to call twice."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a checkpoint is an optimisation; the WAL is replayed on open
            self._db.close()
            self._db = None  # type: ignore[assignment]

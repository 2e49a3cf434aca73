"""The disk-backed outbox: every message lives here from the moment it exists
until the server acknowledges it.

Design
------
Constraints: a device may be offline for hours, reboot, lose power or be
SIGKILLed at any instant, and must lose nothing it had stored; the disk is an
SD card that must not fill up; a corrupt file must never become a crash loop.

On-disk layout: one SQLite database ``outbox.db`` in ``state_dir``, WAL mode,
1 KiB pages (a WAL frame is one page: a sample of a few hundred bytes commits
one ~1 KiB frame instead of a 4 KiB one).

* ``messages(seq, type, ts, payload, size, created)``: ``seq`` is the order of
  creation (the rowid, no second index). A message's id is ``<epoch>-<seq>``,
  fixed at creation and sent unchanged on every resend, so the server can drop
  duplicates; ``ack`` and ``set_aside`` parse the seq back out of it (an id of
  another epoch or shape is unknown, and ignored). ``epoch`` is random per
  database file, so the ids of a fresh file (after corruption) cannot collide
  with those of the old one.
* ``meta(key, value)``: ``epoch``, the running ``dropped`` and ``set_aside``
  counts, and ``last_seq``. A seq is never reused, even after the table empties
  and the agent restarts: on open, the next seq follows both ``MAX(seq)`` and
  ``meta.last_seq``, and ``last_seq`` is written in the same transaction as any
  delete that removes the newest row (rare: a put's own delete of acked rows
  never does, since the row it inserts is newer). This replaces AUTOINCREMENT,
  which rewrote ``sqlite_sequence`` (one more page) on every insert.
* A file of the first schema (AUTOINCREMENT, a UNIQUE ``id`` column) is
  migrated on open in one transaction, keeping every message and its id, then
  rebuilt with 1 KiB pages (VACUUM) when nothing else has it open.

Durability (``queue.durability``):

* ``full``: ``synchronous=FULL``, every commit is fsynced before ``put``
  returns. A power cut loses nothing stored.
* ``normal`` (default): ``synchronous=NORMAL``. A commit is in the kernel's
  page cache when ``put`` returns, so a killed process (SIGKILL, OOM, a crash)
  loses nothing; the syncer thread fsyncs the WAL every ``sync_interval_s``
  (when something was written), so a power cut loses at most the messages
  stored in the last ``sync_interval_s``. SQLite syncs the WAL before each
  checkpoint and the database after it, so a power cut never corrupts the file.

Acknowledged rows are deleted lazily: ``ack`` takes them out of the queue at
once (they are never read or counted again) and the delete rides along in the
next ``put``'s transaction, so a sample costs one commit, not two. Acks that no
put carries are deleted by the syncer within ``sync_interval_s``, or at once
when ``ACK_FLUSH_AT`` are waiting, and by ``close``. A kill (or, with
``normal``, a power cut) before the delete only means the server gets those
messages again, under the same ids, and drops them.

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
``outbox.db.corrupt-<time>`` and starts a fresh one). A file that passes the
check at open but fails later (a bad sector read for the first time) is
treated the same way the moment SQLite reports it (``SQLITE_CORRUPT`` or
``SQLITE_NOTADB`` from any call): set aside, a fresh file, the messages it held
counted as ``dropped`` and logged with their number, ``generation`` bumped so
readers restart their cursors. It is never retried in a reconnect loop.

Threads: only this object touches the database; its methods take one lock, so
the sampler (``put``), the transport (``read_after``, ``ack``) and the status
reporter (``stats``) may call it from their own threads. Its own syncer thread
(``nexus-outbox-sync``) takes the same lock; the fsync itself runs outside it,
so a slow card never holds up a ``put``. ``close`` stops the syncer first.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, TypeVar

from . import protocol as p
from . import store

log = logging.getLogger("nexus.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
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
PAGE_SIZE = 1024
DURABILITIES = ("normal", "full")
SYNC_INTERVAL_S = 10.0
ACK_FLUSH_AT = 64  # acked rows waiting for a put before they are deleted on their own


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


F = TypeVar("F", bound=Callable[..., Any])


def _on_corruption(retry: bool, default: Any = None) -> Callable[[F], F]:
    """A public method that survives a file that turns out corrupt after opening: set the
    file aside (``Outbox._recover``), then call the method again (``retry``) or return
    ``default``. Any other error goes through as it is."""
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def guarded(self: Outbox, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.DatabaseError as exc:
                if not store.is_corruption(exc):
                    raise
                with self._lock:
                    self._recover(exc)
            return method(self, *args, **kwargs) if retry else default
        return guarded  # type: ignore[return-value]
    return wrap


class Outbox:
    def __init__(self, state_dir: str, max_bytes: int, filename: str = "outbox.db",
                 lock_wait_s: float = store.LOCK_WAIT_S, durability: str = "normal",
                 sync_interval_s: float = SYNC_INTERVAL_S) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self.path = os.path.join(state_dir, filename)
        self.max_bytes = max_bytes
        self.durability = durability
        self.sync_interval_s = sync_interval_s
        self._lock = threading.Lock()
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._lock_wait_s = lock_wait_s
        self.generation = 0  # +1 each time a corrupt file is replaced (cursors restart)
        self._db = self._open()
        self._load()
        self._unsynced = False  # committed since the WAL was last fsynced (normal only)
        self._put_since_sync = False
        self._sync_failing = False
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="nexus-outbox-sync",
                                        daemon=True)
        self._syncer.start()
        if self._depth:
            log.info("outbox %s: resuming %d unacknowledged messages (%d bytes)", self.path,
                     self._depth, self._bytes)

    # ------------------------------------------------------------------ opening

    def _open(self) -> sqlite3.Connection:
        return store.open_db(self.path, self._setup, self._lock_wait_s, "outbox",
                             synchronous="FULL" if self.durability == "full" else "NORMAL",
                             page_size=PAGE_SIZE)

    def _load(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) "
                               "FROM messages").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._epoch = self._meta("epoch")
        self._dropped = int(self._meta("dropped"))
        self._set_aside = int(self._meta("set_aside"))
        self._last_seq = max(int(row[2]), int(self._meta("last_seq")))
        self._acked: Dict[int, int] = {}  # seq -> size: acknowledged, not deleted yet

    def _recover(self, exc: BaseException) -> None:
        """The open file turned out corrupt: set it aside, go on with a fresh one, and say
        what was lost. Caller holds self._lock."""
        if self._db is None:
            return
        lost, dropped = self._depth, self._dropped
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        store.set_aside_corrupt(self.path, str(exc), "outbox")
        self._db = self._open()
        self._load()
        self._dropped = dropped + lost
        with self._transaction() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (str(self._dropped),))
        self.generation += 1
        log.error("outbox %s failed a read after opening (%s): the %d messages queued in it "
                  "are lost (counted as dropped); going on with a fresh file", self.path, exc,
                  lost)

    @classmethod
    def _setup(cls, db: sqlite3.Connection) -> None:
        migrated = _migrate_v1(db)
        db.executescript(SCHEMA)
        cls._init_meta(db)
        if migrated:
            _repage(db)

    @staticmethod
    def _init_meta(db: sqlite3.Connection) -> None:
        db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(4),))
        for key in ("dropped", "set_aside", "last_seq"):
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, '0')", (key,))

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
        self._unsynced = True

    def _seq_of(self, msg_id: str) -> Optional[int]:
        """The seq in an id of this file (``<epoch>-<seq>``); None for any other id."""
        epoch, _, seq = msg_id.partition("-")
        if epoch != self._epoch or not seq.isdigit() or len(seq) > 18:
            return None
        return int(seq)

    # ------------------------------------------------------------------ writing

    @_on_corruption(retry=True)
    def put(self, type_: str, payload: Mapping[str, Any], ts: str,
            now: Optional[float] = None) -> Record:
        """Store a message (see Durability in the module docstring) and return it with its
        permanent id.

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
        with self._lock:
            with self._transaction() as db:
                # Acked rows go in this same commit (one WAL frame for the insert and the
                # deletes); the new row is the newest, so meta.last_seq needs no update.
                self._delete_acked(db, newest_stays=True)
                self._make_room(db, size)
                seq = self._last_seq + 1
                msg_id = f"{self._epoch}-{seq}"
                db.execute("INSERT INTO messages (seq, type, ts, payload, size, created) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (seq, type_, ts, text, size, created))
            self._acked.clear()  # only once committed: a rollback keeps them to delete later
            self._last_seq, self._depth, self._bytes = seq, self._depth + 1, self._bytes + size
            self._put_since_sync = True
        return Record(seq, msg_id, type_, ts, text)

    def _make_room(self, db: sqlite3.Connection, size: int) -> None:
        """Delete the oldest rows until ``size`` more bytes fit under max_bytes.

        Caller has deleted the acked rows first, so every row seen here is queued."""
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

    def _delete_acked(self, db: sqlite3.Connection, newest_stays: bool) -> None:
        """Delete the acked rows; keep ``meta.last_seq`` when the newest row goes and no
        newer one is inserted in this transaction (ids are never reused)."""
        if not self._acked:
            return
        seqs = sorted(self._acked)
        for start in range(0, len(seqs), 500):  # old SQLite allows 999 variables
            chunk = seqs[start:start + 500]
            db.execute(f"DELETE FROM messages WHERE seq IN ({','.join('?' * len(chunk))})",
                       chunk)
        if not newest_stays and seqs[-1] == self._last_seq:
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(seqs[-1]),))

    def _flush_acked(self) -> None:
        """Delete the acked rows in a transaction of their own. Caller holds self._lock."""
        if self._acked:
            with self._transaction() as db:
                self._delete_acked(db, newest_stays=False)
            self._acked.clear()

    @_on_corruption(retry=False, default=0)
    def ack(self, ids: Iterable[str]) -> int:
        """Take acknowledged messages out of the queue (unknown ids are ignored); how many.

        They are deleted from the file later (see the module docstring)."""
        wanted = {seq for seq in map(self._seq_of, ids) if seq is not None}
        taken = 0
        with self._lock:
            seqs = sorted(wanted - set(self._acked))
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                rows = self._db.execute(
                    f"SELECT seq, size FROM messages WHERE seq IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
                for seq, size in rows:
                    if seq not in self._acked:
                        self._acked[seq] = size
                        self._depth, self._bytes = self._depth - 1, self._bytes - int(size)
                        taken += 1
            if len(self._acked) >= ACK_FLUSH_AT:
                self._flush_acked()
        return taken

    @_on_corruption(retry=False, default=False)
    def set_aside(self, msg_id: str, reason: str) -> bool:
        """Move one message out of the queue into ``set_aside`` (see the module docstring);
        False when it is no longer queued."""
        seq = self._seq_of(msg_id)
        with self._lock:
            if seq is None or seq in self._acked:
                return False
            with self._transaction() as db:
                row = db.execute("SELECT seq, type, ts, payload, size FROM messages "
                                 "WHERE seq = ?", (seq,)).fetchone()
                if row is None:
                    return False
                db.execute("INSERT OR REPLACE INTO set_aside VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (seq, msg_id, row[1], row[2], row[3], reason[:500], time.time()))
                db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                if seq == self._last_seq:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(seq),))
                db.execute("DELETE FROM set_aside WHERE seq NOT IN (SELECT seq FROM set_aside "
                           "ORDER BY seq DESC LIMIT ?)", (SET_ASIDE_KEEP,))
                self._set_aside += 1
                db.execute("UPDATE meta SET value = ? WHERE key = 'set_aside'",
                           (str(self._set_aside),))
                self._depth, self._bytes = self._depth - 1, self._bytes - int(row[4])
        return True

    # ------------------------------------------------------------------ syncing

    @_on_corruption(retry=False)
    def sync(self) -> None:
        """Delete acked rows that no put carried since the last call, then (``normal``)
        fsync the WAL if anything was committed since the last sync: after this returns,
        everything stored before it was called survives a power cut."""
        with self._lock:
            if self._db is None:
                return
            if not self._put_since_sync:
                self._flush_acked()
            self._put_since_sync = False
            unsynced, self._unsynced = self._unsynced, False
        if unsynced and self.durability == "normal":
            # Outside the lock: a put during the fsync sets _unsynced again, and the next
            # sync covers it. Our own descriptor: fsync flushes the file, not the descriptor.
            try:
                fd = os.open(self.path + "-wal", os.O_RDONLY)
            except FileNotFoundError:
                return  # checkpointed and removed: SQLite synced it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval_s):
            try:
                self.sync()
            except (OSError, sqlite3.Error) as exc:
                if not self._sync_failing:  # once until it works again
                    log.error("outbox %s: timed sync failed: %s (retried every %g s)",
                              self.path, exc, self.sync_interval_s)
                    self._sync_failing = True
                with self._lock:
                    self._unsynced = True  # try the fsync again next time
                continue
            if self._sync_failing:
                log.warning("outbox %s: timed sync works again", self.path)
                self._sync_failing = False

    # ------------------------------------------------------------------ reading

    @_on_corruption(retry=False, default=[])
    def read_after(self, seq: int, limit: int, upto: Optional[int] = None) -> List[Record]:
        """Up to ``limit`` queued messages with ``seq`` above ``seq`` (and at most ``upto``),
        in order."""
        query = "SELECT seq, type, ts, payload FROM messages WHERE seq > ?"
        args: List[Any] = [seq]
        if upto is not None:
            query += " AND seq <= ?"
            args.append(upto)
        with self._lock:
            if self._acked:  # at most ACK_FLUSH_AT
                query += f" AND seq NOT IN ({','.join('?' * len(self._acked))})"
                args.extend(self._acked)
            rows = self._db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [Record(row[0], f"{self._epoch}-{row[0]}", row[1], row[2], row[3])
                for row in rows]

    @_on_corruption(retry=True)
    def stats(self) -> OutboxStats:
        with self._lock:
            query = "SELECT created FROM messages"
            if self._acked:
                query += f" WHERE seq NOT IN ({','.join('?' * len(self._acked))})"
            oldest = self._db.execute(query + " ORDER BY seq LIMIT 1",
                                      list(self._acked)).fetchone()
            return OutboxStats(self._depth, self._bytes, oldest[0] if oldest else None,
                               self._dropped, self._last_seq, self._set_aside)

    def close(self) -> None:
        """Stop the syncer, delete acked rows, checkpoint and close; safe to call twice."""
        self._stop.set()
        if self._syncer is not threading.current_thread():
            self._syncer.join(5.0)
        with self._lock:
            if self._db is None:
                return
            try:
                self._flush_acked()
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the acked rows are sent again (and dropped by the server); the WAL
                # is replayed on open
            self._db.close()
            self._db = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- the first schema


def _migrate_v1(db: sqlite3.Connection) -> bool:
    """Rewrite a first-schema ``messages`` table (AUTOINCREMENT, UNIQUE id) in one
    transaction, keeping every row (its id is ``<epoch>-<seq>``, so the seq keeps it) and
    the highest seq ever used. True when it did."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' "
                     "AND name = 'messages'").fetchone()
    if row is None or "AUTOINCREMENT" not in row[0].upper():
        return False
    db.execute("BEGIN IMMEDIATE")
    try:
        last = db.execute("SELECT MAX(COALESCE((SELECT MAX(seq) FROM messages), 0), "
                          "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), "
                          "0))").fetchone()[0]
        db.execute("CREATE TABLE messages_v2 (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, "
                   "ts TEXT NOT NULL, payload TEXT NOT NULL, size INTEGER NOT NULL, "
                   "created REAL NOT NULL)")
        db.execute("INSERT INTO messages_v2 SELECT seq, type, ts, payload, size, created "
                   "FROM messages ORDER BY seq")
        count = db.execute("SELECT COUNT(*) FROM messages_v2").fetchone()[0]
        db.execute("DROP TABLE messages")
        db.execute("ALTER TABLE messages_v2 RENAME TO messages")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last),))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    log.info("outbox: migrated %d queued messages to the current schema (no AUTOINCREMENT, "
             "no id index)", count)
    return True


def _repage(db: sqlite3.Connection) -> None:
    """Rebuild with PAGE_SIZE pages (only VACUUM outside WAL mode changes it). Best effort:
    a file another process has open keeps its pages, and works the same."""
    if db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE:
        return
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("VACUUM")
    except sqlite3.OperationalError as exc:
        log.info("outbox: kept the file's page size (%s)", exc)
    finally:
        db.execute("PRAGMA journal_mode=WAL")

"""The disk-backed outbox: every message lives here from the moment it exists
until the server acknowledges it.

Design
------
Constraints: a device may be offline for hours, reboot, lose power or be
SIGKILLed at any instant, and must lose nothing it had stored; the disk is an
SD card that must not fill up; a corrupt file must never become a crash loop.

On-disk layout: one SQLite database ``outbox.db`` in ``state_dir``, WAL mode,
512-byte pages (a WAL frame is one page: each put commits one ~0.5 KiB frame,
and offline, one more frame for the table's parent page and one for the
header page whenever a new page is taken, so the rows a page holds count too).

* ``messages(seq, type, ts, payload, size, created)``: ``seq`` is the order of
  creation (the rowid, no second index). A message's id is ``<epoch>-<seq>``,
  fixed at creation and sent unchanged on every resend, so the server can drop
  duplicates; ``ack`` and ``set_aside`` parse the seq back out of it (an id of
  an unknown epoch, or a seq outside its epoch's range, is ignored).
* ``epochs(first_seq, epoch)``: see "Identity" below.
* ``meta(key, value)``: ``epoch``, the running ``dropped`` and ``set_aside``
  counts, and ``last_seq``. A seq is never reused, even after the table empties
  and the agent restarts: on open, the next seq follows both ``MAX(seq)`` and
  ``meta.last_seq``, and ``last_seq`` is written in the same transaction as any
  delete that removes the newest row (rare: a put's own delete of acked rows
  never does, since the row it inserts is newer). This replaces AUTOINCREMENT,
  which rewrote ``sqlite_sequence`` (one more page) on every insert.

Identity: an id is never used twice for a device, whatever the disk lost. Every
open begins a new epoch, 64 random bits (``EPOCH_BYTES``, from ``os.urandom``),
for the seqs from the next one on (``epochs`` row ``(last_seq + 1, epoch)``).
Why at every open and not once per file: with ``normal`` a power cut can lose
the newest committed rows (the WAL's unsynced tail), and a restored backup or a
copied SD card image goes back in time the same way; the next seqs then repeat
ones the server may already have stored under the old epoch, and it would ack
the new samples as duplicates and drop them. A fresh epoch makes every id after
an open new, and ids the old file gave keep their epoch (the rows still queued
are resent unchanged). Epochs that name no queued row are pruned at open. Two
opens choosing the same epoch: 2^-64 per pair, about 3 in 10^10 over 100,000
device starts (birthday bound); and the server dedupes per device anyway.
Files from before (one 4-byte ``meta.epoch`` for every row) read as one epoch
from seq 0. A crash loop adds no rows: an epoch with no seq yet is replaced.

Reading a row back: one step (:func:`decode_row`) turns a stored row into a
:class:`Record` ready for the wire, or an :class:`Unreadable` with the reason,
never an exception. A damaged card can leave anything in a cell: text that is
not UTF-8 where a BLOB was (SQLite's default conversion fails the whole query,
so the connection's ``text_factory`` returns such a cell as :class:`BadText`),
an integer where the payload was, a deflate stream that no longer inflates, text
that is not a JSON object, or one over the protocol's size limit. Such a row is
moved to ``set_aside`` with the reason the first time it is read, counted, and
the rows behind it go on at once. ``quick_check`` sees none of this.

Rows (schema 3, ``PRAGMA user_version`` 3): a sample of ~440 bytes of JSON is
stored in ~120, three or four to a page (two to a 1 KiB page before). Each
column says how it is stored by its SQLite type, so rows of every schema read
alike:

* ``payload``: TEXT is the JSON text as it is (every row written before schema
  3, and a payload compression does not shrink). A BLOB starts with a byte
  naming its encoding: ``1`` (``DEFLATE_1``) is raw deflate with the preset
  dictionary ``ZDICT_1`` (the keys of a sample and of a command result). A
  dictionary is never changed once released: a new one gets a new byte. The
  text read back is the text ``put`` produced, byte for byte. A row that cannot
  be read (a byte of a newer version, damaged bytes) is moved to ``set_aside``
  with the reason when it is read, and the rest go on.
* ``type``: an integer code (``TYPE_CODES``: 1 telemetry, 2 command.result), or
  the text of any other type.
* ``ts``: milliseconds since the epoch when that formats back to exactly the
  text given (``protocol.format_timestamp``'s form), else the text.
* ``size``: the bytes of the payload's JSON text (UTF-8), not of what is
  stored: ``max_bytes`` bounds the payload bytes the queue would send, as
  before; the file holds less (about a third for samples), plus the pages'
  own overhead.
* ``created``: NULL when the ``ts`` (in milliseconds) is the creation time, as
  for every sample and command result; else the time.
* ``type``, ``ts`` and ``payload`` have no declared type: a declared TEXT would
  turn the integer codes into text. Files of older schemas are rewritten on
  open in one transaction, every row kept as it was (TEXT reads as before) and
  the highest seq ever used kept; the first schema (AUTOINCREMENT, a UNIQUE
  ``id`` column) and the second (TEXT columns, ``created`` NOT NULL) alike. A
  file of other pages is then rebuilt with 512-byte pages (VACUUM, under a
  rollback journal with ``synchronous=FULL``), when nothing else has it open.

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
next ``put``'s transaction, so a sample costs one commit, not two (a put with
nothing to delete is a single INSERT in autocommit mode: the same one commit,
one statement instead of three). Acks that no put carries are deleted by the
syncer within ``sync_interval_s``, or at once when ``ACK_FLUSH_AT`` are
waiting, and by ``close``. A kill (or, with ``normal``, a power cut) before the
delete only means the server gets those messages again, under the same ids,
and drops them.

What an acknowledgement means: the server's ``ack`` for an id says it has the
message; only then is the row deleted. Delivery is therefore at-least-once.

Bounds: the sum of ``size`` (bytes of the payloads' JSON text) stays under
``max_bytes``; a ``put`` that would exceed it first deletes the oldest rows and
adds them to ``dropped``. The daemon never stops for a full queue. Nothing
enters that the protocol cannot carry: a message whose wire text is over
``protocol.MAX_MESSAGE_BYTES`` is refused by ``put`` (LocalProtocolError). The
wire size is worked out from the parts (``wire_size_ok``); only a message
within a few hundred bytes of the limit has its envelope built to be sure.

Set aside: a message the server refuses for good (``INVALID_MESSAGE``, or a
connection it keeps closing while that message is the oldest in flight) is
moved by :meth:`set_aside` to the ``set_aside`` table with the reason, so it
never blocks the messages behind it. The last ``SET_ASIDE_KEEP`` are kept for
inspection; the running count is ``meta.set_aside``.

Lock (``queue.lock``): ``exclusive`` (default) opens the file in SQLite's
EXCLUSIVE locking mode, so the WAL index is kept in this process's memory (no
``-shm`` file: its pages, dirtied by every commit and written back by the
kernel every ~30 s, were about 700 bytes a sample offline) and the lock is held
until ``close``: no other process can read the file meanwhile, and a second
agent on the same ``state_dir`` waits ``lock_wait_s`` and gives up (exit 75).
``shared`` keeps the ``-shm`` file and lets other processes read live.

Opening: ``store.open_db`` decides (a lock is waited out, an unwritable or
failing disk is reported, only real corruption moves the file aside to
``outbox.db.corrupt-<time>`` and starts a fresh one). A file that passes the
check at open but fails later (a bad sector read for the first time) is
treated the same way the moment SQLite reports it (``SQLITE_CORRUPT`` or
``SQLITE_NOTADB`` from any call): set aside, a fresh file, the messages it held
counted as ``dropped`` and logged with their number, ``generation`` bumped so
readers restart their cursors. It is never retried in a reconnect loop.

Held rows: while the queue is short (at most ``HELD_ROWS`` rows, as it is
online: a sample is acknowledged before the next is taken) every queued row is
also held in memory, as the :class:`Record` ``put`` returned, with its size and
creation time. ``read_after``, ``ack`` and ``stats`` then answer from memory
instead of querying the file (a query each, about 150 us a sample in the
running agent with its caches cold after a second's sleep; docs/performance.md
"Footprint"). Held rows are always a subset of the queued rows (every path that
takes a row out of the queue takes it out of memory too), so "as many held as
queued" means "all of them held"; otherwise, as when a backlog builds offline,
the file is read as before and memory holds nothing until the queue empties.

Threads: only this object touches the database; its methods take one lock, so
the sampler (``put``), the transport (``read_after``, ``ack``) and the status
reporter (``stats``) may call it from their own threads. Its own syncer thread
(``nexus-outbox-sync``) takes the same lock; the fsync itself runs outside it,
so a slow card never holds up a ``put``. ``close`` stops the syncer first.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Generic, Iterable, Iterator, List, Optional, Protocol,
                    Tuple, TypeVar, Union)

from . import store

log = logging.getLogger("nexus.outbox")

# type, ts and payload have no declared type on purpose: a declared TEXT would turn the
# integer codes into text (column affinity). See "Rows" in the module docstring.
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    type NOT NULL,
    ts NOT NULL,
    payload NOT NULL,
    size INTEGER NOT NULL,
    created REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (first_seq INTEGER PRIMARY KEY, epoch NOT NULL);
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
SCHEMA_VERSION = 3  # PRAGMA user_version; 0 in files of the first two schemas
SET_ASIDE_KEEP = 100
PAGE_SIZE = 512
DURABILITIES = ("normal", "full")
LOCKS = ("exclusive", "shared")
SYNC_INTERVAL_S = 10.0
ACK_FLUSH_AT = 64  # acked rows waiting for a put before they are deleted on their own
HELD_ROWS = 32  # the queue's rows are also held in memory while there are no more than this
INSERT = "INSERT INTO messages (seq, type, ts, payload, size, created) VALUES (?, ?, ?, ?, ?, ?)"
EPOCH_BYTES = 8  # 64 random bits per open: see "Identity" in the module docstring
ID_MAX_CHARS = 2 * EPOCH_BYTES + 1 + 19  # <epoch>-<seq>: the longest id this queue gives

# --------------------------------------------------------------------------- rows and the codec
# The queue stores rows of opaque cells; a codec (agent/codec.py for the agent's messages)
# makes them and reads them back. The queue never looks inside a cell but ``size``.

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@dataclass(frozen=True)
class Row:
    """A message as stored: the cells ``type``, ``ts``, ``payload`` and ``created``
    (SQLite values), ``size`` (the bytes ``max_bytes`` counts), and ``plain``: whatever
    the codec needs to give the stored item back without decoding the cells."""

    type: Any
    ts: Any
    payload: Any
    size: int
    created: Optional[float]
    plain: Any = None


@dataclass(frozen=True)
class Unreadable:
    """A stored row that cannot become a message, and why (it is set aside, never sent)."""

    reason: str


class RowCodec(Protocol[R_co]):
    """What the queue needs of a codec: rows in, items (what reads give back) out."""

    def encode(self, *message: Any) -> Row: ...

    def record(self, seq: int, msg_id: str, row: Row) -> R_co: ...

    def decode(self, seq: int, msg_id: str, type_: Any, ts: Any,
               payload: Any) -> Union[R_co, Unreadable]: ...

    def describe(self, type_: Any, ts: Any, payload: Any) -> Tuple[Any, Any, Any]: ...

    def created(self, created: Any, ts: Any) -> Optional[float]: ...

def _decode(codec: RowCodec[R], rows: List[Tuple[Any, ...]], id_of: Callable[[int], str]
            ) -> Tuple[List[Tuple[int, R]], List[Tuple[int, str, str]]]:
    """(seq, item) of stored (seq, type, ts, payload) rows, and (seq, id, reason) of the
    rows that cannot be read."""
    items: List[Tuple[int, R]] = []
    unreadable: List[Tuple[int, str, str]] = []
    for seq, type_, ts, payload in rows:
        msg_id = id_of(seq)
        item = codec.decode(seq, msg_id, type_, ts, payload)
        if isinstance(item, Unreadable):
            unreadable.append((seq, msg_id, item.reason))
        else:
            items.append((seq, item))
    return items, unreadable


def _int(value: Any) -> int:
    """A count or size cell as an int; 0 for a damaged one (the row is caught when read)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    oldest_created: Optional[float]
    dropped: int
    last_seq: int
    set_aside: int = 0
    last_set_aside: str = ""  # "<id>: <reason>" of the newest row set aside


def _id_in(epochs: List[Tuple[int, str]], firsts: List[int], seq: int) -> str:
    """``<epoch>-<seq>`` with the epoch whose range holds ``seq`` (the last starts there)."""
    if seq >= firsts[-1]:
        return f"{epochs[-1][1]}-{seq}"
    return f"{epochs[max(0, bisect.bisect_right(firsts, seq) - 1)][1]}-{seq}"


def new_epoch() -> str:
    return os.urandom(EPOCH_BYTES).hex()


def _epoch_text(value: Any) -> bool:
    """An epoch as stored is text of hex digits (4 bytes in files before epochs, now 8)."""
    return type(value) is str and 0 < len(value) <= 32 and all(
        c in "0123456789abcdef" for c in value)


F = TypeVar("F", bound=Callable[..., Any])


def _on_corruption(retry: bool, default: Any = None) -> Callable[[F], F]:
    """A public method that survives a file that turns out corrupt after opening: set the
    file aside (``Outbox._recover``), then call the method again (``retry``) or return
    ``default``. Any other error goes through as it is."""
    def wrap(method: F) -> F:
        @functools.wraps(method)
        def guarded(self: Outbox, *args: Any, **kwargs: Any) -> Any:
            if self._pending_reopen is not None:  # a fresh file could not be had last time
                with self._lock:
                    if self._pending_reopen is not None:
                        self._reopen(*self._pending_reopen)  # StoreError while it fails
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


class Outbox(Generic[R]):
    def __init__(self, codec: RowCodec[R], state_dir: str, max_bytes: int,
                 filename: str = "outbox.db",
                 lock_wait_s: float = store.LOCK_WAIT_S, durability: str = "normal",
                 sync_interval_s: float = SYNC_INTERVAL_S, lock: str = "exclusive") -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if lock not in LOCKS:
            raise ValueError(f"lock must be one of {LOCKS}, not {lock!r}")
        self.codec = codec
        self.lock = lock
        self.path = os.path.join(state_dir, filename)
        self.max_bytes = max_bytes
        self.durability = durability
        self.sync_interval_s = sync_interval_s
        self._lock = threading.Lock()
        # (dropped, set aside, last set aside) to carry into a fresh file that could not be
        # opened yet after a corrupt one (see _recover); None otherwise.
        self._pending_reopen: Optional[Tuple[int, int, str]] = None
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
        db = store.open_db(self.path, self._setup, self._lock_wait_s, "outbox",
                           synchronous="FULL" if self.durability == "full" else "NORMAL",
                           page_size=PAGE_SIZE, exclusive=self.lock == "exclusive")
        db.text_factory = store.text_factory  # a damaged TEXT cell must not fail a query
        return db

    def _load(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) "
                               "FROM messages").fetchone()
        self._depth, self._bytes = int(row[0]), _int(row[1])
        self._dropped = _int(self._meta("dropped"))
        self._set_aside = _int(self._meta("set_aside"))
        last = self._db.execute("SELECT id, reason FROM set_aside ORDER BY seq DESC LIMIT 1"
                                ).fetchone()
        self._last_aside = f"{last[0]}: {last[1]}"[:300] if last else ""
        self._last_seq = max(int(row[2]), _int(self._meta("last_seq")))
        self._start_epoch()
        self._acked: Dict[int, int] = {}  # seq -> size: acknowledged, not deleted yet
        # seq -> (record, size, created) of queued rows, in seq order; see "Held rows"
        self._held: Dict[int, Tuple[R, int, float]] = {}

    def _start_epoch(self) -> None:
        """Begin a new epoch at the next seq (see "Identity"): a fresh random value at every
        open, so no id the server may have seen is used again, whatever the file lost. The
        epochs that still name queued rows are kept; older ones are pruned."""
        rows = [(int(first), epoch) for first, epoch in self._db.execute(
            "SELECT first_seq, epoch FROM epochs ORDER BY first_seq")]
        if not rows:  # a file from before epochs: its one epoch names every row
            rows = [(0, self._meta("epoch"))]
        oldest = self._db.execute("SELECT MIN(seq) FROM messages").fetchone()[0]
        nxt = self._last_seq + 1
        oldest = nxt if oldest is None else int(oldest)
        keep = max([i for i, (first, _) in enumerate(rows) if first <= oldest] or [0])
        kept = [(first, epoch if _epoch_text(epoch) else new_epoch())  # a damaged one: anew
                for first, epoch in rows[keep:] if first < nxt]
        if kept and kept[0][0] > oldest:  # a damaged first_seq: the oldest rows need a range
            kept[0] = (oldest, kept[0][1])
        self._epochs = kept + [(nxt, new_epoch())]
        with self._transaction() as db:
            db.execute("DELETE FROM epochs")
            db.executemany("INSERT INTO epochs VALUES (?, ?)", self._epochs)
        self._epoch = self._epochs[-1][1]
        self._firsts = [first for first, _ in self._epochs]
        self._epoch_index = {epoch: i for i, (_, epoch) in enumerate(self._epochs)}

    def _id(self, seq: int) -> str:
        """The id of the row ``seq``: its epoch's value and the seq. Caller holds the lock
        (or is the only thread, at open)."""
        return _id_in(self._epochs, self._firsts, seq)

    def _ids_now(self) -> Callable[[int], str]:
        """Ids by this file's epochs as they are now, for use outside the lock. Caller holds
        the lock."""
        return functools.partial(_id_in, self._epochs, self._firsts)

    def _count(self, depth: int = 0, size: int = 0, dropped: int = 0,
               set_aside: int = 0) -> None:
        """The one place the running counters change after a load; called once what they
        count is committed (a rolled-back transaction leaves them as they were). Caller
        holds the lock."""
        self._depth += depth
        self._bytes += size
        self._dropped += dropped
        self._set_aside += set_aside

    def _all_held(self) -> bool:
        """Every queued row is held (held rows are always queued ones), and the file is open
        (after ``close`` every call fails as before). Caller holds the lock."""
        return len(self._held) == self._depth and self._db is not None

    def _recover(self, exc: BaseException) -> None:
        """The open file turned out corrupt: set it aside, go on with a fresh one, and say
        what was lost. Caller holds self._lock."""
        if self._db is None:
            return
        lost = self._depth
        # What the fresh file carries over (the lost rows count as dropped); kept until it
        # opens, so a failed open is retried with the same counts.
        self._pending_reopen = (self._dropped + lost, self._set_aside, self._last_aside)
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        # None until a fresh file is open: if that fails (a full or failing card) the next
        # call tries again (_on_corruption), never a closed connection.
        self._db = None  # type: ignore[assignment]
        store.set_aside_corrupt(self.path, str(exc), "outbox")
        log.error("outbox %s failed a read after opening (%s): the %d messages queued in it "
                  "are lost (counted as dropped); going on with a fresh file", self.path, exc,
                  lost)
        self._reopen(*self._pending_reopen)  # StoreError: tried again at the next call

    def _reopen(self, dropped: int, aside: int, last_aside: str) -> None:
        """A fresh file after a corrupt one, its running counts carried over. Caller holds
        self._lock. StoreError when it cannot be had (then ``_db`` stays None)."""
        db = self._open()
        self._db = db
        self._load()  # a fresh file: every counter 0
        with self._transaction() as tx:
            tx.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (str(dropped),))
            tx.execute("UPDATE meta SET value = ? WHERE key = 'set_aside'", (str(aside),))
        self._count(dropped=dropped, set_aside=aside)
        self._last_aside = last_aside
        self._pending_reopen = None
        self.generation += 1

    @classmethod
    def _setup(cls, db: sqlite3.Connection) -> None:
        _migrate(db)
        db.executescript(SCHEMA)
        cls._init_meta(db)
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # a new file
        _check_schema(db)
        _repage(db)  # a file of other pages: older schemas, or a rebuild cut short

    @staticmethod
    def _init_meta(db: sqlite3.Connection) -> None:
        # The first epoch of a file (ids of files from before the epochs table use it).
        db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (new_epoch(),))
        for key in ("dropped", "set_aside", "last_seq"):
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, '0')", (key,))

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return "" if row is None else str(row[0])

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
        """The seq in an id of this file (``<epoch>-<seq>`` with the seq in that epoch's
        range); None for any other id."""
        epoch, _, text = msg_id.partition("-")
        index = self._epoch_index.get(epoch)
        if index is None or not text.isdigit() or len(text) > 19:
            return None
        seq = int(text)
        end = self._firsts[index + 1] if index + 1 < len(self._firsts) else seq + 1
        return seq if self._firsts[index] <= seq < end else None

    # ------------------------------------------------------------------ writing

    def put(self, *message: Any) -> R:
        """Encode a message with this queue's codec (``codec.encode(*message)``: for the
        agent's, type, payload, ts and optionally the creation time) and store it: see
        :meth:`put_row`. The codec's errors (a message too big for the wire) go through
        before anything is stored. Encoded before the lock: the sampler's compression
        never holds up the transport."""
        return self.put_row(self.codec.encode(*message))

    @_on_corruption(retry=True)
    def put_row(self, row: Row) -> R:
        """Store a row (see Durability in the module docstring); the stored item, with its
        permanent id, as the codec gives it back."""
        size = row.size
        cells = (row.type, row.ts, row.payload, size, row.created)
        with self._lock:
            seq = self._last_seq + 1
            msg_id = f"{self._epoch}-{seq}"  # seq is past every older epoch's range
            item = self.codec.record(seq, msg_id, row)
            if self._acked or self._bytes + size > self.max_bytes:
                with self._transaction() as db:
                    # Acked rows go in this same commit (one WAL frame for the insert and the
                    # deletes); the new row is the newest, so meta.last_seq needs no update.
                    self._delete_acked(db, newest_stays=True)
                    dropped = self._make_room(db, size)
                    db.execute(INSERT, (seq, *cells))
                # Only once committed: a rollback keeps the acked rows for later, and the
                # counters and held rows as they were.
                self._acked.clear()
                if dropped[0]:
                    self._dropped_oldest(*dropped)
            else:
                # Nothing to delete: one INSERT in autocommit mode is a transaction of its
                # own, with the same durability, for one statement instead of three.
                self._db.execute(INSERT, (seq, *cells))
                self._unsynced = True
            if self._all_held() and self._depth < HELD_ROWS:
                # The creation time as the file gives it back (stats agree to the bit).
                created = self.codec.created(row.created, row.ts)
                self._held[seq] = (item, size, time.time() if created is None else created)
            else:
                self._held.clear()  # a backlog: read from the file until the queue empties
            self._last_seq = seq
            self._count(depth=1, size=size)
            self._put_since_sync = True
        return item

    def _make_room(self, db: sqlite3.Connection, size: int) -> Tuple[int, int, int]:
        """Delete the oldest rows until ``size`` more bytes fit under max_bytes; (rows, their
        bytes, the newest seq deleted), for :meth:`_dropped_oldest` once committed.

        Caller has deleted the acked rows first, so every row seen here is queued."""
        depth, total, count, freed, last = self._depth, self._bytes, 0, 0, 0
        while depth and total + size > self.max_bytes:
            rows = db.execute("SELECT seq, size FROM messages ORDER BY seq LIMIT 64").fetchall()
            excess, these = total + size - self.max_bytes, 0
            for seq, row_size in rows:
                these, last = these + _int(row_size), seq
                if these >= excess:
                    break
            deleted = db.execute("DELETE FROM messages WHERE seq <= ?", (last,)).rowcount
            depth, total, count, freed = depth - deleted, total - these, count + deleted, \
                freed + these
        if count:
            db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'",
                       (str(self._dropped + count),))
        return count, freed, last

    def _dropped_oldest(self, count: int, freed: int, last: int) -> None:
        """Account for rows :meth:`_make_room` deleted, now that they are gone for good."""
        for seq in [seq for seq in self._held if seq <= last]:
            del self._held[seq]
        self._count(depth=-count, size=-freed, dropped=count)
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
        ids = list(ids)
        taken = 0
        with self._lock:
            # Mapped under the lock: a file replaced meanwhile has other epochs, and an id of
            # the old file must not take out the row of the new one with the same seq.
            wanted = {seq for seq in map(self._seq_of, ids) if seq is not None}
            found: List[Tuple[int, int]] = []  # (seq, size) of the queued rows among them
            seqs = []  # the rest, looked up in the file
            for seq in sorted(wanted - set(self._acked)):
                held = self._held.pop(seq, None)
                if held is None:
                    seqs.append(seq)
                else:
                    found.append((seq, held[1]))
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                found += self._db.execute(
                    f"SELECT seq, size FROM messages WHERE seq IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
            for seq, size in found:
                if seq not in self._acked:
                    self._acked[seq] = size
                    self._count(depth=-1, size=-_int(size))
                    taken += 1
            if len(self._acked) >= ACK_FLUSH_AT:
                self._flush_acked()
        return taken

    @_on_corruption(retry=False, default=False)
    def set_aside(self, msg_id: str, reason: str) -> bool:
        """Move one message out of the queue into ``set_aside`` (see the module docstring);
        False when it is no longer queued."""
        with self._lock:
            seq = self._seq_of(msg_id)  # under the lock, as in ack
            if seq is None or seq in self._acked:
                return False
            return bool(self._set_rows_aside([(seq, reason)]))

    def _set_rows_aside(self, rows: Iterable[Tuple[int, str]]) -> List[int]:
        """Move queued rows (seq, reason) to ``set_aside`` in one transaction and count them
        once it commits; the seqs moved. Caller holds self._lock."""
        moved: List[Tuple[int, int, str]] = []  # (seq, size, reason)
        with self._transaction() as db:
            for seq, reason in rows:
                size = self._move_aside(db, seq, reason, len(moved))
                if size is not None:
                    moved.append((seq, size, reason))
        for seq, size, reason in moved:
            self._held.pop(seq, None)
            self._count(depth=-1, size=-size, set_aside=1)
            self._last_aside = f"{self._id(seq)}: {reason}"[:300]
        return [seq for seq, _, _ in moved]

    def _move_aside(self, db: sqlite3.Connection, seq: int, reason: str,
                    before: int) -> Optional[int]:
        """Move one queued row to ``set_aside``, readable (decoded) when it can be, in the
        caller's transaction (``before``: rows it moved already); the row's size, or None
        when it is no longer queued: gone, or acked (its row stays until the next delete,
        and ``read_after`` decodes outside the lock, so an ack can come between its read
        and this)."""
        if seq in self._acked:
            return None
        row = db.execute("SELECT type, ts, payload, size FROM messages WHERE seq = ?",
                         (seq,)).fetchone()
        if row is None:
            return None
        kept = self.codec.describe(row[0], row[1], row[2])  # kept for inspection
        db.execute("INSERT OR REPLACE INTO set_aside VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (seq, self._id(seq), *kept, reason[:500], time.time()))
        db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
        if seq == self._last_seq:
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(seq),))
        db.execute("DELETE FROM set_aside WHERE seq NOT IN (SELECT seq FROM set_aside "
                   "ORDER BY seq DESC LIMIT ?)", (SET_ASIDE_KEEP,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'set_aside'",
                   (str(self._set_aside + before + 1),))
        return _int(row[3])

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

    def read_after(self, seq: int, limit: int, upto: Optional[int] = None) -> List[R]:
        """Up to ``limit`` queued items with ``seq`` above ``seq`` (and at most ``upto``),
        in order. A row the codec cannot read is set aside with its reason here (and
        counted), never returned, never raised: the rows behind it come at once."""
        return [item for _, item in self._read(seq, limit, upto)[0]]

    @_on_corruption(retry=False, default=([], 0, 0))
    def _read(self, seq: int, limit: int, upto: Optional[int]
              ) -> Tuple[List[Tuple[int, R]], int, int]:
        """(seq, item) pairs for :meth:`read_after` and :class:`Cursor`, with the number of
        rows the read went through and the last seq among them: a row set aside as
        unreadable is gone from the pairs, not from the scan, so a reader that took a short
        list for "the end" would stop in front of the rows behind it."""
        query = "SELECT seq, type, ts, payload FROM messages WHERE seq > ?"
        args: List[Any] = [seq]
        if upto is not None:
            query += " AND seq <= ?"
            args.append(upto)
        with self._lock:
            if self._all_held():  # nothing queued, or all of it in memory
                held = [(s, item) for s, (item, _, _) in self._held.items()
                        if s > seq and (upto is None or s <= upto)][:limit]
                return held, len(held), held[-1][0] if held else seq
            if self._acked:  # at most ACK_FLUSH_AT
                query += f" AND seq NOT IN ({','.join('?' * len(self._acked))})"
                args.extend(self._acked)
            rows = self._db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
            generation = self.generation
            id_of = self._ids_now()  # this file's epochs, even if it is replaced meanwhile
        last = rows[-1][0] if rows else seq
        # Decoded outside the lock: a long batch's decompression never holds up a put.
        items, unreadable = _decode(self.codec, rows, id_of)
        if unreadable:
            with self._lock:
                if self.generation != generation:
                    return [], 0, 0  # the file was replaced meanwhile: the caller restarts
                moved = set(self._set_rows_aside((bad, reason) for bad, _, reason in unreadable))
            for bad, msg_id, reason in unreadable:
                if bad in moved:
                    log.error("outbox %s: message %s cannot be read (%s); set aside",
                              self.path, msg_id, reason)
        return items, len(rows), last

    def fill(self) -> float:
        """Queued payload bytes over ``max_bytes``, without the lock or the file: one int
        read whole (inputs check it for every sample they take in)."""
        return self._bytes / self.max_bytes

    def cursor(self, after: int = 0, upto: Optional[int] = None) -> Cursor[R]:
        """A reader's position in this queue (see :class:`Cursor`)."""
        return Cursor(self, after, upto)

    @_on_corruption(retry=True)
    def stats(self) -> OutboxStats:
        with self._lock:
            if self._all_held():  # nothing queued, or all of it in memory
                oldest_created = next(iter(self._held.values()))[2] if self._held else None
                return OutboxStats(self._depth, self._bytes, oldest_created, self._dropped,
                                   self._last_seq, self._set_aside, self._last_aside)
            query = "SELECT created, ts FROM messages"
            if self._acked:
                query += f" WHERE seq NOT IN ({','.join('?' * len(self._acked))})"
            oldest = self._db.execute(query + " ORDER BY seq LIMIT 1",
                                      list(self._acked)).fetchone()
            return OutboxStats(self._depth, self._bytes,
                               self.codec.created(*oldest) if oldest else None,
                               self._dropped, self._last_seq, self._set_aside, self._last_aside)

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


class Cursor(Generic[R]):
    """A reader's position in the queue: items above ``after`` (and up to ``upto``, when
    bounded), in order, each once. The queue owns what a position means: when it replaced
    a corrupt file (its seqs start again), the cursor starts again too, an open one from
    the new file's start and a bounded one (a backlog of the old file) with nothing left
    (:meth:`replaced` says so, once). ``unread`` is False once a read came back short:
    rows above an open cursor come only with new puts (call :meth:`more`), and a bounded
    one never grows."""

    def __init__(self, queue: Outbox[R], after: int = 0, upto: Optional[int] = None) -> None:
        self._queue = queue
        self.after = after
        self.upto = upto
        self._generation = queue.generation
        self.unread = True

    def more(self) -> None:
        """Something may have been put since the last read."""
        if self.upto is None:
            self.unread = True

    def replaced(self) -> bool:
        """True (once) when the queue replaced its file since this cursor last looked: the
        cursor has started again, and whatever the reader holds of the old file is gone."""
        if self._queue.generation == self._generation:
            return False
        self._generation = self._queue.generation
        self.after = 0
        if self.upto is None:
            self.unread = True
        else:
            self.upto, self.unread = 0, False
        return True

    def read(self, limit: int) -> List[R]:
        self.replaced()
        if not self.unread:
            return []
        # Cleared before the read: a put after it comes with a call to more() of its own.
        got, scanned, last = self._queue._read(self.after, limit, self.upto)
        self.unread = scanned == limit  # rows set aside in the read count: they were there
        self.after = max(self.after, last)
        return [item for _, item in got]


# --------------------------------------------------------------------------- older schemas


def _migrate(db: sqlite3.Connection) -> bool:
    """Rewrite a ``messages`` table of an older schema in one transaction, keeping every row
    as it is (its id is ``<epoch>-<seq>``, so the seq keeps it; its TEXT type, ts and
    payload read as before) and the highest seq ever used. True when it did.

    First schema: AUTOINCREMENT and a UNIQUE ``id``. Second: declared TEXT columns (which
    would turn the integer codes of new rows into text) and ``created`` NOT NULL.
    """
    if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return False
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "messages" not in tables:
        return False
    db.execute("BEGIN IMMEDIATE")
    try:
        last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0]
        if "sqlite_sequence" in tables:  # AUTOINCREMENT's highest seq
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            last = max(last, row[0] if row else 0)
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            last = max(last, int(row[0]) if row else 0)
        db.execute(SCHEMA.split(";")[0].replace("IF NOT EXISTS messages", "messages_v3"))
        db.execute("INSERT INTO messages_v3 SELECT seq, type, ts, payload, size, created "
                   "FROM messages ORDER BY seq")
        count = db.execute("SELECT COUNT(*) FROM messages_v3").fetchone()[0]
        db.execute("DROP TABLE messages")
        db.execute("ALTER TABLE messages_v3 RENAME TO messages")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(last),))
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    log.info("outbox: migrated %d queued messages to schema %d (compressed rows from now on; "
             "the queued ones are kept as they are)", count, SCHEMA_VERSION)
    return True


_COLUMNS = {"messages": ["seq", "type", "ts", "payload", "size", "created"],
            "meta": ["key", "value"], "epochs": ["first_seq", "epoch"],
            "set_aside": ["seq", "id", "type", "ts", "payload", "reason", "at"]}


def _check_schema(db: sqlite3.Connection) -> None:
    """The tables as SCHEMA makes them. A flipped bit in a name of the schema text passes
    quick_check, and every put and read would then fail with "no such column" in a
    daemon that runs and delivers nothing: such a file counts as corrupt (set aside)."""
    for table, columns in _COLUMNS.items():
        found = [str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")]
        if found != columns:
            raise sqlite3.DatabaseError(f"damaged schema: table {table} has columns {found}")


def _repage(db: sqlite3.Connection) -> None:
    """Rebuild with PAGE_SIZE pages (only VACUUM outside WAL mode changes it). Best effort:
    a file another process has open keeps its pages, and works the same."""
    if db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE:
        return
    synchronous = int(db.execute("PRAGMA synchronous").fetchone()[0])
    try:
        # A rollback journal: FULL, so that a power cut during the rebuild cannot corrupt it.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("VACUUM")
    except sqlite3.OperationalError as exc:
        log.info("outbox: kept the file's page size (%s)", exc)
    finally:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")

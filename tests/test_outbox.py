"""The disk queue on real SQLite files: order, ids, acks, bounds, corruption, SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys

import pytest
from helpers import REPO

from agent import outbox as outbox_mod
from agent.outbox import Outbox


def fill(box, n, start=0):
    return [box.put("telemetry", {"device_id": "d", "metrics": {"n": start + i}},
                    f"2025-01-01T00:00:{i % 60:02d}.000Z") for i in range(n)]


def test_put_read_ack_in_order(tmp_path):
    box = Outbox(str(tmp_path), 10**6)
    records = fill(box, 5)
    assert [r.seq for r in box.read_after(0, 10)] == [1, 2, 3, 4, 5]
    assert [r.seq for r in box.read_after(2, 2)] == [3, 4]
    assert [r.seq for r in box.read_after(0, 10, upto=3)] == [1, 2, 3]
    assert box.ack([records[0].id, records[2].id, "unknown"]) == 2
    assert [r.seq for r in box.read_after(0, 10)] == [2, 4, 5]
    stats = box.stats()
    assert stats.depth == 3 and stats.bytes == sum(len(r.payload) for r in records) - \
        len(records[0].payload) - len(records[2].payload)


def test_envelope_text_is_the_wire_message(tmp_path):
    import json

    box = Outbox(str(tmp_path), 10**6)
    record = fill(box, 1)[0]
    assert json.loads(record.envelope_text()) == {
        "type": "telemetry", "id": record.id, "timestamp": "2025-01-01T00:00:00.000Z",
        "payload": {"device_id": "d", "metrics": {"n": 0}}}


def test_ids_are_stable_and_never_reused_across_reopen(tmp_path):
    box = Outbox(str(tmp_path), 10**6)
    first = fill(box, 3)
    box.ack([r.id for r in first])
    box.close()
    box.close()  # idempotent
    box = Outbox(str(tmp_path), 10**6)
    second = fill(box, 2)
    assert {r.id for r in first}.isdisjoint({r.id for r in second})
    assert second[0].seq == 4  # never reused, even after deletes
    assert second[0].id.split("-")[0] == first[0].id.split("-")[0]  # same file, same epoch


def test_cap_drops_oldest_and_counts(tmp_path):
    box = Outbox(str(tmp_path), 65536)
    records = [box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
               for i in range(100)]
    stats = box.stats()
    assert stats.bytes <= 65536
    assert stats.dropped == 100 - stats.depth > 0
    kept = box.read_after(0, 1000)
    assert kept[-1].id == records[-1].id and kept[0].seq == stats.dropped + 1
    box.close()
    assert Outbox(str(tmp_path), 65536).stats().dropped == stats.dropped  # persisted


def test_corrupt_file_is_moved_aside(tmp_path, caplog):
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)
    box = Outbox(str(tmp_path), 10**6)
    assert box.stats().depth == 0
    fill(box, 1)
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    assert "moved it to" in caplog.text


def test_fresh_file_after_corruption_gets_new_id_space(tmp_path):
    box = Outbox(str(tmp_path), 10**6)
    old = fill(box, 1)[0]
    box.close()
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(tmp_path / f"outbox.db{suffix}"):
            os.remove(tmp_path / f"outbox.db{suffix}")
    new = fill(Outbox(str(tmp_path), 10**6), 1)[0]
    assert new.seq == old.seq == 1 and new.id != old.id




def test_ids_are_never_reused_when_the_newest_row_goes_without_a_close(tmp_path):
    """Acked rows deleted by the syncer (no put to carry them), then a kill (no close):
    the next seq still follows the highest ever used."""
    box = Outbox(str(tmp_path), 10**6)
    first = fill(box, 3)
    box.ack([r.id for r in first])
    box.sync()  # a put came since the last sync: the next put may yet carry the deletes
    box.sync()  # none came: the syncer deletes them itself, meta.last_seq with them
    assert sqlite3.connect(tmp_path / "outbox.db").execute(
        "SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    again = Outbox(str(tmp_path), 10**6)  # as after SIGKILL: the first one never closed
    assert fill(again, 1)[0].seq == 4


def test_acked_rows_leave_the_queue_at_once_and_the_file_with_the_next_put(tmp_path):
    box = Outbox(str(tmp_path), 10**6)
    records = fill(box, 3)
    assert box.ack([records[0].id, records[0].id, "other-1", "garbage", records[1].id]) == 2
    assert box.ack([records[0].id]) == 0  # already acked
    assert [r.id for r in box.read_after(0, 10)] == [records[2].id]
    stats = box.stats()
    assert stats.depth == 1 and stats.bytes == len(records[2].payload)
    assert box.set_aside(records[0].id, "late") is False
    rows = lambda: sqlite3.connect(tmp_path / "outbox.db").execute(  # noqa: E731
        "SELECT seq FROM messages ORDER BY seq").fetchall()
    assert rows() == [(1,), (2,), (3,)]  # still in the file: the delete waits for a put
    fill(box, 1, start=3)
    assert rows() == [(3,), (4,)]
    box.ack([records[2].id])
    box.close()
    assert rows() == [(4,)]  # close deletes what is left


def test_many_acks_are_deleted_without_waiting_for_a_put(tmp_path):
    box = Outbox(str(tmp_path), 10**7)
    records = fill(box, outbox_mod.ACK_FLUSH_AT)
    box.ack([r.id for r in records])
    assert sqlite3.connect(tmp_path / "outbox.db").execute(
        "SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_cap_counts_only_queued_rows_with_acks_waiting(tmp_path):
    box = Outbox(str(tmp_path), 65536)
    early = [box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
             for i in range(10)]
    box.ack([r.id for r in early])  # acked, not dropped
    for i in range(100):
        box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
    stats = box.stats()
    assert stats.bytes <= 65536 and stats.dropped == 100 - stats.depth


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_durability_is_the_sqlite_setting(tmp_path, durability):
    box = Outbox(str(tmp_path), 10**6, durability=durability)
    level = box._db.execute("PRAGMA synchronous").fetchone()[0]
    assert level == {"normal": 1, "full": 2}[durability]
    assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE


FIRST_SCHEMA = """
CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL, ts TEXT NOT NULL, payload TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE set_aside (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL,
    ts TEXT NOT NULL, payload TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO meta VALUES ('epoch', 'c0ffee00'), ('dropped', '2'), ('set_aside', '1');
"""


def test_a_file_of_the_first_schema_keeps_its_messages_and_ids(tmp_path):
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(FIRST_SCHEMA)
    for seq in range(1, 8):
        db.execute("INSERT INTO messages VALUES (?, ?, 'telemetry', '2025-01-01T00:00:00.000Z',"
                   " ?, 9, 1.0)", (seq, f"c0ffee00-{seq}", f'{{"n":{seq}}}'))
    db.execute("DELETE FROM messages WHERE seq IN (1, 2, 7)")  # acked; 7 was the newest
    db.close()
    box = Outbox(str(tmp_path), 10**6)
    assert [r.id for r in box.read_after(0, 10)] == [f"c0ffee00-{n}" for n in (3, 4, 5, 6)]
    assert box.read_after(0, 1)[0].payload == '{"n":3}'
    stats = box.stats()
    assert (stats.depth, stats.dropped, stats.set_aside, stats.last_seq) == (4, 2, 1, 7)
    assert fill(box, 1)[0].id == "c0ffee00-8"  # 7 was used once: never again
    assert box.ack(["c0ffee00-3"]) == 1
    assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE
    box.close()
    box = Outbox(str(tmp_path), 10**6)  # opens as the current schema from now on
    assert [r.seq for r in box.read_after(0, 10)] == [4, 5, 6, 8]


# ---------------------------------------------------------------- SIGKILL, both settings

PUTTER = """
import sys
sys.path.insert(0, {repo!r})
from agent.outbox import Outbox
box = Outbox({state!r}, 10**8, durability={durability!r}, sync_interval_s={interval!r})
i = 0
while True:
    r = box.put("telemetry", {{"i": i}}, "2025-01-01T00:00:00.000Z")
    print(r.id, flush=True)
    if i % 3 == 0:
        box.ack([r.id])  # acked rows: deleted with the next put or by the syncer
    i += 1
"""


def _put_then_kill(state, durability, interval, count):
    """A child puts (reporting each id once stored) until we SIGKILL it after ``count``."""
    script = PUTTER.format(repo=str(REPO), state=str(state), durability=durability,
                           interval=interval)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = [proc.stdout.readline().strip() for _ in range(count)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    return reported


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_after_put_loses_nothing(tmp_path, durability):
    """Killed at a random moment: every put that returned (and was not acked) is on disk."""
    reported = _put_then_kill(tmp_path, durability, 10.0, random.randint(50, 400))
    box = Outbox(str(tmp_path), 10**8, durability=durability)
    stored = {r.id for r in box.read_after(0, 10**6)}
    unacked = {i for n, i in enumerate(reported) if n % 3}
    assert unacked <= stored
    assert fill(box, 1)[0].seq > int(reported[-1].rsplit("-", 1)[1])  # no id reused


def test_kill_during_timed_syncs_then_reopen(tmp_path):
    """The syncer runs every millisecond (fsync, and deletes of acked rows); kills land in
    the middle of them. Each reopen finds a sound file with every unacked put, and goes on."""
    seen = set()
    for _ in range(3):
        reported = _put_then_kill(tmp_path, "normal", 0.001, random.randint(20, 200))
        box = Outbox(str(tmp_path), 10**8, durability="normal", sync_interval_s=0.001)
        assert box._db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        stored = {r.id for r in box.read_after(0, 10**6)}
        assert {i for n, i in enumerate(reported) if n % 3} <= stored
        assert seen.isdisjoint(reported)  # ids are never reused across kills
        seen.update(reported)
        box.close()

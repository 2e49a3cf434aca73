"""The disk queue on real SQLite files: order, ids, acks, bounds, corruption, SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import shutil
import subprocess
import sys
import time

import pytest
from helpers import REPO, outbox_snapshot

from agent import codec as codec_mod
from agent import outbox as outbox_mod
from agent import protocol as p
from agent.outbox import Outbox
from agent.codec import CODEC


def fill(box, n, start=0):
    return [box.put("telemetry", {"device_id": "d", "metrics": {"n": start + i}},
                    f"2025-01-01T00:00:{i % 60:02d}.000Z") for i in range(n)]


def in_file(folder, sql):
    """What another process finds in the file (a copy: the outbox has it exclusively)."""
    with outbox_snapshot(folder) as db:
        return db.execute(sql).fetchall()


def test_put_read_ack_in_order(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
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

    box = Outbox(CODEC, str(tmp_path), 10**6)
    record = fill(box, 1)[0]
    assert json.loads(record.envelope_text()) == {
        "type": "telemetry", "id": record.id, "timestamp": "2025-01-01T00:00:00.000Z",
        "payload": {"device_id": "d", "metrics": {"n": 0}}}


def test_ids_are_stable_and_never_reused_across_reopen(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    first = fill(box, 3)
    box.ack([r.id for r in first])
    box.close()
    box.close()  # idempotent
    box = Outbox(CODEC, str(tmp_path), 10**6)
    second = fill(box, 2)
    assert {r.id for r in first}.isdisjoint({r.id for r in second})
    assert second[0].seq == 4  # never reused, even after deletes
    # Every open begins a new epoch of 64 random bits (issue 21: a power cut may lose the
    # newest seqs, and the next open must not reuse ids the server already has).
    epochs = (first[0].id.split("-")[0], second[0].id.split("-")[0])
    assert epochs[0] != epochs[1] and len(epochs[1]) == 16


def test_cap_drops_oldest_and_counts(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 65536)
    records = [box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
               for i in range(100)]
    stats = box.stats()
    assert stats.bytes <= 65536
    assert stats.dropped == 100 - stats.depth > 0
    kept = box.read_after(0, 1000)
    assert kept[-1].id == records[-1].id and kept[0].seq == stats.dropped + 1
    box.close()
    assert Outbox(CODEC, str(tmp_path), 65536).stats().dropped == stats.dropped  # persisted


def test_corrupt_file_is_moved_aside(tmp_path, caplog):
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert box.stats().depth == 0
    fill(box, 1)
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    assert "moved it to" in caplog.text


def test_fresh_file_after_corruption_gets_new_id_space(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    old = fill(box, 1)[0]
    box.close()
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(tmp_path / f"outbox.db{suffix}"):
            os.remove(tmp_path / f"outbox.db{suffix}")
    new = fill(Outbox(CODEC, str(tmp_path), 10**6), 1)[0]
    assert new.seq == old.seq == 1 and new.id != old.id




def test_ids_are_never_reused_when_the_newest_row_goes_without_a_close(tmp_path):
    """Acked rows deleted by the syncer (no put to carry them), then a kill (no close):
    the next seq still follows the highest ever used. Shared: a second outbox in this
    process opens the file while the first, never closed, still holds it."""
    box = Outbox(CODEC, str(tmp_path), 10**6, lock="shared")
    first = fill(box, 3)
    box.ack([r.id for r in first])
    box.sync()  # a put came since the last sync: the next put may yet carry the deletes
    box.sync()  # none came: the syncer deletes them itself, meta.last_seq with them
    assert in_file(tmp_path, "SELECT COUNT(*) FROM messages") == [(0,)]
    again = Outbox(CODEC, str(tmp_path), 10**6, lock="shared")  # as after SIGKILL: never closed
    assert fill(again, 1)[0].seq == 4


def test_acked_rows_leave_the_queue_at_once_and_the_file_with_the_next_put(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    records = fill(box, 3)
    assert box.ack([records[0].id, records[0].id, "other-1", "garbage", records[1].id]) == 2
    assert box.ack([records[0].id]) == 0  # already acked
    assert [r.id for r in box.read_after(0, 10)] == [records[2].id]
    stats = box.stats()
    assert stats.depth == 1 and stats.bytes == len(records[2].payload)
    assert box.set_aside(records[0].id, "late") is False
    rows = lambda: in_file(tmp_path, "SELECT seq FROM messages ORDER BY seq")  # noqa: E731
    assert rows() == [(1,), (2,), (3,)]  # still in the file: the delete waits for a put
    fill(box, 1, start=3)
    assert rows() == [(3,), (4,)]
    box.ack([records[2].id])
    box.close()
    assert rows() == [(4,)]  # close deletes what is left


def test_many_acks_are_deleted_without_waiting_for_a_put(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    records = fill(box, outbox_mod.ACK_FLUSH_AT)
    box.ack([r.id for r in records])
    assert in_file(tmp_path, "SELECT COUNT(*) FROM messages") == [(0,)]


def test_cap_counts_only_queued_rows_with_acks_waiting(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 65536)
    early = [box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
             for i in range(10)]
    box.ack([r.id for r in early])  # acked, not dropped
    for i in range(100):
        box.put("telemetry", {"blob": "x" * 1000, "i": i}, "2025-01-01T00:00:00.000Z")
    stats = box.stats()
    assert stats.bytes <= 65536 and stats.dropped == 100 - stats.depth


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_durability_is_the_sqlite_setting(tmp_path, durability):
    box = Outbox(CODEC, str(tmp_path), 10**6, durability=durability)
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
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert [r.id for r in box.read_after(0, 10)] == [f"c0ffee00-{n}" for n in (3, 4, 5, 6)]
    assert box.read_after(0, 1)[0].payload == '{"n":3}'
    stats = box.stats()
    assert (stats.depth, stats.dropped, stats.set_aside, stats.last_seq) == (4, 2, 1, 7)
    new = fill(box, 1)[0].id  # 7 was used once: never again; this open's own epoch
    assert new.endswith("-8") and not new.startswith("c0ffee00-")
    assert box.ack(["c0ffee00-3"]) == 1
    assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)  # opens as the current schema from now on
    assert [r.seq for r in box.read_after(0, 10)] == [4, 5, 6, 8]


# ---------------------------------------------------------------- SIGKILL, both settings

PUTTER = """
import sys
sys.path.insert(0, {repo!r})
from agent.outbox import Outbox
from agent.codec import CODEC
box = Outbox(CODEC, {state!r}, 10**8, durability={durability!r}, sync_interval_s={interval!r})
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
    box = Outbox(CODEC, str(tmp_path), 10**8, durability=durability)
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
        box = Outbox(CODEC, str(tmp_path), 10**8, durability="normal", sync_interval_s=0.001)
        assert box._db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        stored = {r.id for r in box.read_after(0, 10**6)}
        assert {i for n, i in enumerate(reported) if n % 3} <= stored
        assert seen.isdisjoint(reported)  # ids are never reused across kills
        seen.update(reported)
        box.close()


# ---------------------------------------------------------------- stored rows (schema 3)

SAMPLE = {"device_id": "device-001", "metrics": {
    "cpu_usage": 66.7, "memory_usage": 3.3, "memory_available_bytes": 24499417088,
    "swap_usage": 0.0, "uptime_s": 9407.5, "disk_root_usage": 22.2, "disk_state_usage": 22.2,
    "net_bytes_sent": 3411839340, "net_bytes_recv": 3867734993, "load_1m": 0.08,
    "load_5m": 0.32, "load_15m": 0.49, "cpu_temp_c": 48.3, "agent_rss_bytes": 24137728,
    "agent_queue_depth": 3723, "agent_queue_bytes": 1627451,
    "agent_oldest_queued_age_s": 3725.3, "agent_dropped": 0, "agent_reconnects": 57}}


def stored_rows(box):
    return box._db.execute("SELECT seq, type, ts, payload, size, created FROM messages "
                           "ORDER BY seq").fetchall()


def test_rows_are_stored_compressed_and_read_back_byte_identical(tmp_path):
    from agent import protocol as p

    box = Outbox(CODEC, str(tmp_path), 10**7)
    payloads = [SAMPLE, {"device_id": "d", "metrics": {"é": 1.5, "snow": "\u2603" * 50}},
                {"lone": "\ud800 and a pair \U0001F600", "text": "x" * 20000},
                {"command_id": "c-1", "device_id": "d", "status": "succeeded", "exit_code": 0,
                 "stdout": "line\n" * 3000, "stderr": "", "duration_ms": 12}]
    put = [box.put("telemetry" if i < 3 else "command.result", payload,
                   "2025-11-03T01:53:54.518Z") for i, payload in enumerate(payloads)]
    for record, payload in zip(put, payloads):
        assert record.payload == p.dumps(payload)
    rows = stored_rows(box)
    for (_, type_, ts, payload, size, created), record in zip(rows, put):
        assert isinstance(payload, bytes) and payload[0] == codec_mod.DEFLATE_1
        assert len(payload) < size == len(record.payload.encode())
        assert type_ == codec_mod.TYPE_CODES[record.type] and ts == 1762134834518
        assert isinstance(created, float)  # put at time.time(), not at the ts
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**7)
    got = box.read_after(0, 10)
    assert [(r.id, r.type, r.ts, r.payload) for r in got] == \
        [(r.id, r.type, r.ts, r.payload) for r in put]
    assert [r.envelope_text() for r in got] == [r.envelope_text() for r in put]
    assert len(SAMPLE and rows[0][3]) < 140  # a sample of ~500 bytes stored in under 140


def test_a_row_compression_does_not_shrink_is_stored_as_text(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    record = box.put("ping", {}, "not a timestamp")  # 2 bytes: deflate cannot beat that
    (_, type_, ts, payload, _, created), = stored_rows(box)
    assert (type_, ts, payload) == ("ping", "not a timestamp", record.payload)
    assert isinstance(created, float)
    assert box.read_after(0, 1) == [record]


@pytest.mark.parametrize("ts", ["2025-01-01T00:00:00.000Z", "1999-12-31T23:59:59.999Z",
                                "2025-01-01T00:00:00Z", "2025-01-01T00:00:00.000+00:00",
                                "2025-01-01T00:00:00.000z", "2025-13-01T00:00:00.000Z",
                                "2025-01-01T00:00:00.\u0661\u0662\u0663Z",
                                "0999-01-01T00:00:00.000Z"])
def test_a_timestamp_reads_back_exactly_as_given(tmp_path, ts):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    box.put("telemetry", {"n": 1}, ts)
    assert box.read_after(0, 1)[0].ts == ts
    stored_ts = stored_rows(box)[0][2]
    assert isinstance(stored_ts, int) == (ts in ("2025-01-01T00:00:00.000Z",
                                                  "1999-12-31T23:59:59.999Z"))


def test_the_oldest_age_comes_from_the_ts_or_the_creation_time(tmp_path):
    from agent import protocol as p

    box = Outbox(CODEC, str(tmp_path), 10**6)
    now = 1762134834.518
    box.put("telemetry", {"n": 1}, p.format_timestamp(now), now)  # as the sampler does
    assert stored_rows(box)[0][5] is None
    assert box.stats().oldest_created == pytest.approx(now, abs=0.001)
    box.ack([box.read_after(0, 1)[0].id])
    box.put("telemetry", {"n": 2}, p.format_timestamp(now), now + 30)  # created later
    assert box.stats().oldest_created == now + 30


def test_a_sample_takes_a_third_of_a_small_page(tmp_path):
    """Offline the table grows: each new page costs two more WAL frames (its parent and
    the header page), so the rows a page holds decide the flash writes (docs/performance.md,
    "Flash writes"). Schema 2 held two samples per 1 KiB page."""
    box = Outbox(CODEC, str(tmp_path), 10**8)
    for _ in range(300):
        box.put("telemetry", SAMPLE, "2025-11-03T01:53:54.518Z", 1762134834.518)
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    assert pages * outbox_mod.PAGE_SIZE <= 300 * 200  # 3 to a 512-byte page, and the tree


def test_an_unreadable_row_is_set_aside_and_the_rest_read_on(tmp_path, caplog):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    records = fill(box, 4)
    box.close()  # rows of an earlier run: read from the file, not held in memory
    box = Outbox(CODEC, str(tmp_path), 10**6)
    box._db.execute("UPDATE messages SET payload = X'07AABB' WHERE seq = 2")  # a newer codec
    box._db.execute("UPDATE messages SET payload = X'01FFFF' WHERE seq = 3")  # damaged
    assert [r.id for r in box.read_after(0, 10)] == [records[0].id, records[3].id]
    stats = box.stats()
    assert (stats.depth, stats.set_aside) == (2, 2)
    assert stats.bytes == len(records[0].payload) + len(records[3].payload)
    kept = box._db.execute("SELECT id, reason FROM set_aside ORDER BY seq").fetchall()
    assert [k[0] for k in kept] == [records[1].id, records[2].id]
    assert "unknown payload encoding" in kept[0][1] and "damaged" in kept[1][1]
    assert "cannot be read" in caplog.text


def test_the_size_check_is_exact_at_the_limit(tmp_path):
    from agent import protocol as p
    from agent.errors import LocalProtocolError

    box = Outbox(CODEC, str(tmp_path), 10**6)
    ts = "2025-01-01T00:00:00.000Z"
    probe = p.envelope_text("telemetry", f"{box._epoch}-1", ts, p.dumps({"pad": ""}))
    room = p.MAX_MESSAGE_BYTES - len(probe.encode())
    record = box.put("telemetry", {"pad": "\u00e9" * (room // 2)}, ts)  # 2 bytes each
    assert len(record.envelope_text().encode()) == p.MAX_MESSAGE_BYTES
    with pytest.raises(LocalProtocolError):
        box.put("telemetry", {"pad": "\u00e9" * (room // 2) + "xx"}, ts)
    assert box.stats().depth == 1


SECOND_SCHEMA = """
CREATE TABLE messages (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, ts TEXT NOT NULL,
    payload TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE set_aside (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL,
    ts TEXT NOT NULL, payload TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO meta VALUES ('epoch', 'beef0001'), ('dropped', '3'), ('set_aside', '0'),
    ('last_seq', '12');
"""


def test_a_file_of_the_second_schema_keeps_its_rows_ids_and_bytes(tmp_path):
    """Files written before compression: 1 KiB pages, TEXT rows. Every queued message keeps
    its id, type, timestamp and payload text, byte for byte; new rows are compressed."""
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    db.execute("PRAGMA page_size=1024")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SECOND_SCHEMA)
    old = [(seq, "telemetry" if seq % 2 else "command.result", f"2025-01-01T00:00:{seq:02d}.000Z",
            f'{{"device_id":"d","metrics":{{"n":{seq},"s":"\u00e9\\ud800"}}}}')
           for seq in range(3, 11)]
    for seq, type_, ts, text in old:
        db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                   (seq, type_, ts, text, len(text.encode()), 1000.0 + seq))
    db.close()  # seq 11 and 12 were acked and deleted: last_seq stays 12
    box = Outbox(CODEC, str(tmp_path), 10**6)
    got = box.read_after(0, 100)
    assert [(r.id, r.type, r.ts, r.payload) for r in got] == \
        [(f"beef0001-{seq}", type_, ts, text) for seq, type_, ts, text in old]
    stats = box.stats()
    assert (stats.depth, stats.bytes, stats.dropped, stats.last_seq, stats.oldest_created) == \
        (8, sum(len(o[3].encode()) for o in old), 3, 12, 1003.0)
    new = box.put("telemetry", SAMPLE, "2025-01-01T00:01:00.000Z")
    # Old rows keep the file's epoch; new ones take the epoch this open began.
    assert new.id.endswith("-13") and not new.id.startswith("beef0001-")
    assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE
    assert box._db.execute("PRAGMA user_version").fetchone()[0] == outbox_mod.SCHEMA_VERSION
    kinds = [type(row[3]) for row in stored_rows(box)]
    assert kinds == [str] * 8 + [bytes]  # old rows as they were, the new one compressed
    assert box.ack(["beef0001-3"]) == 1
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert [r.payload for r in box.read_after(0, 100)] == [o[3] for o in old[1:]] + \
        [new.payload]
    assert box.read_after(0, 1)[0].envelope_text() == \
        '{"type":"command.result","id":"beef0001-4","timestamp":"2025-01-01T00:00:04.000Z",' \
        f'"payload":{old[1][3]}}}'


def test_a_rebuild_cut_short_is_done_at_the_next_open(tmp_path):
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    db.execute("PRAGMA page_size=1024")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(outbox_mod.SCHEMA)  # migrated to schema 3, killed before the VACUUM
    db.execute(f"PRAGMA user_version={outbox_mod.SCHEMA_VERSION}")
    db.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE


MIGRATOR = """
import sys
sys.path.insert(0, {repo!r})
from agent.outbox import Outbox
from agent.codec import CODEC
print("opening", flush=True)
Outbox(CODEC, {state!r}, 10**9).close()
print("done", flush=True)
"""


def test_sigkill_while_migrating_loses_nothing(tmp_path):
    """A second-schema file of 20,000 rows, its opener killed at random moments (in the
    migration's transaction, in the VACUUM, after): each reopen has every row, byte for
    byte, under its id."""
    pristine = tmp_path / "pristine.db"
    db = sqlite3.connect(pristine, isolation_level=None)
    db.execute("PRAGMA page_size=1024")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SECOND_SCHEMA)
    texts = [f'{{"device_id":"d","metrics":{{"n":{seq},"pad":"{"p" * (seq % 300)}"}}}}'
             for seq in range(1, 20001)]
    db.execute("BEGIN")
    db.executemany("INSERT INTO messages VALUES (?, 'telemetry', '2025-01-01T00:00:00.000Z', ?, "
                   "?, 1.0)", [(seq, t, len(t)) for seq, t in enumerate(texts, 1)])
    db.execute("COMMIT")
    db.close()  # the last connection: checkpointed, no -wal left
    for round_ in range(6):
        state = tmp_path / f"r{round_}"
        state.mkdir()
        shutil.copy(pristine, state / "outbox.db")
        script = MIGRATOR.format(repo=str(REPO), state=str(state))
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "opening"
        deadline = time.monotonic() + random.uniform(0, 0.5)
        while time.monotonic() < deadline and proc.poll() is None:
            pass  # a random kill point, not a synchronisation
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        box = Outbox(CODEC, str(state), 10**9)
        got = box.read_after(0, 10**6)
        assert [r.payload for r in got] == texts
        assert got[-1].id == "beef0001-20000" and box.stats().last_seq == 20000
        assert box._db.execute("PRAGMA page_size").fetchone()[0] == outbox_mod.PAGE_SIZE
        box.close()


@pytest.mark.parametrize("lock", ["exclusive", "shared"])
def test_the_file_is_the_outboxs_alone_unless_shared(tmp_path, lock):
    """queue.lock exclusive (the default): no -shm file (its pages cost about 700 bytes a
    sample offline) and no other process can open the file while the outbox has it;
    shared: the WAL index in -shm, and another process reads the file live."""
    box = Outbox(CODEC, str(tmp_path), 10**6, lock=lock)
    fill(box, 3)
    peek = subprocess.run(
        [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], "
         "timeout=0.2); print(db.execute('SELECT COUNT(*) FROM messages').fetchone()[0])",
         str(tmp_path / "outbox.db")], capture_output=True, text=True, timeout=30)
    try:
        if lock == "exclusive":
            assert not (tmp_path / "outbox.db-shm").exists()
            assert peek.returncode != 0 and "database is locked" in peek.stderr
            with pytest.raises(outbox_mod.store.StoreError, match="locked"):
                Outbox(CODEC, str(tmp_path), 10**6, lock_wait_s=0.3)  # a second agent: exit 75
        else:
            assert (tmp_path / "outbox.db-shm").exists()
            assert peek.stdout.strip() == "3"
        assert in_file(tmp_path, "SELECT COUNT(*) FROM messages") == [(3,)]
    finally:
        box.close()
    again = Outbox(CODEC, str(tmp_path), 10**6)  # closed: the next one has it
    assert [r.seq for r in again.read_after(0, 10)] == [1, 2, 3]
    again.close()


def test_a_short_queue_is_answered_from_memory(tmp_path):
    """Online a sample is acked before the next is put: read_after, ack and stats answer
    from the rows held in memory, and the file sees only the puts' writes."""
    box = Outbox(CODEC, str(tmp_path), 10**6)
    statements = []
    box._db.set_trace_callback(statements.append)
    sent = []
    for i in range(5):
        now = 1762134834.5 + i
        box.put("telemetry", {"n": i}, p.format_timestamp(now), now)
        assert box.stats().oldest_created == now
        records = box.read_after(sent[-1].seq if sent else 0, 10)
        assert [r.payload for r in records] == [f'{{"n":{i}}}']
        sent += records
        assert box.ack([records[0].id]) == 1
        assert box.stats().depth == 0 and box.stats().oldest_created is None
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert box.read_after(0, 10) == []
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert box.stats().depth == 0  # the acks reached the file


def test_held_rows_follow_every_way_out_of_the_queue(tmp_path):
    """Rows held in memory leave with the rows of the file: acked, set aside, dropped for
    room; past HELD_ROWS the file is read. After each step the answers equal those of the
    same file opened afresh (nothing held)."""
    def answers(box):
        s = box.stats()
        return ([(r.id, r.type, r.ts, r.payload) for r in box.read_after(0, 1000)],
                (s.depth, s.bytes, s.oldest_created))

    def check(box, max_bytes=10**6):
        mine = answers(box)
        box.close()
        box = Outbox(CODEC, str(tmp_path), max_bytes)
        assert answers(box) == mine
        return box

    box = Outbox(CODEC, str(tmp_path), 10**6)
    records = fill(box, 5)
    box.ack([records[1].id])
    box = check(box)
    records = fill(box, 4, start=10)
    box.set_aside(records[2].id, "refused")
    box.ack([records[0].id])
    box = check(box)
    fill(box, outbox_mod.HELD_ROWS + 3, start=100)  # a backlog: read from the file
    assert not box._held
    box = check(box)
    box.ack([r.id for r in box.read_after(0, 1000)])
    fill(box, 3, start=500)  # held again once the queue is empty
    assert len(box._held) == 3
    box = check(box, max_bytes=400)
    box.ack([r.id for r in box.read_after(0, 1000)])
    fill(box, 15, start=600)  # max_bytes drops the oldest, held ones among them
    assert box.stats().dropped > 0 and len(box._held) == box.stats().depth
    check(box, max_bytes=400).close()


def test_a_put_that_fails_after_making_room_changes_no_count(tmp_path):
    """A full queue's put deletes the oldest rows in its own transaction; when the insert
    then fails (here a trigger makes SQLite refuse it, as a full disk would), the rollback
    brings the rows back, and the counts and held rows must still say so: a depth counted
    too low would make the outbox answer reads from memory and skip rows of the file."""
    box = Outbox(CODEC, str(tmp_path), 350)
    records = fill(box, 10)
    before = box.stats()
    assert before.bytes + 30 > 350  # the next put must make room
    box._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON messages "
                    "BEGIN SELECT RAISE(ABORT, 'no room on the disk'); END")
    with pytest.raises(sqlite3.IntegrityError, match="no room"):
        box.put("telemetry", {"device_id": "d", "metrics": {"n": 99}},
                "2025-01-01T00:01:00.000Z")
    assert box.stats() == before
    assert [r.id for r in box.read_after(0, 100)] == [r.id for r in records]
    box._db.execute("DROP TRIGGER refuse")
    box.put("telemetry", {"device_id": "d", "metrics": {"n": 99}}, "2025-01-01T00:01:00.000Z")
    after = box.stats()
    assert after.dropped >= 1 and after.depth == before.depth + 1 - after.dropped
    box.close()
    reopened = Outbox(CODEC, str(tmp_path), 350).stats()
    assert (reopened.depth, reopened.bytes, reopened.dropped) == \
        (after.depth, after.bytes, after.dropped)


def test_a_row_acked_while_read_after_decodes_it_is_not_set_aside(tmp_path, monkeypatch):
    """read_after decodes outside the lock; the transport's receiver may ack a row in that
    gap. An unreadable row acked meanwhile must not be moved aside too: counted out of the
    queue twice, depth would fall below the rows of the file, and with held rows the reads
    would then come from memory and skip a queued row until a restart. The ack is made at
    that exact point through the decoder (a deterministic stand-in for the other thread)."""
    box = Outbox(CODEC, str(tmp_path), 10**6)
    x, y = fill(box, 2)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)  # rows of the file, nothing held
    box._db.execute("UPDATE messages SET payload = X'07AABB' WHERE seq = ?", (x.seq,))
    decode = outbox_mod._decode

    def decode_while_acked(*args):
        box.ack([x.id])
        return decode(*args)

    monkeypatch.setattr(outbox_mod, "_decode", decode_while_acked)
    assert [r.id for r in box.read_after(0, 10)] == [y.id]
    monkeypatch.setattr(outbox_mod, "_decode", decode)
    assert [r.id for r in box.read_after(0, 10)] == [y.id]
    z = fill(box, 1, start=9)[0]
    assert [r.id for r in box.read_after(0, 10)] == [y.id, z.id]
    stats = box.stats()
    assert (stats.depth, stats.set_aside) == (2, 0)
    box.close()
    assert Outbox(CODEC, str(tmp_path), 10**6).stats().depth == 2


def test_a_closed_outbox_answers_nothing_from_memory(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    fill(box, 2)
    box.close()
    with pytest.raises(AttributeError):  # as before rows were held: the file is closed
        box.read_after(0, 10)


# ---------------------------------------------------------------- issue 21: identity, damaged rows


def test_ids_after_a_power_cut_are_never_ones_the_server_may_have_seen(tmp_path):
    """A power cut with durability normal can lose the newest committed rows (the WAL's
    unsynced tail): the file then comes back as it was a few puts earlier. The ids given
    after that must not repeat the lost ones, which the server may already have stored (it
    would ack the new samples as duplicates and drop them)."""
    state = tmp_path / "state"
    box = Outbox(CODEC, str(state), 10**6)
    seen = {r.id for r in fill(box, 2)}
    box.close()
    shutil.copytree(state, tmp_path / "before")  # the file as the power cut will leave it
    box = Outbox(CODEC, str(state), 10**6)
    seen |= {r.id for r in fill(box, 10)}  # sent and stored by the server, then lost
    box.close()
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "before", state)
    box = Outbox(CODEC, str(state), 10**6)
    after = fill(box, 10)
    assert after[0].seq == 3  # the file lost seqs 3-12 ...
    assert not seen & {r.id for r in after}  # ... but not one id is used twice
    assert [r.id for r in box.read_after(0, 100)][:2] == sorted(seen, key=lambda i: int(
        i.split("-")[1]))[:2]  # the rows queued before keep their ids (resent unchanged)
    box.close()


def test_old_epochs_stay_while_their_rows_are_queued_and_go_after(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    first = fill(box, 2)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)
    second = fill(box, 2)
    assert box.ack([first[0].id, second[1].id]) == 2  # ids of both epochs are known
    assert box.ack([first[1].id.split("-")[0] + "-3"]) == 0  # seq 3 is not the old epoch's
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)
    assert [r.id for r in box.read_after(0, 10)] == [first[1].id, second[0].id]
    box.ack([first[1].id, second[0].id])
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**6)  # nothing queued: only the new epoch is kept
    assert [row[0] for row in box._db.execute("SELECT first_seq FROM epochs")] == [5]
    box.close()


DAMAGED = [
    # (what the damage is, SQL value replacing the payload, words of the reason)
    ("a blob's serial type flipped to text", "CAST(X'01FF8000' AS TEXT)", "not UTF-8"),
    ("an integer where the payload was", "42", "an integer"),
    ("a real where the payload was", "4.5", "a real"),
    ("text that is not JSON", "'{\"device_id\": '", "not JSON"),
    ("JSON that is not an object", "'[1, 2]'", "not an object"),
    ("NaN, which JSON does not have", "'{\"x\": NaN}'", "not JSON"),
    ("JSON nested too deeply", "'{\"x\":' || replace(hex(zeroblob(50000)), '00', '[') || '}'",
     "nested too deeply"),
    ("an unknown compression", "X'07AABB'", "encoding"),
    ("a damaged deflate stream", "X'01FFFFFFFF'", "damaged"),
    ("an empty blob", "X''", "encoding"),
    ("over the size limit", "'{\"x\":\"' || hex(zeroblob(400000)) || '\"}'", "size limit"),
]


@pytest.mark.parametrize("what,value,words", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_damaged_payload_is_set_aside_with_its_reason_and_the_rest_flows(
        tmp_path, what, value, words):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    rows = fill(box, 3)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**7)  # rows of the file, nothing held
    box._db.execute(f"UPDATE messages SET payload = {value} WHERE seq = 2")
    got = box.read_after(0, 10)  # must not raise
    assert [r.id for r in got] == [rows[0].id, rows[2].id]
    stats = box.stats()
    assert (stats.depth, stats.set_aside) == (2, 1)
    reason = box._db.execute("SELECT reason FROM set_aside WHERE seq = 2").fetchone()[0]
    assert words in reason, reason
    assert box.read_after(0, 10) == got  # set aside once, and gone from the queue
    box.close()


@pytest.mark.parametrize("column,value,words", [
    ("type", "CAST(X'FF' AS TEXT)", "type"), ("type", "9", "type"), ("type", "'tele'", "type"),
    ("ts", "X'00'", "ts"), ("ts", "'yesterday'", "ts"), ("ts", "-5", "ts"),
    ("ts", "9223372036854775807", "ts"),
])
def test_a_damaged_type_or_time_is_set_aside_too(tmp_path, column, value, words):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    rows = fill(box, 2)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**7)
    box._db.execute(f"UPDATE messages SET {column} = {value} WHERE seq = 1")
    assert [r.id for r in box.read_after(0, 10)] == [rows[1].id]
    reason = box._db.execute("SELECT reason FROM set_aside WHERE seq = 1").fetchone()[0]
    assert words in reason
    box.close()


def test_damaged_sizes_times_and_counters_do_not_stop_the_queue(tmp_path):
    """Cells the queue itself reads (size, created, the meta counters) damaged: it opens,
    counts, makes room and acks without an exception."""
    box = Outbox(CODEC, str(tmp_path), 3000)
    rows = fill(box, 4)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 3000)
    db = box._db
    db.execute("UPDATE messages SET size = CAST(X'FF00' AS TEXT), created = 'x' WHERE seq = 1")
    db.execute("UPDATE meta SET value = CAST(X'C3' AS TEXT) WHERE key = 'dropped'")
    db.execute("UPDATE meta SET value = 'many' WHERE key = 'set_aside'")
    box.close()
    box = Outbox(CODEC, str(tmp_path), 3000)
    assert box.stats().depth == 4
    assert box.ack([rows[0].id]) == 1
    fill(box, 200, start=10)  # makes room over damaged sizes
    assert box.stats().dropped > 0
    box.close()

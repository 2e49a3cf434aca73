"""The disk queue on real SQLite files: order, ids, acks, bounds, corruption, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from helpers import REPO

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
    assert second[0].seq == 4  # AUTOINCREMENT: never reused, even after deletes
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


def test_sigkill_after_put_loses_nothing(tmp_path):
    """A child process puts messages and reports each; we SIGKILL it mid-stream."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from agent.outbox import Outbox
        box = Outbox({str(tmp_path)!r}, 10**8)
        i = 0
        while True:
            r = box.put("telemetry", {{"i": i}}, "2025-01-01T00:00:00.000Z")
            print(r.id, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    reported = [proc.stdout.readline().strip() for _ in range(200)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stored = {r.id for r in Outbox(str(tmp_path), 10**8).read_after(0, 10**6)}
    assert set(reported) <= stored  # every put that returned is on disk

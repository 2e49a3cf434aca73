"""Disk faults: corrupt queue files (while the agent is stopped, and under a running one),
a deleted queue file. Each corruption must be detected, set aside with what was lost said
in the log, and the agent must go on delivering new samples (no crash, no reconnect loop).
The full disk is in test_hardening.py (a private tmpfs)."""

from __future__ import annotations

import os
import random

import pytest
from faults import record, times
from helpers import AgentProcess, ServerProcess, free_port, stored, wait_for, write_config

from agent.outbox import PAGE_SIZE, Outbox
from agent.codec import CODEC


def prefill(state, n):
    box = Outbox(CODEC, str(state), 10**9)
    box._db.execute("PRAGMA synchronous=OFF")  # set-up only
    ids = [box.put("telemetry", {"device_id": "device-001", "metrics": {"n": i, "pad": i * 7}},
                   "2025-01-01T00:00:00.000Z").id for i in range(n)]
    box.close()  # checkpointed: every page is in outbox.db itself
    return ids


def break_page(path, page, rng):
    """Make one b-tree page unreadable: its type byte is set to a value no page has."""
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE_SIZE)
        f.write(bytes([rng.choice([0x00, 0x03, 0x07, 0xFF])]))


def truncate_mid_record(path, rng):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(size // 3, size - PAGE_SIZE) // 7 * 7)  # not on a boundary


@pytest.mark.parametrize("damage", ["page", pytest.param("truncate", marks=pytest.mark.faults)])
def test_corruption_while_stopped_is_found_at_start_and_the_agent_goes_on(tmp_path, damage):
    rng = random.Random()
    for round_ in range(times(1, 10)):
        folder = tmp_path / f"r{round_}"
        state = folder / "state"
        prefill(state, 3000)
        if damage == "page":
            break_page(state / "outbox.db", rng.randrange(20, 200), rng)
        else:
            truncate_mid_record(state / "outbox.db", rng)
        record("corruptions_injected")
        srv = ServerProcess(db=str(folder / "server.db"))
        agent = AgentProcess(write_config(folder, srv.url))
        try:
            wait_for(lambda a=agent: a.status().get("acked", 0) >= 3, what="new samples")
            assert "is corrupt" in agent.log() and list(state.glob("outbox.db.corrupt-*"))
            record("corruptions_detected")
        finally:
            assert agent.stop() == 0
            srv.stop()


def test_a_page_that_fails_only_on_a_later_read_is_set_aside_not_retried(tmp_path):
    """The file passes its check at open; a page breaks under the running agent and fails
    when the backlog reaches it: the file is set aside then, the loss is said, and new
    samples flow (before this, the agent reconnected in a loop with backoff)."""
    state = tmp_path / "state"
    backlog = prefill(state, 30_000)  # ~4 MB: more than SQLite's 2 MB page cache
    port, db = free_port(), tmp_path / "server.db"
    agent = AgentProcess(write_config(tmp_path, f"ws://127.0.0.1:{port}/v1/ws",
                                      server={"max_messages_per_minute": 6000}))
    try:
        wait_for(lambda: agent.status().get("queue_depth", 0) >= 30_000, what="the agent up")
        break_page(state / "outbox.db", 12, random.Random())  # early rows: read first
        record("corruptions_injected")
        srv = ServerProcess(port, db=str(db))
        try:
            wait_for(lambda: "failed a read after opening" in agent.log(), timeout=30,
                     what="the corrupt page found")
            record("corruptions_detected")
            assert "messages queued in it are lost" in agent.log()
            # and then it goes on: samples taken now reach the server, no reconnect loop.
            # Counted in the log, not status.json: its counters are rewritten only every few
            # seconds, so a first read could miss the connects that failed before the server
            # was up and the second then count them.
            stored_now = len(stored(db))
            wait_for(lambda: len(stored(db)) >= stored_now + 5, timeout=20,
                     what="new samples after the loss")
            after = agent.log().split("failed a read after opening", 1)[1]
            assert after.count("connection lost") + after.count("cannot connect") <= 1
            wait_for(lambda: agent.status()["dropped"] > 0, what="the loss counted")
            assert not set(backlog) <= {r["id"] for r in stored(db)}  # some really were lost
        finally:
            srv.stop()
    finally:
        assert agent.stop() == 0


def test_deleted_queue_file_starts_fresh_with_new_ids(tmp_path):
    state = tmp_path / "state"
    old = prefill(state, 50)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{state}/outbox.db{suffix}"):
            os.unlink(f"{state}/outbox.db{suffix}")
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    agent = AgentProcess(write_config(tmp_path, srv.url))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 3, what="delivery")
        ids = {r["id"] for r in stored(tmp_path / "server.db")}
        assert not ids & set(old)  # a fresh file has a fresh id space
    finally:
        assert agent.stop() == 0
        srv.stop()

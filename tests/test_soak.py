"""Opt-in fault soak (pytest -m soak): the server is SIGKILLed and restarted again and again.

Every sample the agent ever stored must end up at the server exactly once, in order.
"""

from __future__ import annotations

import random
import sqlite3
import time

import pytest
from helpers import AgentProcess, ServerProcess, free_port, outbox_ids, stored, wait_for, \
    write_config


@pytest.mark.soak
def test_server_killed_repeatedly_loses_nothing(tmp_path):
    port = free_port()
    db = tmp_path / "server.db"
    agent = AgentProcess(write_config(tmp_path, f"ws://127.0.0.1:{port}/v1/ws",
                                      telemetry={"interval_s": 0.05}))
    rng = random.Random(1)
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end:
            srv = ServerProcess(port, db=str(db))
            wait_for(lambda: len(stored(db)) > 0, timeout=20)
            deadline = time.monotonic() + rng.uniform(0.5, 3)
            wait_for(lambda d=deadline: time.monotonic() > d, timeout=5)  # up-time
            srv.kill()  # SIGKILL: no close frame, acks in flight are lost
        srv = ServerProcess(port, db=str(db))
        wait_for(lambda: len(outbox_ids(agent.state_dir)) <= 2, timeout=60,
                 what="the outbox to drain")
        assert agent.stop() == 0
        leftover = set(outbox_ids(agent.state_dir))
        rows = stored(db)
        ids = [r["id"] for r in rows]
        seqs = sorted(int(i.rsplit("-", 1)[1]) for i in set(ids) | leftover)
        assert seqs == list(range(1, len(seqs) + 1)), "a sample went missing"
        assert len(ids) == len(set(ids))
        dupes = sqlite3.connect(db).execute(
            "SELECT COUNT(*) - COUNT(DISTINCT sample_time) FROM telemetry").fetchone()[0]
        assert dupes == 0
        srv.stop()
    finally:
        if agent.proc.poll() is None:
            agent.kill()

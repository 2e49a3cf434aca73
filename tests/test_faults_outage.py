"""Server outages: the companion server is SIGKILLed and restarted (same port, same store)
again and again while an agent samples fast. At the end the store holds every sample id
exactly once, and nothing the agent made is missing (stored, or still queued)."""

from __future__ import annotations

from faults import record, times
from helpers import (
    AgentProcess,
    ServerProcess,
    free_port,
    outbox_ids,
    stored,
    wait_for,
    write_config,
)


def test_server_killed_again_and_again_loses_and_doubles_nothing(tmp_path):
    port, db = free_port(), tmp_path / "server.db"
    srv = ServerProcess(port, db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.05},
                                      reconnect={"base_delay_s": 0.05, "max_delay_s": 0.3}))
    try:
        for _ in range(times(3, 50)):
            acked = agent.status().get("acked", 0)
            wait_for(lambda n=acked: agent.status().get("acked", 0) > n + 3, timeout=15,
                     what="acks on this server")
            srv.kill()
            record("outages")
            srv = ServerProcess(port, db=str(db))
        wait_for(lambda: agent.status().get("queue_depth", 99) <= 3, timeout=30,
                 what="the backlog to drain")
        assert agent.stop() == 0
        status = agent.status()
        ids = [r["id"] for r in stored(db)]
        queued = set(outbox_ids(agent.state_dir))
        doubled = len(ids) - len(set(ids))
        record("outage_duplicates_stored", doubled)
        assert doubled == 0
        seqs = {int(i.rsplit("-", 1)[1]) for i in set(ids) | queued}
        lost = len(set(range(1, max(seqs) + 1)) - seqs)
        record("outage_lost", lost)
        assert lost == 0
        resent = status["sent_items"] - len(ids)
        record("wire_duplicate_pct", 100.0 * max(resent, 0) / len(ids), how="max")
    finally:
        agent.kill()
        srv.stop()

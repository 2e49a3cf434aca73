"""Network faults between a real agent and a real server, through tests/faultproxy.py.

Each fault runs for a while under an agent sampling every 0.1 s, then the link heals
and every sample must reach the server exactly once; the agent must stay healthy
(no stuck thread: it stops with 0 within 5 s) with bounded memory.
"""

from __future__ import annotations

import time

import psutil
import pytest
from faultproxy import FaultProxy
from faults import record, times
from helpers import AgentProcess, ServerProcess, outbox_ids, stored, wait_for, write_config

PING_INTERVAL, PING_TIMEOUT = 1.0, 1.0


@pytest.fixture
def link(tmp_path):
    db = tmp_path / "server.db"
    srv = ServerProcess(db=str(db))
    proxy = FaultProxy(int(srv.url.rsplit(":", 1)[1].split("/")[0]))
    agent = AgentProcess(write_config(tmp_path, proxy.url, telemetry={"interval_s": 0.1},
                                      server={"ping_interval_s": PING_INTERVAL,
                                              "ping_timeout_s": PING_TIMEOUT,
                                              "ack_timeout_s": 3}))
    wait_for(lambda: agent.status().get("acked", 0) >= 3, what="the link working")
    yield srv, proxy, agent, db
    proxy.close()
    agent.kill()
    srv.stop()


def _heals(proxy, agent, db):
    """Back to a clean link: every sample queued arrives, once; the agent is sound."""
    proxy.mode = "pass"
    proxy.reset_all()  # whatever the fault left half-dead
    wait_for(lambda: agent.status().get("queue_depth", 1) <= 2 and agent.status()["connected"],
             timeout=30, what="the backlog to drain after the fault")
    rss = psutil.Process(agent.proc.pid).memory_info().rss
    assert rss < 100 * 2**20, f"agent RSS {rss / 2**20:.0f} MB"
    assert agent.stop() == 0  # no stuck thread
    queued = set(outbox_ids(agent.state_dir))
    ids = [r["id"] for r in stored(db)]
    assert len(ids) == len(set(ids)), "a sample was stored twice"
    seqs = sorted(int(i.rsplit("-", 1)[1]) for i in set(ids) | queued)
    lost = len(set(range(1, seqs[-1] + 1)) - set(seqs))
    record("network_lost", lost)
    assert lost == 0, f"{lost} samples lost"


def test_blackhole_is_noticed_within_ping_interval_and_timeout(link):
    srv, proxy, agent, db = link
    for _ in range(times(1, 5)):
        before = proxy.accepted
        proxy.mode = "blackhole"
        start = time.monotonic()
        record("network_faults")
        # a new connection means the agent gave the silent one up
        wait_for(lambda b=before: proxy.accepted > b, timeout=10, interval=0.01,
                 what="the agent to give up the dead link")
        took = time.monotonic() - start
        # ping interval + ping timeout, plus the first backoff step (<= 0.5 s here) and slack
        assert took < PING_INTERVAL + PING_TIMEOUT + 0.5 + 1.0, took
        proxy.mode = "pass"
        proxy.reset_all()
        wait_for(lambda: agent.status().get("connected"), what="reconnection")
    _heals(proxy, agent, db)


@pytest.mark.parametrize("mode", [pytest.param("reset", marks=pytest.mark.faults),
                                  pytest.param("half_open", marks=pytest.mark.faults),
                                  pytest.param("trickle", marks=pytest.mark.faults),
                                  pytest.param("flap", marks=pytest.mark.faults)])
def test_a_bad_link_loses_nothing_and_leaves_the_agent_sound(link, mode):
    srv, proxy, agent, db = link
    for _ in range(times(1, 5)):
        proxy.mode = mode
        record("network_faults")
        start = time.monotonic()
        wait_for(lambda t=start: time.monotonic() - t > 1.5, timeout=3)  # the fault lasts 1.5 s
        proxy.mode = "pass"
        proxy.reset_all()
        wait_for(lambda: agent.status().get("connected"), timeout=15, what="reconnection")
    _heals(proxy, agent, db)

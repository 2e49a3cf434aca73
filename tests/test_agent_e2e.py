"""nexus-agent end to end: real agent process, real nexus-server process, loopback, signals."""

from __future__ import annotations

import signal
import time

import pytest
from helpers import (
    AgentProcess,
    ServerProcess,
    connected,
    free_port,
    mint,
    outbox_ids,
    stored,
    wait_for,
    write_config,
)

from agent import protocol as p


def _await_delivery(db, ids, what):
    """Wait until every id is at the server, then check each arrived once, in sample order."""
    wait_for(lambda: {r["id"] for r in stored(db)} >= set(ids), timeout=20, what=what)
    rows = stored(db)
    by_id = {r["id"]: r for r in rows}
    missing = [i for i in ids if i not in by_id]
    assert not missing, f"{len(missing)} samples never arrived: {missing[:5]}"
    # the store keys on id; a sample re-queued under a new id would show as a repeated time
    assert len({r["sample_time"] for r in rows}) == len(rows), "a sample was stored twice"
    times = [p.parse_timestamp(by_id[i]["sample_time"]) for i in ids]
    assert times == sorted(times), "sample times out of order"


@pytest.mark.parametrize("auth", ["header", "query"])
def test_telemetry_flows_with_header_or_query_auth(tmp_path, auth):
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    agent = AgentProcess(write_config(tmp_path, srv.url, server={"auth": auth}))
    try:
        rows = wait_for(lambda: len(stored(tmp_path / "server.db")) >= 3 and
                        stored(tmp_path / "server.db"), what="three samples at the server")
        metrics = rows[0]["payload"]["metrics"]
        assert rows[0]["payload"]["device_id"] == "device-001"
        for key in ("cpu_usage", "memory_usage", "disk_root_usage", "uptime_s",
                    "agent_queue_depth", "agent_rss_bytes", "net_bytes_sent"):
            assert key in metrics, key
        assert 0 <= metrics["cpu_usage"] <= 100 and 0 < metrics["memory_usage"] <= 100
        # connected is a fact, written at once; counters follow at the main loop's tick
        status = wait_for(lambda: agent.status().get("acked", 0) >= 3 and agent.status())
        assert status["connected"] and status["clock_offset_s"] is not None
        assert "eyJ" not in agent.log(), "a token leaked into the log"
    finally:
        assert agent.stop() == 0
        srv.stop()


def test_an_operator_watching_sees_live_updates(tmp_path):
    srv = ServerProcess()
    agent = AgentProcess(write_config(tmp_path, srv.url))
    try:
        op = connected(srv.url, "alice", "operator")
        op.request({"type": "subscribe", "id": "s", "payload": {
            "channel": "telemetry", "filters": {"device_id": "device-001"}}})
        update = op.recv_type("telemetry.update")
        assert update["payload"]["device_id"] == "device-001"
        assert "cpu_usage" in update["payload"]["metrics"]
    finally:
        agent.stop()
        srv.stop()


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_server_outage_every_sample_arrives_once_in_order(tmp_path, durability):
    port = free_port()
    db = tmp_path / "server.db"
    srv = ServerProcess(port, db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, queue={"durability": durability}))
    try:
        wait_for(lambda: len(stored(db)) >= 2, what="first samples")
        srv.stop()
        wait_for(lambda: len(outbox_ids(agent.state_dir)) >= 10, what="samples queued offline")
        offline = outbox_ids(agent.state_dir)
        srv = ServerProcess(port, db=str(db))
        _await_delivery(db, offline, "the backlog to arrive")
        # drained: at most the live samples of the last moment are still in flight
        wait_for(lambda: agent.status().get("queue_depth", 99) <= 2, what="the outbox to drain")
    finally:
        assert agent.stop() == 0
        srv.stop()


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_while_offline_loses_nothing(tmp_path, durability):
    port = free_port()
    db = tmp_path / "server.db"
    config = write_config(tmp_path, f"ws://127.0.0.1:{port}/v1/ws",
                          queue={"durability": durability})
    agent = AgentProcess(config)
    wait_for(lambda: len(outbox_ids(agent.state_dir)) >= 8, what="samples queued offline")
    agent.kill()  # SIGKILL: no chance to flush anything
    before_kill = outbox_ids(agent.state_dir)
    assert len(before_kill) >= 8
    srv = ServerProcess(port, db=str(db))
    agent = AgentProcess(config)
    try:
        _await_delivery(db, before_kill, "every pre-kill sample at the server")
        assert "resuming" in agent.log()
    finally:
        assert agent.stop() == 0
        srv.stop()


def test_queue_cap_drops_oldest_and_reports_it(tmp_path):
    """With ``full`` (the default ``normal`` runs the other e2e tests; the bound with acks
    waiting is in test_outbox.py)."""
    port = free_port()
    db = tmp_path / "server.db"
    config = write_config(tmp_path, f"ws://127.0.0.1:{port}/v1/ws",
                          queue={"max_bytes": 65536, "durability": "full"},
                          telemetry={"interval_s": 0.05})
    agent = AgentProcess(config)
    try:
        status = wait_for(lambda: agent.status().get("dropped", 0) > 0 and agent.status(),
                          timeout=30, what="the cap to drop messages")
        assert status["queue_bytes"] <= 65536
        first_kept = outbox_ids(agent.state_dir)[0]
        assert not first_kept.endswith("-1"), "the oldest message should have been dropped"
        assert "dropped the" in agent.log()
        srv = ServerProcess(port, db=str(db))
        rows = wait_for(lambda: [r for r in stored(db)
                                 if r["payload"]["metrics"]["agent_dropped"] > 0],
                        timeout=20, what="the dropped count in telemetry")
        assert rows[0]["payload"]["metrics"]["agent_dropped"] >= 1
        srv.stop()
    finally:
        assert agent.stop() == 0


def test_corrupt_queue_file_is_moved_aside(tmp_path):
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    config = write_config(tmp_path, srv.url)
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.db").write_bytes(b"this is not an SQLite database" * 200)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= 2, what="telemetry after repair")
        assert "moved it to" in agent.log()
        assert list(state.glob("outbox.db.corrupt-*")), "the corrupt file was not kept aside"
    finally:
        assert agent.stop() == 0
        srv.stop()


def test_sigterm_stops_within_5s_closes_1000_and_keeps_unacked(tmp_path):
    db = tmp_path / "server.db"
    srv = ServerProcess(0, "-v", db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url))
    wait_for(lambda: agent.status().get("acked", 0) >= 3, what="acks")
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - start < 5.0
    assert srv.stop() == 0
    assert "(close code 1000)" in srv.log()
    # nothing lost: every id ever created (seq 1..N) is at the server or still queued
    delivered = {r["id"] for r in stored(db)}
    queued = set(outbox_ids(agent.state_dir))
    seqs = sorted(int(i.rsplit("-", 1)[1]) for i in delivered | queued)
    assert seqs == list(range(1, len(seqs) + 1))
    assert agent.status()["stopped"] is True


def test_dead_peer_is_detected_when_tcp_goes_silent(tmp_path):
    """SIGSTOP freezes the server: TCP stays up, nothing answers. The agent must notice."""
    srv = ServerProcess()
    agent = AgentProcess(write_config(tmp_path, srv.url, server={
        "ping_interval_s": 0.5, "ping_timeout_s": 1.0, "ack_timeout_s": 2.0}))
    try:
        wait_for(lambda: agent.status().get("connected"), what="connection")
        srv.proc.send_signal(signal.SIGSTOP)
        status = wait_for(lambda: not agent.status().get("connected", True) and agent.status(),
                          timeout=10, what="the agent to notice the dead peer")
        assert "no answer to ping" in status["last_error"] or "no ack" in status["last_error"]
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        agent.stop()
        srv.stop()


def test_auth_refusal_backs_off_and_is_logged_once(tmp_path):
    srv = ServerProcess(0, "-v")
    config = write_config(tmp_path, srv.url, token="not-a-valid-token",
                          reconnect={"base_delay_s": 0.01, "max_delay_s": 1.0})
    agent = AgentProcess(config)
    try:
        time_window = 3.0
        wait_for(lambda: "refused the token" in agent.log(), what="the refusal log line")
        start = time.monotonic()
        first = agent.status().get("reconnects", 0)
        wait_for(lambda: time.monotonic() - start > time_window, timeout=time_window + 1)
        attempts = agent.status().get("reconnects", 0) - first
        # at the cap (0.5 to 1 s apart) that is at most ~6 in 3 s; base delay would be ~100s
        assert attempts <= 7, attempts
        assert agent.log().count("refused the token") == 1
        # provisioning rotates the token file: the next attempt reads and uses it
        token_file = tmp_path / "token"
        token_file.write_text(mint("device-001") + "\n")
        wait_for(lambda: agent.status().get("connected"), what="the rotated token to work")
        assert "accepts the token again" in agent.log()
    finally:
        agent.stop()
        srv.stop()


def test_agent_answers_the_servers_protocol_pings(tmp_path):
    """A server pinging every 0.3 s and closing after 0.3 s without pong keeps the agent."""
    srv = ServerProcess(0, "--ping-interval", "0.3", "--ping-timeout", "0.3")
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 5},
                                      server={"ping_interval_s": 60}))
    try:
        wait_for(lambda: agent.status().get("connected"), what="connection")
        first = agent.status()["reconnects"]
        # many server pings later (the sampler is quiet: only pongs keep the link). A lost
        # connection is a fact: the status file says so at once, and the log too.
        started = agent.status()["started"]
        wait_for(lambda: time.time() - started > 4, timeout=10)
        assert agent.status()["reconnects"] == first and agent.status()["connected"]
        assert "connection lost" not in agent.log()
    finally:
        agent.stop()
        srv.stop()


def test_live_samples_are_not_starved_by_a_backlog(tmp_path):
    """Paced at 10 msg/s with a 20-sample backlog sent as single messages (a server without
    telemetry.batch), a live sample must arrive mid-backlog. With batches, see
    test_batches.py: 20 samples leave in one message."""
    port = free_port()
    db = tmp_path / "server.db"
    config = write_config(tmp_path, f"ws://127.0.0.1:{port}/v1/ws",
                          telemetry={"interval_s": 0.25},
                          server={"max_messages_per_minute": 600})
    agent = AgentProcess(config)
    try:
        wait_for(lambda: len(outbox_ids(agent.state_dir)) >= 20, what="a backlog")
        backlog = set(outbox_ids(agent.state_dir))
        srv = ServerProcess(port, "--no-batches", db=str(db))
        wait_for(lambda: {r["id"] for r in stored(db)} >= backlog, timeout=20,
                 what="the backlog to drain")
        arrival = [r["id"] for r in stored(db)]
        last_backlog = max(arrival.index(i) for i in backlog)
        first_live = next(n for n, i in enumerate(arrival) if i not in backlog)
        assert first_live < last_backlog, "live samples waited for the whole backlog"
        srv.stop()
    finally:
        assert agent.stop() == 0


def test_connected_agent_is_idle_between_samples(tmp_path):
    """Regression: an empty outbox once made the transport spin a core at select(0)."""
    import psutil

    srv = ServerProcess(db=str(tmp_path / "server.db"))
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 1}))
    try:
        wait_for(lambda: stored(tmp_path / "server.db"), what="a first sample delivered")
        proc = psutil.Process(agent.proc.pid)
        before, start = sum(proc.cpu_times()[:2]), time.monotonic()
        wait_for(lambda: time.monotonic() - start > 3, timeout=5)  # a window to measure over
        used = sum(proc.cpu_times()[:2]) - before
        assert used < 0.3 * (time.monotonic() - start), f"{used:.2f} s of CPU in ~3 s"
    finally:
        agent.stop()
        srv.stop()


def test_a_lost_connection_is_in_the_status_file_at_once(tmp_path):
    """At a 5 s interval the main loop ticks every 30 s (counters wait for it); a fact such
    as the connection's loss wakes it and is written at once."""
    srv = ServerProcess()
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 5}))
    try:
        wait_for(lambda: agent.status().get("connected"), what="the connection")
        srv.stop()
        status = wait_for(lambda: agent.status().get("connected") is False and agent.status(),
                          timeout=5, what="the loss in the status file")
        assert status["last_error"]
    finally:
        agent.stop()


def test_a_token_that_expires_mid_connection_is_replaced_by_the_rotated_one(tmp_path):
    """The server closes the connection with 4000 when the token's exp passes; a
    provisioning script has meanwhile written a new token to the file: the agent tries
    it after its base delay, not after its 30 s cap, and telemetry flows again."""
    db = tmp_path / "server.db"
    srv = ServerProcess(db=str(db))
    config = write_config(tmp_path, srv.url, token=mint("device-001", ttl=3),
                          reconnect={"base_delay_s": 0.2, "max_delay_s": 30})
    agent = AgentProcess(config)
    try:
        wait_for(lambda: stored(db), 10, what="telemetry with the first token")
        (tmp_path / "token").write_text(mint("device-001", ttl=3600) + "\n")
        wait_for(lambda: "Token expired" in agent.log(), 10, what="the expiry close")
        closed_at = len(stored(db))
        start = time.monotonic()
        wait_for(lambda: len(stored(db)) > closed_at + 2, 10, what="telemetry again")
        assert time.monotonic() - start < 8.0  # well under the 15-30 s of the cap
        assert "eyJ" not in agent.log()
    finally:
        assert agent.stop() == 0
        srv.stop()

"""Regression tests for the defects found by trying to break the agent and the server (issue 8).

Each test fails on the code before the fix. Real parts throughout: agent and server
processes, a WebSocket server in this process that misbehaves on purpose (FakeServer),
real SQLite locks held by another process, and private tmpfs mounts (``unshare -m``,
root only) for a full or read-only disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    REPO,
    AgentProcess,
    FakeServer,
    Peer,
    ServerProcess,
    ack,
    child_env,
    connected,
    outbox_ids,
    outbox_snapshot,
    stored,
    wait_for,
    welcome,
    write_config,
)

from agent import protocol as p
from agent.errors import LocalProtocolError
from agent.outbox import Outbox
from agent.codec import CODEC
from agent.runner import fit_result
from agent.store import StoreError


def telemetry(msg_id, device="device-001", **metrics):
    return {"type": "telemetry", "id": msg_id, "timestamp": "2025-11-03T01:53:54.518Z",
            "payload": {"device_id": device, "metrics": metrics or {"cpu_usage": 1.0}}}


# ---------------------------------------------------------------- 1. poison messages


def test_big_command_output_is_cut_to_fit_and_telemetry_keeps_flowing(tmp_path):
    """`seq 1 30000` is ~170 KB of output: the result must fit one message, marked as cut."""
    db = tmp_path / "server.db"
    srv = ServerProcess(db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, commands={
        "allow": {"numbers": {"argv": ["/usr/bin/seq", "1", "30000"]}}}))
    try:
        wait_for(lambda: agent.status().get("connected"), what="connection")
        operator = connected(srv.url, "ops", "operator")
        reply = operator.request({"type": "command", "id": "big-1", "payload": {
            "device_id": "device-001", "name": "numbers"}})
        while reply["type"] != "command.result":
            reply = operator.recv()
        result = reply["payload"]
        assert result["status"] == "succeeded"
        assert result["stdout"].startswith("1\n2\n3\n")
        assert "[cut:" in result["stdout"]
        assert len(json.dumps(reply).encode()) <= p.MAX_MESSAGE_BYTES + p.BROADCAST_OVERHEAD_BYTES
        # and the queue is not jammed behind it: later samples arrive
        acked = agent.status()["acked"]
        wait_for(lambda: agent.status().get("acked", 0) >= acked + 5, what="samples after it")
        assert agent.status()["set_aside"] == 0
    finally:
        agent.stop()
        srv.stop()


def test_fit_result_keeps_every_result_within_one_message():
    noisy = "\x01\"\\é" * 40_000  # escapes make JSON text far longer than the string
    for out, err in [(noisy, ""), ("", noisy), (noisy, noisy), ("x" * 70_000, "e" * 100)]:
        result = fit_result(p.CommandResult("c" * 128, "d" * 128, "failed", 1, out, err, 5))
        text = p.envelope_text("command.result", "abcdef01-" + "9" * 20,
                               "2025-01-01T00:00:00.000Z", p.dumps(result.to_payload()))
        assert len(text.encode()) <= p.MAX_MESSAGE_BYTES
        for before, after in ((out, result.stdout), (err, result.stderr)):
            if len(before) > 20_000:
                assert "[cut:" in after and before.startswith(after.split("\n[cut:")[0])
    small = p.CommandResult("c", "d", "succeeded", 0, "hello", "", 1)
    assert fit_result(small) == small
    both = fit_result(p.CommandResult("c", "d", "failed", 1, "o" * 60_000, "e" * 60_000, 1))
    assert len(both.stderr) > 20_000  # stderr keeps about half the room


def test_outbox_refuses_what_the_protocol_cannot_carry(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    with pytest.raises(LocalProtocolError):
        box.put("telemetry", {"device_id": "d", "metrics": {}, "blob": "x" * 70_000},
                "2025-01-01T00:00:00.000Z")
    assert box.stats().depth == 0 and box.read_after(0, 10) == []


def _poison_server(poison_id, mode):
    """Acks everything except ``poison_id``: closes 1009 on it, or rejects it."""
    def handler(conn):
        welcome(conn)
        for text in conn:
            msg = json.loads(text)
            if msg.get("id") == poison_id and mode == "close":
                conn.close(1009, "message too big")
                return
            if msg.get("id") == poison_id:
                conn.send(json.dumps({"type": "error", "id": poison_id, "error": {
                    "code": "INVALID_MESSAGE", "message": "no", "field": "payload"}}))
            elif msg.get("type") in ("telemetry", "command.result"):
                ack(conn, msg["id"])
    return handler


@pytest.mark.parametrize("mode", ["close", "reject"])
def test_a_message_the_server_keeps_refusing_is_set_aside(tmp_path, mode):
    state = tmp_path / "state"
    box = Outbox(CODEC, str(state), 10**7)
    poison = box.put("telemetry", {"device_id": "device-001", "metrics": {"x": 1}},
                     "2025-01-01T00:00:00.000Z")
    box.close()
    fake = FakeServer(_poison_server(poison.id, mode))
    agent = AgentProcess(write_config(tmp_path, fake.url, telemetry={"interval_s": 0.3}))
    try:
        status = wait_for(lambda: agent.status().get("set_aside") == 1 and
                          agent.status().get("acked", 0) >= 3 and agent.status(),
                          timeout=20, what="the poison set aside and later samples acked")
        assert status["queue_depth"] <= 3
        assert poison.id not in outbox_ids(state)
        with outbox_snapshot(state) as db:  # the agent has the file itself: read a copy
            (kept_id, reason), = db.execute("SELECT id, reason FROM set_aside").fetchall()
        assert kept_id == poison.id and ("1009" in reason or "INVALID_MESSAGE" in reason)
        assert "set aside message" in agent.log()
    finally:
        agent.stop()


# ---------------------------------------------------------------- 2. a locked queue is not corrupt

LOCKER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()
""")


def _lock(path):
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _unlock(proc):
    proc.stdin.close()
    proc.wait(10)


def test_locked_outbox_is_waited_for_never_moved_aside(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    ids = [box.put("telemetry", {"n": i}, "2025-01-01T00:00:00.000Z").id for i in range(5)]
    box.close()
    locker = _lock(tmp_path / "outbox.db")
    try:
        with pytest.raises(StoreError) as info:
            Outbox(CODEC, str(tmp_path), 10**7, lock_wait_s=1.0)
        assert info.value.temporary and "locked" in info.value.reason
        assert not list(tmp_path.glob("*.corrupt*"))
    finally:
        _unlock(locker)
    box = Outbox(CODEC, str(tmp_path), 10**7)
    assert [r.id for r in box.read_after(0, 10)] == ids


def test_agent_started_on_a_locked_queue_waits_and_keeps_its_data(tmp_path):
    state = tmp_path / "state"
    box = Outbox(CODEC, str(state), 10**7)
    ids = [box.put("telemetry", {"device_id": "device-001", "metrics": {"n": i}},
                   "2025-01-01T00:00:00.000Z").id for i in range(5)]
    box.close()
    db = tmp_path / "server.db"
    srv = ServerProcess(db=str(db))
    locker = _lock(state / "outbox.db")
    agent = AgentProcess(write_config(tmp_path, srv.url))
    try:
        wait_for(lambda: "locked by another process" in agent.log(), what="the wait")
        _unlock(locker)
        wait_for(lambda: {r["id"] for r in stored(db)} >= set(ids), what="the queued data sent")
        assert not list(state.glob("*.corrupt*"))
    finally:
        if locker.poll() is None:
            _unlock(locker)
        agent.stop()
        srv.stop()


def test_garbage_command_ledger_is_moved_aside_not_a_crash(tmp_path):
    import queue

    from agent.config import CommandsConfig
    from agent.mailbox import Mailbox
    from agent.runner import CommandRunner

    (tmp_path / "commands.db").write_bytes(b"this is not a database" * 100)
    box = Outbox(CODEC, str(tmp_path), 10**7)
    runner = CommandRunner(CommandsConfig(), "d", str(tmp_path), queue.SimpleQueue(),
                           Mailbox(box, lambda: None, "d"))
    runner.close()
    assert list(tmp_path.glob("commands.db.corrupt-*"))


# ---------------------------------------------------------------- 3. what a server sends is bounded


def test_fragment_flood_is_refused_at_the_message_limit(tmp_path):
    def flood(conn):
        welcome(conn)
        try:
            conn.send("x" * 65536 for _ in range(300))  # 300 fragments, ~19 MB in one message
        except Exception:  # noqa: BLE001 - the agent hangs up on us, as it should
            pass

    fake = FakeServer(flood)
    agent = AgentProcess(write_config(tmp_path, fake.url))
    try:
        wait_for(lambda: fake.connections >= 2, what="the agent to hang up and come back")
        assert "over 1048576 bytes (in fragments)" in agent.log()
        assert psutil.Process(agent.proc.pid).memory_info().rss < 100 * 2**20
    finally:
        agent.stop()


def test_trickled_fragments_do_not_stop_the_ack_timer(tmp_path):
    """A server that never acks but keeps a fragmented message trickling (a frame every
    0.3 s): the ack timeout must still end the connection."""
    def trickle(conn):
        welcome(conn)

        def parts():
            for _ in range(200):
                yield "{"
                time.sleep(0.3)  # the fault's pace, not a synchronisation
        try:
            conn.send(parts())
        except Exception:  # noqa: BLE001
            pass

    fake = FakeServer(trickle)
    agent = AgentProcess(write_config(tmp_path, fake.url, server={"ack_timeout_s": 1.5,
                                                                  "ping_interval_s": 60}))
    try:
        wait_for(lambda: "no ack within 1.5 s" in agent.log(), timeout=15,
                 what="the ack timer to fire")
    finally:
        agent.stop()


# ---------------------------------------------------------------- 4. broadcasts fit


def test_largest_accepted_telemetry_is_acked_by_id_and_broadcast(server):
    operator = connected(server.url, "ops", "operator")
    operator.request({"type": "subscribe", "id": "s", "payload": {"channel": "telemetry"}})
    device = connected(server.url)
    msg = telemetry("big-1", cpu_usage=1.0)
    filler = p.MAX_MESSAGE_BYTES - len(json.dumps(msg)) - 40
    msg["payload"]["metrics"] = {"cpu_usage": 1.0, "k" * filler: 2.0}
    assert p.MAX_MESSAGE_BYTES - 200 < len(json.dumps(msg)) <= p.MAX_MESSAGE_BYTES
    reply = device.request(msg)
    assert (reply["type"], reply["id"]) == ("ack", "big-1")
    update = operator.recv_type("telemetry.update")
    assert update["payload"]["message_id"] == "big-1"


# ---------------------------------------------------------------- 5. smaller ones


def test_lone_surrogate_id_gets_invalid_message_and_the_connection_stays(server):
    device = connected(server.url)
    device.send('{"type":"ping","id":"\\ud800"}')
    error = device.recv()
    assert error["error"]["code"] == "INVALID_MESSAGE" and error["error"]["field"] == "id"
    # a lone surrogate inside a payload is stored and echoed as the same JSON value
    reply = device.request(telemetry("s-1", **{"\ud800x": 1.0}))
    assert reply["type"] == "ack"
    assert device.request({"type": "ping", "id": "after"})["type"] == "pong"


def test_deeply_nested_json_is_invalid_message_not_internal_error(server):
    device = connected(server.url)
    device.send('{"type":"ping","id":"deep","payload":' + "[" * 10_000 + "]" * 10_000 + "}")
    error = device.recv()
    assert error["error"]["code"] == "INVALID_MESSAGE" and "nested" in error["error"]["message"]
    assert device.request({"type": "ping", "id": "after"})["type"] == "pong"


def test_agent_ignores_deep_json_from_a_server_and_stays_connected(tmp_path):
    def deep(conn):
        welcome(conn)
        conn.send("[" * 10_000 + "]" * 10_000)
        for text in conn:
            msg = json.loads(text)
            if msg.get("type") == "telemetry":
                ack(conn, msg["id"])

    fake = FakeServer(deep)
    agent = AgentProcess(write_config(tmp_path, fake.url))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 5, what="acks after the deep JSON")
        assert fake.connections == 1 and "nested too deeply" in agent.log()
    finally:
        agent.stop()


def _with_mounts(mounts, *argv):
    """``argv`` run (as root) in a private mount namespace after the ``mounts`` shell lines."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for private mounts")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not allowed here: {probe.stderr.decode()[:200]}")
    # unshare and sh exec: the returned process becomes the agent itself
    return ["unshare", "-m", "sh", "-c", " && ".join(mounts) + ' && exec "$@"', "sh", *argv]


def test_read_only_state_dir_is_a_clear_config_error(tmp_path):
    state = tmp_path / "state"
    box = Outbox(CODEC, str(state), 10**7)
    box.put("telemetry", {"n": 1}, "2025-01-01T00:00:00.000Z")
    box.close()
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws")
    for extra in (["--check-config"], []):
        cmd = _with_mounts([f'mount --bind "{state}" "{state}"',
                            f'mount -o remount,bind,ro "{state}"'],
                           sys.executable, "-m", "agent", "--config", str(config), *extra)
        out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 78, out.stderr
        assert "state_dir" in out.stderr and "not writable" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not list(state.glob("*.corrupt*"))
    assert len(outbox_ids(state)) == 1


def test_full_disk_is_logged_once_counted_and_recovered(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    srv = ServerProcess()
    config = write_config(tmp_path, srv.url, telemetry={"interval_s": 0.1})
    log_path = tmp_path / "agent.log"
    cmd = _with_mounts([f'mount -t tmpfs -o size=2m tmpfs "{state}"'],
                       sys.executable, "-m", "agent", "--config", str(config))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        # the agent's own view of the file system, its private tmpfs included
        inside = Path(f"/proc/{proc.pid}/root") / str(state).lstrip("/")
        wait_for(lambda: (inside / "status.json").exists(), what="the agent running")
        with open(inside / "filler", "wb") as filler:  # fill the tmpfs the agent sees
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        wait_for(lambda: "cannot store samples" in log_path.read_text(), what="the failure")
        failing_since = time.monotonic()
        wait_for(lambda: time.monotonic() - failing_since > 1.5, timeout=3)  # ~15 samples
        text = log_path.read_text()
        assert text.count("cannot store samples") == 1, text[-3000:]
        assert "Traceback" not in text
        assert proc.poll() is None
        os.unlink(inside / "filler")
        wait_for(lambda: "storing samples again" in log_path.read_text(), what="recovery")
        wait_for(lambda: json.loads((inside / "status.json").read_text()).get("unstored", 0) >= 5
                 and json.loads((inside / "status.json").read_text())["storing"],
                 what="the status to count the samples not stored")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        srv.stop()


def test_oversized_config_file_is_refused_quickly(tmp_path):
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws")
    config.write_text(config.read_text() + "#" * (2 << 20) + "\n")
    out = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config",
                          str(config)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 78 and "larger than" in out.stderr


def test_sighup_while_the_config_is_being_read_does_not_kill_the_agent(tmp_path):
    """The config is a FIFO: the agent blocks reading it, we send SIGHUP right then."""
    srv = ServerProcess()
    real = write_config(tmp_path, srv.url)
    fifo = tmp_path / "agent-fifo.yaml"
    os.mkfifo(fifo)
    agent = AgentProcess(fifo)

    try:
        with open(fifo, "w") as writer:  # returns once the agent has opened it for reading
            agent.proc.send_signal(signal.SIGHUP)
            agent.proc.send_signal(signal.SIGHUP)
            writer.write(real.read_text())
            # Before the agent can see EOF: a regular file takes the FIFO's name, so the
            # reloads those SIGHUPs ask for read a file instead of blocking on a FIFO.
            shutil.copy(real, tmp_path / "next.yaml")
            os.replace(tmp_path / "next.yaml", fifo)
        wait_for(lambda: agent.status().get("connected"), what="the agent to run")
        wait_for(lambda: "reloaded" in agent.log(), what="the recorded SIGHUP acted on")
        assert agent.stop() == 0
    finally:
        agent.kill()
        srv.stop()


def test_token_with_exp_as_a_string_is_refused(server):
    import jwt

    from helpers import SECRET

    token = jwt.encode({"sub": "device-001", "role": "device", "exp": "9999999999"}, SECRET)
    peer = Peer(server.url, token)
    error = peer.recv()
    assert error["error"]["code"] == "AUTH_FAILED"
    assert peer.close_code() == 4000


def test_a_server_that_acks_once_and_closes_gets_backoff_not_a_storm(tmp_path):
    def once(conn):
        welcome(conn)
        for text in conn:
            msg = json.loads(text)
            if msg.get("type") == "telemetry":
                ack(conn, msg["id"])
                conn.close(1000)
                return

    fake = FakeServer(once)
    agent = AgentProcess(write_config(tmp_path, fake.url, telemetry={"interval_s": 0.05},
                                      reconnect={"base_delay_s": 0.05, "max_delay_s": 1.0}))
    try:
        wait_for(lambda: fake.connections >= 3, what="a few connections")
        start, first = time.monotonic(), fake.connections
        wait_for(lambda: time.monotonic() - start > 4, timeout=5)
        # delays grow to the 1 s cap (mean 0.5 s): about 8 in 4 s; reset to 0.05 s each
        # time (the old rule) it was over 50
        assert fake.connections - first <= 16, fake.connections - first
    finally:
        agent.stop()

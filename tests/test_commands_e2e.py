"""Remote commands end to end: nexus-server, nexus-agent and nexus-ctl as real processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from helpers import (
    REPO,
    AgentProcess,
    ServerProcess,
    child_env,
    connected,
    free_port,
    wait_for,
    write_config,
)


def allow_list(tmp_path):
    return {"allow": {
        "echo": {"argv": ["/bin/echo", "{text}"],
                 "args": {"text": {"pattern": "^[A-Za-z0-9 ]{1,32}$"}}},
        "touch": {"argv": ["/usr/bin/touch", str(tmp_path / "touched")]},
        "count": {"argv": ["/bin/sh", "-c", f"echo run >> {tmp_path / 'runs'}; echo counted"]},
        "slow": {"argv": ["/bin/sh", "-c", "sleep 1.5; echo late"], "timeout_s": 10},
        "hang": {"argv": ["/bin/sh", "-c", f"sleep 60 & echo $! > {tmp_path / 'pid'}; wait"],
                 "timeout_s": 0.5},
    }}


def ctl(url, *args, wait=20):
    return subprocess.run([sys.executable, "-m", "agent.ctl", "--url", url, "command", *args,
                           "--wait", str(wait)], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=wait + 20)


@pytest.fixture
def fleet(tmp_path):
    port = free_port()
    srv = ServerProcess(port, db=str(tmp_path / "server.db"))
    agent = AgentProcess(write_config(tmp_path, srv.url, commands=allow_list(tmp_path)))
    wait_for(lambda: agent.status().get("connected"), what="the agent to connect")
    wait_for(lambda: "subscribed" in _ping_commands(srv.url), what="commands subscription")
    yield srv, agent, tmp_path, port
    agent.stop()
    srv.stop()


def _ping_commands(url):
    # An operator command to an unknown name proves the device listens: it is rejected by the
    # agent (not DEVICE_OFFLINE at the server).
    out = ctl(url, "device-001", "probe", wait=5)
    return "subscribed" if out.returncode == 3 else ""


def test_allowed_command_runs_and_output_comes_back(fleet):
    srv, agent, tmp_path, _ = fleet
    out = ctl(srv.url, "device-001", "echo", "text=hello fleet")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello fleet\n"
    assert "succeeded (exit code 0" in out.stderr
    assert "command" in agent.log() and "nexus.audit" in agent.log()


@pytest.mark.parametrize("args, reason", [
    (["rm-everything"], "not on this device's allow-list"),
    (["touch", "path=/etc/passwd"], "not declared"),
    (["echo", "text=no/slashes"], "does not match"),
    (["echo", "text=hi; touch /tmp/pwned"], "does not match"),
    (["echo", "text=$(touch /tmp/pwned)"], "does not match"),
])
def test_rejections_run_nothing(fleet, args, reason):
    srv, agent, tmp_path, _ = fleet
    out = ctl(srv.url, "device-001", *args)
    assert out.returncode == 3, out.stderr
    assert reason in out.stderr
    assert not (tmp_path / "touched").exists()
    audit = [line for line in agent.log().splitlines() if "nexus.audit" in line]
    assert any("rejected" in line and args[0] in line for line in audit)


def test_timeout_kills_children_and_reports_timed_out(fleet):
    srv, agent, tmp_path, _ = fleet
    out = ctl(srv.url, "device-001", "hang")
    assert out.returncode == 4, out.stderr
    assert "timed_out" in out.stderr
    child = int((tmp_path / "pid").read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="the command's child to be killed")


def test_offline_device_gets_device_offline(fleet):
    srv, *_ = fleet
    out = ctl(srv.url, "device-404", "echo", "text=hi")
    assert out.returncode == 5 and "DEVICE_OFFLINE" in out.stderr
    assert "device device-404 is not connected" in out.stderr
    assert "--ttl SECONDS" in out.stderr and "payload.ttl_s" not in out.stderr


def test_rejection_reason_and_status_are_two_lines_without_exit_code_none(fleet):
    srv, *_ = fleet
    out = ctl(srv.url, "device-001", "rm-everything")
    assert out.returncode == 3
    lines = out.stderr.splitlines()
    assert "not on this device's allow-list" in lines[0]
    assert lines[1].startswith("nexus-ctl: rejected (") and lines[1].endswith(" ms)")
    assert "None" not in out.stderr


def test_a_connected_device_without_commands_is_not_called_offline(tmp_path):
    srv = ServerProcess(free_port())
    agent = AgentProcess(write_config(tmp_path, srv.url))  # no commands: section
    try:
        wait_for(lambda: agent.status().get("connected"), what="the agent to connect")
        out = ctl(srv.url, "device-001", "echo", "text=hi", wait=5)
        assert out.returncode == 5
        assert "device device-001 is connected but takes no commands" in out.stderr
        assert "commands.allow" in out.stderr and "--ttl" not in out.stderr
    finally:
        agent.stop()
        srv.stop()


def test_redelivered_id_is_not_run_twice_even_across_restart(fleet):
    srv, agent, tmp_path, _ = fleet
    op = connected(srv.url, "alice", "operator")
    request = {"type": "command", "id": "cmd-once",
               "payload": {"device_id": "device-001", "name": "count", "args": {}}}
    first = op.request(request)
    assert first["type"] == "command.result" and first["payload"]["stdout"] == "counted\n"
    again = op.request(request)
    assert again["payload"] == first["payload"]
    assert agent.stop() == 0
    agent2 = AgentProcess(agent.config)
    try:
        wait_for(lambda: agent2.status().get("connected"), what="restart")
        wait_for(lambda: _ping_commands(srv.url), what="the restarted agent to subscribe")
        third = op.request(request)
        assert third["payload"] == first["payload"]
        assert (tmp_path / "runs").read_text() == "run\n"  # ran exactly once
    finally:
        agent2.stop()


def test_result_produced_while_server_down_arrives_later(fleet):
    srv, agent, tmp_path, port = fleet
    op = connected(srv.url, "alice", "operator")
    op.send({"type": "command", "id": "cmd-late",
             "payload": {"device_id": "device-001", "name": "slow", "args": {}}})
    wait_for(lambda: "cmd-late slow" in agent.log(), what="the command to start")
    srv.stop()  # the command finishes (1.5 s) while the server is gone
    wait_for(lambda: "cmd-late slow args={}: succeeded" in agent.log(), timeout=10,
             what="the command to finish offline")
    srv2 = ServerProcess(port, db=str(tmp_path / "server.db"))
    try:
        def stored_result():
            db = sqlite3.connect(tmp_path / "server.db")
            try:
                row = db.execute("SELECT payload FROM command_results WHERE command_id = "
                                 "'cmd-late'").fetchone()
            finally:
                db.close()
            return json.loads(row[0]) if row else None

        result = wait_for(stored_result, timeout=15, what="the result at the restarted server")
        assert result["status"] == "succeeded" and result["stdout"] == "late\n"
    finally:
        srv2.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False

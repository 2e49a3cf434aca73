"""The daemon under a (test-made) systemd: notify socket, watchdog, SIGHUP reload, status."""

from __future__ import annotations

import functools
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import yaml
from helpers import (
    REPO,
    AgentProcess,
    ServerProcess,
    child_env,
    stored,
    wait_for,
    write_config,
)


class NotifySocket:
    """A Unix datagram socket standing in for systemd's $NOTIFY_SOCKET; records each datagram."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, prefix: str) -> list:
        return [(t, line) for t, msg in list(self.messages) for line in msg.split("\n")
                if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def systemd_env(notify, watchdog_usec=1_000_000):
    return child_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(watchdog_usec))


def test_ready_status_watchdog_stopping(tmp_path, notify):
    srv = ServerProcess()
    agent = AgentProcess(write_config(tmp_path, srv.url), env=systemd_env(notify))
    try:
        wait_for(lambda: notify.lines("READY=1"), what="READY=1")
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 3, what="watchdog pings")
        status = wait_for(lambda: [line for _, line in notify.lines("STATUS=connected")],
                          what="a STATUS line saying connected")
        assert "queue" in status[-1] and "dropped" in status[-1]
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0  # half of WatchdogSec=1 s, with room for scheduling
    finally:
        assert agent.stop() == 0
        srv.stop()
    assert notify.lines("STOPPING=1")


def test_stalled_sampler_stops_the_watchdog(tmp_path, notify):
    """A stuck disk (another process holds the outbox's write lock) must stop WATCHDOG=1.
    The queue is opened shared so that another process can take its lock at all."""
    srv = ServerProcess()
    agent = AgentProcess(write_config(tmp_path, srv.url, queue={"lock": "shared"}),
                         env=systemd_env(notify))
    try:
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 2, what="watchdog pings")
        blocker = sqlite3.connect(tmp_path / "state" / "outbox.db", timeout=10)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: every put blocks, then fails
        stalled_at = time.monotonic()
        try:
            # the sampler's last success is now; 3 x 0.2 s + 5 s later the pings must stop
            wait_for(lambda: time.monotonic() - stalled_at > 10, timeout=13)
            recent = [t for t, _ in notify.lines("WATCHDOG=1") if t > stalled_at + 8]
            assert recent == [], "watchdog kept pinging while the sampler was stuck"
        finally:
            blocker.rollback()
            blocker.close()
        resumed = time.monotonic()
        wait_for(lambda: [t for t, _ in notify.lines("WATCHDOG=1") if t > resumed], timeout=15,
                 what="pings to resume once the disk is free")
    finally:
        agent.stop()
        srv.stop()


def test_sighup_with_broken_config_keeps_the_old_one(tmp_path):
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    config = write_config(tmp_path, srv.url)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= 2, what="telemetry")
        good = config.read_text()
        config.write_text(good.replace("interval_s: 0.2", "interval_s: nope"))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in agent.log(), what="the refusal")
        assert "telemetry.interval_s" in agent.log()
        before = len(stored(tmp_path / "server.db"))
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= before + 3,
                 what="telemetry to keep flowing on the old config")
        assert agent.proc.poll() is None
        # a good config is taken: a slower interval shows in the sample rate
        raw = yaml.safe_load(good)
        raw["telemetry"]["interval_s"] = 5
        config.write_text(yaml.safe_dump(raw))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in agent.log(), what="the reload")
        assert "telemetry.interval_s: 0.2 -> 5.0" in agent.log()
    finally:
        assert agent.stop() == 0
        srv.stop()


def test_commands_turned_on_by_sighup_show_as_restart_needed(tmp_path):
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    config = write_config(tmp_path, srv.url)  # no commands: section
    agent = AgentProcess(config)
    try:
        wait_for(lambda: agent.status().get("connected"), what="the agent to connect")
        assert agent.status()["restart_needed"] == []
        raw = yaml.safe_load(config.read_text())
        raw["commands"] = {"allow": {"hi": {"argv": ["/bin/echo", "hi"]}}}
        config.write_text(yaml.safe_dump(raw))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.status().get("restart_needed"), what="restart_needed")
        assert agent.status()["restart_needed"][0].startswith("commands enabled")
        code, text = _status(config)
        assert code == 0 and "RESTART NEEDED:   commands enabled (no command is taken until " \
            "then)" in text, text
        assert "takes effect only after a restart" in agent.log()
    finally:
        assert agent.stop() == 0
        srv.stop()


def _status(config, *extra, env=None):
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config),
                          *extra], env=env or child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    return out.returncode, out.stdout


@pytest.mark.parametrize("where", ["state_dir", "runtime_dir"])
def test_status_tells_the_truth_before_and_after_the_server_goes(tmp_path, where):
    """Under systemd ($RUNTIME_DIRECTORY, a tmpfs) the file is there and not in state_dir."""
    srv = ServerProcess()
    config = write_config(tmp_path, srv.url)
    env = child_env()
    if where == "runtime_dir":
        (tmp_path / "run").mkdir()
        env["RUNTIME_DIRECTORY"] = str(tmp_path / "run")
    status = functools.partial(_status, env=env)
    assert status(config)[0] == 3  # not running yet
    agent = AgentProcess(config, env=env)
    try:
        code, out = wait_for(lambda: (lambda r: r[0] == 0 and r)(status(config, "--json")),
                             what="a healthy status")
        report = json.loads(out)
        assert report["connected"] is True and report["state"] == "healthy"
        assert report["token_expires"] > time.time() and report["clock_offset_s"] is not None
        code, text = status(config)
        assert "connected:        yes" in text and "token expires:" in text
        srv.stop()
        code, out = wait_for(lambda: (lambda r: r[0] == 1 and r)(status(config, "--json")),
                             what="status to report the loss")
        report = json.loads(out)
        assert report["connected"] is False and report["last_error"]
        assert report["queue_depth"] >= 0
        in_state_dir = (tmp_path / "state" / "status.json").exists()
        assert in_state_dir == (where == "state_dir")
    finally:
        agent.stop()
    assert status(config)[0] == 3  # stopped


DAEMON_MODULES = """
import os, signal, sys, threading, time
def watch():
    while not any(t.name == "nexus-transport" for t in threading.enumerate()):
        time.sleep(0.05)
    time.sleep(0.5)
    print(sorted(set(sys.argv[2].split(",")) & set(sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from agent.__main__ import main
main(["--config", sys.argv[1]])
"""


def test_the_daemon_does_not_load_what_it_does_not_use(tmp_path):
    # argparse (with shutil, bz2, lzma: about 1 MB of RSS) is for help and errors only;
    # the command runner only with an allow-list; ssl only for wss://.
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", log_level="warning")
    # encodings.idna (with unicodedata, stringprep): getaddrinfo of a str host; an ASCII
    # host name is resolved as bytes (transport.tcp_socket).
    # random and secrets (about 0.15 MB): ids and jitter come from os.urandom.
    unwanted = ("argparse,shutil,bz2,lzma,ssl,agent.runner,agent.executor,encodings.idna,"
                "unicodedata,stringprep,random,secrets")
    out = subprocess.run([sys.executable, "-c", DAEMON_MODULES, str(config), unwanted],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_daemon_arguments_without_argparse():
    from agent.__main__ import DaemonArgs, _daemon_args

    assert _daemon_args([]) == DaemonArgs("/etc/nexus/agent.yaml", False)
    assert _daemon_args(["--config", "a.yaml", "--check-config"]) == DaemonArgs("a.yaml", True)
    assert _daemon_args(["--config=b.yaml"]) == DaemonArgs("b.yaml", False)
    with pytest.raises(SystemExit):  # argparse's own error for the rest
        _daemon_args(["--config"])
    with pytest.raises(SystemExit):
        _daemon_args(["--bogus"])


def test_a_reload_to_a_shorter_interval_shortens_the_counters_pace(tmp_path):
    """At 5 s the counters are written every 30 s; a reload to 0.2 s must not wait for the
    tick the old interval had set."""
    srv = ServerProcess()
    config = write_config(tmp_path, srv.url, telemetry={"interval_s": 5})
    agent = AgentProcess(config)
    try:
        wait_for(lambda: agent.status().get("connected"), what="the connection")
        raw = yaml.safe_load(config.read_text())
        raw["telemetry"]["interval_s"] = 0.2
        config.write_text(yaml.safe_dump(raw))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in agent.log(), what="the reload")
        wait_for(lambda: agent.status().get("acked", 0) >= 5, timeout=10,
                 what="counters at the new pace (2 s), not after the old tick (30 s)")
    finally:
        assert agent.stop() == 0
        srv.stop()

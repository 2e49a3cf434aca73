"""Where the status file lives and who finds it; the daemon rewrites it only on change."""

from __future__ import annotations

import json
import os

import pytest
from helpers import write_config

from agent import config as config_mod
from agent import statusfile
from agent.inputs import Input, InputHealth
from agent.service import Agent


class FakeInput(Input):
    """An input that is never run: its health is whatever the test sets."""

    source, section = "fake", "telemetry"

    def __init__(self) -> None:
        self.failures = 0

    def run(self, stop, store):
        raise AssertionError("not started in these tests")

    def health(self) -> InputHealth:
        return InputHealth(self.source, 0, self.failures, self.failures, None, False)


@pytest.fixture
def agent(tmp_path):
    """An agent built but not started (its server is a closed port), status in state_dir."""
    config = config_mod.load(str(write_config(tmp_path, "ws://127.0.0.1:9/v1/ws")))
    return Agent(config, inputs=[FakeInput()])


def test_written_to_the_runtime_directory_under_systemd(tmp_path, monkeypatch):
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{run}:/elsewhere")
    statusfile.write(str(state), {"state_dir": str(state), "pid": 1})
    assert (run / statusfile.NAME).exists() and not (state / statusfile.NAME).exists()
    assert statusfile.read(str(state)) == {"state_dir": str(state), "pid": 1}
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert statusfile.path(str(state)) == str(state / statusfile.NAME)


def test_reader_skips_another_agents_file_and_falls_back_to_state_dir(tmp_path, monkeypatch):
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    (run / statusfile.NAME).write_text(json.dumps({"state_dir": "/other", "pid": 2}))
    assert statusfile.read(str(state)) is None
    (state / statusfile.NAME).write_text(json.dumps({"pid": 3}))  # an older agent's file
    assert statusfile.read(str(state)) == {"pid": 3}
    assert statusfile.candidates(str(state)) == [
        str(run / statusfile.NAME), f"{statusfile.RUN_DIR}/{statusfile.NAME}",
        str(state / statusfile.NAME)]


def test_daemon_rewrites_only_what_changed(tmp_path, agent):
    try:
        target = tmp_path / "state" / statusfile.NAME
        agent.write_status()
        first = target.stat().st_ino
        agent.write_status()  # nothing changed but the time: not rewritten
        assert target.stat().st_ino == first
        agent.inputs[0].failures += 1  # a fact changed
        agent.write_status()
        second = target.stat().st_ino
        written = json.loads(target.read_text())
        assert second != first and written["unstored"] == 1 and written["storing"] is False
        agent._status_written_at -= statusfile.REFRESH_S  # the slow refresh is due
        agent.write_status()
        assert target.stat().st_ino != second
    finally:
        agent.outbox.close()


def test_facts_are_written_at_once_and_counters_at_the_tick(tmp_path, agent):
    """Counters (sent, acked, queue depth) change with every sample: rewriting the file for
    them at every look cost about 0.5 ms a time at 1 s. A fact (connected, an error, a
    message set aside) wakes the main loop and is written at once; counters wait for the
    tick (write_status() without counters=False)."""
    try:
        target = tmp_path / "state" / statusfile.NAME
        agent.write_status()
        first = target.stat().st_ino
        agent.connection.add("sent", sent_items=1)  # a counter
        agent.write_status(counters=False)  # a fact's wake-up: counters alone do not count
        assert target.stat().st_ino == first
        agent.connection.update(connected=True)  # a fact
        agent.write_status(counters=False)
        second = target.stat().st_ino
        written = json.loads(target.read_text())
        assert second != first and written["connected"] is True and written["sent"] == 1
        agent.connection.add("acked")
        agent.write_status()  # the tick: counters too
        assert target.stat().st_ino != second and json.loads(target.read_text())["acked"] == 1
    finally:
        agent.outbox.close()


def _looks(agent) -> int:
    try:
        return len(os.read(agent._look_r, 64))
    except BlockingIOError:
        return 0


def test_a_fact_wakes_the_main_loop_a_counter_does_not(agent):
    try:
        agent.connection.add("acked", 3)
        agent.connection.acked_now(1, 1.0)
        agent.connection.update(token_expires=5.0)
        assert _looks(agent) == 0
        agent.connection.update(connected=True)
        assert _looks(agent) == 1
        agent.connection.update(connected=True)  # unchanged: no wake-up
        assert _looks(agent) == 0
        agent.connection.update(connected=False, last_error="gone")
        assert _looks(agent) == 1
        record = agent.outbox.put("telemetry", {"device_id": "device-001", "metrics": {}},
                                  "2025-01-01T00:00:00.000Z")
        agent.transport.refuse(record.id, "test")  # set aside: a fact
        assert _looks(agent) == 1
    finally:
        agent.outbox.close()


def test_the_main_loop_ticks_at_the_counters_pace_or_half_the_watchdog(tmp_path):
    def agent_at(interval):
        folder = tmp_path / str(interval)
        folder.mkdir()
        return Agent(config_mod.load(str(write_config(folder, "ws://127.0.0.1:9/v1/ws",
                                                      telemetry={"interval_s": interval}))))

    for interval, every, under_watchdog in ((0.2, 2.0, 2.0), (1, 10.0, 10.0),
                                            (5, 30.0, 15.0)):
        agent = agent_at(interval)
        try:
            assert agent.counters_every() == every
            assert agent.tick(None) == every
            assert agent.tick(15.0) == under_watchdog  # WatchdogSec=30: 15 s is its half
        finally:
            agent.outbox.close()

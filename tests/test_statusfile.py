"""Where the status file lives and who finds it; the daemon rewrites it only on change."""

from __future__ import annotations

import json

from helpers import write_config

from agent import config as config_mod
from agent import statusfile
from agent.service import Agent


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


def test_daemon_rewrites_only_what_changed(tmp_path, monkeypatch):
    config = config_mod.load(str(write_config(tmp_path, "ws://127.0.0.1:9/v1/ws")))
    agent = Agent(config)
    try:
        target = tmp_path / "state" / statusfile.NAME
        agent.write_status()
        first = target.stat().st_ino
        agent.write_status()  # nothing changed but the time: not rewritten
        assert target.stat().st_ino == first
        agent.unstored += 1  # a fact changed
        agent.write_status()
        second = target.stat().st_ino
        assert second != first and json.loads(target.read_text())["unstored"] == 1
        agent._status_written_at -= statusfile.REFRESH_S  # the slow refresh is due
        agent.write_status()
        assert target.stat().st_ino != second
    finally:
        agent.outbox.close()

"""Script inputs (agent/inputs/exec.py): real scripts run through the executor, samples into
a real outbox; failures counted and logged once per change."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, AgentProcess, child_env, wait_for, write_config

from agent import config as config_mod
from agent.codec import CODEC
from agent.errors import ConfigError
from agent.inputs.exec import ExecEntry, ExecInput
from agent.mailbox import Mailbox
from agent.outbox import Outbox


def script(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def box(tmp_path):
    outbox = Outbox(CODEC, str(tmp_path / "state"), 10**7)
    yield outbox
    outbox.close()


def made(box, argv, timeout_s=5.0, name="line3"):
    item = ExecInput(ExecEntry(name, tuple(argv), 10.0, timeout_s), lambda: None)
    return item, Mailbox(box, lambda: None, "device-001").sample


def test_stdout_lines_become_samples_of_the_entrys_source_and_stderr_is_logged(
        tmp_path, box, caplog):
    argv = [script(tmp_path, "read-line3", """
echo '{"source": "x", "metrics": {"count": 12}, "tags": {"shift": "b"}}'
echo 'whatever,unit=C temp_c=41.5 1764669600000000000'
echo 'the sensor is warm' >&2
""")]
    item, store = made(box, argv)
    caplog.set_level(logging.INFO, "nexus.inputs.exec")
    item.once(store)
    one, two = box.read_after(0, 10)
    assert one.payload == ('{"device_id":"device-001","source":"line3","metrics":{"count":12},'
                           '"tags":{"shift":"b"}}')
    assert two.payload == ('{"device_id":"device-001","source":"line3","metrics":'
                           '{"temp_c":41.5},"tags":{"unit":"C"}}')
    assert two.ts == "2025-12-02T10:00:00.000Z"
    assert "input line3 says: the sensor is warm" in caplog.text
    health = item.health()
    assert (health.samples, health.refused, health.timeouts, health.failures) == (2, 0, 0, 0)
    assert health.last_success is not None


def _errors(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_garbage_and_exit_codes_are_counted_and_logged_once_per_change(tmp_path, box, caplog):
    state = tmp_path / "what"
    argv = [script(tmp_path, "flaky", f"""
case "$(cat {state})" in
  garbage) echo 'not a sample at all'; echo 'line3 ok=1';;
  exit2) exit 2;;
  quiet) ;;
  *) echo 'line3 ok=1';;
esac
""")]
    item, store = made(box, argv)
    plan = ["garbage"] * 3 + ["exit2"] * 3 + ["quiet"] * 2 + ["good"] * 3 + ["exit2"]
    for what in plan:
        state.write_text(what)
        item.once(store)
    errors = _errors(caplog)
    assert len(errors) == 5, errors  # garbage, exit 2, no sample, works again, exit 2
    assert "printed lines that are not samples: line 1: line: more than measurement" \
        in errors[0]
    assert "flaky" in errors[0] and "exit 2" in errors[1] and "printed no sample" in errors[2]
    assert "works again" in errors[3] and "exit 2" in errors[4]
    health = item.health()
    assert health.refused == 9 and health.timeouts == 0
    assert health.samples == 3 + 3  # the garbage runs' good line still counts
    assert health.failing == 0 and not health.stuck  # a script's fault is not the agent's


def test_a_hanging_script_is_killed_with_its_group_at_the_timeout_and_counted(
        tmp_path, box, caplog):
    pids = tmp_path / "pids"
    argv = [script(tmp_path, "hang", f"sleep 60 & echo $! > {pids}; wait\n")]
    item, store = made(box, argv, timeout_s=0.5)
    for _ in range(2):
        item.once(store)
    child = int(pids.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{child}") or
             open(f"/proc/{child}/stat").read().split()[2] == "Z",
             what="the script's child to be killed with its group")
    health = item.health()
    assert (health.refused, health.timeouts, health.samples) == (2, 2, 0)
    assert len([e for e in _errors(caplog) if "timed out" in e]) == 1


def test_a_program_that_does_not_exist_is_counted(tmp_path, box, caplog):
    item, store = made(box, [str(tmp_path / "missing")])
    item.once(store)
    item.once(store)
    assert item.health().refused == 2
    [error] = _errors(caplog)
    assert "cannot start" in error and "missing" in error


@pytest.mark.parametrize("entry, key, words", [
    ({"argv": ["/bin/true"]}, "inputs.exec[0].name", "is required"),
    ({"name": "a"}, "inputs.exec[0].argv", "is required"),
    ({"name": "a", "argv": "/bin/true x"}, "inputs.exec[0].argv", "no shell"),
    ({"name": "a", "argv": ["/bin/true", 3]}, "inputs.exec[0].argv[1]", "must be a string"),
    ({"name": "system", "argv": ["/bin/true"]}, "inputs.exec[0].name", "reserved"),
    ({"name": "a b", "argv": ["/bin/true"]}, "inputs.exec[0].name", "letters"),
    ({"name": "a", "argv": ["/bin/true"], "interval_s": 0}, "inputs.exec[0].interval_s",
     "between"),
    ({"name": "a", "argv": ["/bin/true"], "shell": True}, "inputs.exec[0].shell",
     "unknown key"),
])
def test_config_errors_name_the_full_key_path(tmp_path, entry, key, words):
    with pytest.raises(ConfigError) as err:
        config_mod.build({"device_id": "d", "state_dir": str(tmp_path),
                          "server": {"url": "ws://127.0.0.1:9/v1/ws"},
                          "inputs": {"exec": [entry]}})
    assert err.value.key == key
    assert words in err.value.reason or (words == "reserved" and "agent's own" in
                                         err.value.reason)


def test_config_inputs_section_and_unknown_kinds(tmp_path):
    base = {"device_id": "d", "state_dir": str(tmp_path),
            "server": {"url": "ws://127.0.0.1:9/v1/ws"}}
    assert config_mod.build(base).inputs == {}  # no inputs section: today's behaviour
    config = config_mod.build({**base, "inputs": {"exec": [
        {"name": "line3", "argv": ["/usr/local/bin/read-line3"], "interval_s": 10,
         "timeout_s": 5}, {"name": "line4", "argv": ["/bin/true"]}]}})
    assert config.inputs["inputs.exec"] == (
        ExecEntry("line3", ("/usr/local/bin/read-line3",), 10.0, 5.0),
        ExecEntry("line4", ("/bin/true",), 10.0, 5.0))
    for raw, key in (({"inputs": []}, "inputs"), ({"inputs": {"snmp": {}}}, "inputs.snmp"),
                     ({"inputs": {"exec": [{"name": "a", "argv": ["/bin/true"]},
                                           {"name": "a", "argv": ["/bin/true"]}]}},
                      "inputs.exec[1].name")):
        with pytest.raises(ConfigError) as err:
            config_mod.build({**base, **raw})
        assert err.value.key == key


def test_status_shows_each_inputs_last_success_failures_and_samples(tmp_path):
    good = script(tmp_path, "good", "echo 'x count=1i'\n")
    bad = script(tmp_path, "bad", "exit 3\n")
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws", inputs={"exec": [
        {"name": "line3", "argv": [good], "interval_s": 0.2},
        {"name": "line4", "argv": [bad], "interval_s": 0.2}]})
    agent = AgentProcess(config)
    try:
        def counted():
            inputs = {i["source"]: i for i in agent.status().get("inputs", [])}
            return len(inputs) == 3 and inputs["line3"]["samples"] >= 2 and \
                inputs["line4"]["refused"] >= 2 and inputs
        inputs = wait_for(counted, timeout=30, what="both script inputs counted")
        assert inputs["line3"]["last_success"] and inputs["line4"]["last_success"] is None
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config)],
                             env=child_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=30)
        assert "input line4:" in out.stdout and "refused" in out.stdout
        assert [line for line in out.stdout.splitlines() if line.startswith("input line3:")]
    finally:
        assert agent.stop() == 0
    assert agent.log().count("bad) exit 3") == 1  # once per change, not per run


def test_the_kill_grace_it_allows_for_is_the_executors():
    from agent import executor
    from agent.inputs import exec as exec_input

    assert exec_input.KILL_GRACE_S == executor.KILL_GRACE_S

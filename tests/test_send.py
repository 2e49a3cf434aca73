"""``nexus-agent send`` (agent/send.py) against a real agent's ingest socket."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, AgentProcess, child_env, outbox_ids, wait_for, write_config


def send(config, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "agent", "send", "--config", str(config),
                           *args], input=stdin, env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def agent(tmp_path):
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws",
                          inputs={"socket": {"max_samples_per_s": 50}})
    proc = AgentProcess(config)
    wait_for(lambda: (tmp_path / "state" / "ingest.sock").exists(), timeout=20,
             what="the agent's socket in state_dir (no RUNTIME_DIRECTORY)")
    yield proc
    assert proc.stop() == 0


def test_send_prints_the_stored_id_and_exits_0(agent):
    out = send(agent.config, "--source", "line3", "--tag", "shift=b", "count=12",
               "temp_c=41.5")
    assert out.returncode == 0, out.stderr
    msg_id = out.stdout.strip()
    assert msg_id in outbox_ids(agent.state_dir)


def test_send_reads_lines_from_stdin(agent):
    out = send(agent.config, stdin='line3,shift=a count=1i\n\n'
               '{"source": "line4", "metrics": {"x": 2}}\n')
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split()
    assert len(ids) == 2 and set(ids) <= set(outbox_ids(agent.state_dir))


@pytest.mark.parametrize("args, stdin, words", [
    (("--source", "line3", "count=abc"), None, "count: 'abc' is not a number"),
    (("--source", "line3", "count"), None, "metric 'count' is not name=value"),
    (("--source", "system", "count=1"), None, "source: 'system' is the agent's own"),
    (("count=1",), None, "--source is required"),
    ((), "line3 count=1i\nline3 name=\"x\"\n", "line 2: error metrics.name: is a string"),
])
def test_bad_data_exits_65_with_the_reason(agent, args, stdin, words):
    out = send(agent.config, *args, stdin=stdin)
    assert out.returncode == 65, (out.stdout, out.stderr)
    assert words in out.stderr
    if stdin:  # the good line before it is stored all the same
        assert len(out.stdout.split()) == 1


def test_over_the_rate_is_75_try_again(agent):
    lines = "".join(f"line3 n={i}i\n" for i in range(120))
    out = send(agent.config, stdin=lines)
    assert out.returncode == 75, out.stderr
    assert "error rate: source line3 is over 50 samples a second" in out.stderr
    assert 50 <= len(out.stdout.split()) < 120


def test_no_agent_running_is_75_and_no_socket_section_is_78(tmp_path):
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws", inputs={"socket": None})
    out = send(config, "--source", "line3", "count=1")
    assert out.returncode == 75 and "no agent is listening on" in out.stderr
    plain = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws")
    out = send(plain, "--source", "line3", "count=1")
    assert out.returncode == 78 and "inputs.socket: is not in" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run send as nobody")
def test_a_user_who_may_not_read_the_config_is_pointed_at_the_packaged_socket(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: d\n")
    config.chmod(0o600)  # root's: nobody may not read it
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3 to run as nobody")
    tmp_path.chmod(0o755)
    out = subprocess.run([python, "-m", "agent", "send", "--config", str(config), "--source",
                          "line3", "count=1"], cwd="/", capture_output=True, text=True,
                         timeout=30, user=65534,
                         env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 75, out.stderr
    assert "no agent is listening on /run/nexus-agent/ingest.sock" in out.stderr

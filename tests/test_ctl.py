"""nexus-ctl as an operator runs it: watch, and its exit codes without a token or a server."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, ServerProcess, child_env, connected, free_port


def ctl(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "agent.ctl", *args], env=env or child_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_watch_prints_updates_for_one_device(tmp_path):
    srv = ServerProcess()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent.ctl", "--url", srv.url, "watch",
                                 "--device", "device-002", "--count", "1", "--json"],
                                env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # keep sending until the watcher (which subscribes after connecting) has seen one
        one, two = connected(srv.url, "device-001"), connected(srv.url, "device-002")
        for i in range(90):  # under the server's rate limit of 100 a minute
            one.request({"type": "telemetry", "id": f"a{i}",
                         "payload": {"device_id": "device-001", "metrics": {"cpu_usage": 1}}})
            two.request({"type": "telemetry", "id": f"b{i}",
                         "payload": {"device_id": "device-002", "metrics": {"cpu_usage": 2}}})
            if proc.poll() is not None:
                break
            proc_wait(proc, 0.05)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        update = json.loads(out.strip())
        assert update["device_id"] == "device-002" and update["metrics"] == {"cpu_usage": 2}
    finally:
        srv.stop()


def test_no_token_is_usage_error():
    env = child_env()
    env.pop("NEXUS_JWT_SECRET")
    env.pop("NEXUS_TOKEN", None)
    out = ctl("watch", env=env)
    assert out.returncode == 2 and "no operator token" in out.stderr


def test_no_server_is_exit_6():
    out = ctl("--url", f"ws://127.0.0.1:{free_port()}/v1/ws", "command", "d", "x")
    assert out.returncode == 6 and "cannot connect" in out.stderr


def test_bad_argument_syntax_is_usage_error():
    srv = ServerProcess()
    try:
        out = ctl("--url", srv.url, "command", "device-001", "echo", "novalue")
        assert out.returncode == 2 and "not key=value" in out.stderr
    finally:
        srv.stop()


def proc_wait(proc, seconds):
    """Give the watcher a moment between sends; returns early when it exits."""
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def test_unsafe_token_file_is_usage_error_not_a_server_refusal(tmp_path):
    token = tmp_path / "op.token"
    token.write_text("abc.def.ghi\n")
    token.chmod(0o644)
    out = ctl("--token-file", str(token), "watch")
    assert out.returncode == 2 and "chmod 600" in out.stderr


def test_watch_into_head_ends_quietly_with_0():
    """`nexus-ctl watch | head -1`: the reader goes away; no traceback, exit 0 (not 120)."""
    srv = ServerProcess()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent.ctl", "--url", srv.url, "watch"],
                                env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        device = connected(srv.url, "device-001")
        first = ""
        for i in range(90):  # under the server's rate limit of 100 a minute
            device.request({"type": "telemetry", "id": f"a{i}",
                            "payload": {"device_id": "device-001", "metrics": {"cpu_usage": 1}}})
            if i == 0 or not first:
                import select

                if select.select([proc.stdout], [], [], 0.05)[0]:
                    first = proc.stdout.readline()
                    proc.stdout.close()  # what head does after its line
            if proc.poll() is not None:
                break
            proc_wait(proc, 0.05)
        assert first.startswith("20") and "device-001" in first
        err = proc.stderr.read()
        proc.wait(10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "BrokenPipe" not in err
    finally:
        srv.stop()


def test_help_says_nexus_token_holds_the_token_itself():
    out = ctl("-h")
    text = " ".join(out.stdout.split())
    assert "without it the token itself is read from $NEXUS_TOKEN" in text
    assert "(default $NEXUS_TOKEN)" not in text


def test_watch_prints_an_application_samples_source_metrics_and_tags():
    from agent.ctl import format_update

    line = format_update({"device_id": "device-001", "source": "line3",
                          "metrics": {"count": 12, "temp_c": 41.5}, "tags": {"shift": "b"},
                          "sample_time": "2026-12-02T10:00:00.000Z", "message_id": "e-1"})
    assert line == ("2026-12-02T10:00:00.000Z  device-001  source=line3  count=12  "
                    "temp_c=41.5  tags: shift=b")
    own = format_update({"device_id": "device-001", "metrics": {"cpu_usage": 1.25},
                         "sample_time": "t"})
    assert own == "t  device-001  cpu=1.2%" and "source" not in own

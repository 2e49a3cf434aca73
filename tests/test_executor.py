"""The executor with real processes: no shell, clean environment, caps, group kill."""

from __future__ import annotations

import os
import time

from helpers import wait_for

from agent import executor


def test_runs_argv_without_a_shell():
    out = executor.run(["/bin/echo", "a; echo b", "$(id)"], 5, 1000)
    assert (out.status, out.exit_code) == ("succeeded", 0)
    assert out.stdout == "a; echo b $(id)\n"


def test_clean_environment_and_root_cwd(monkeypatch):
    monkeypatch.setenv("NEXUS_TOKEN", "secret-token")
    out = executor.run(["/usr/bin/env"], 5, 10000)
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert set(env) <= {"PATH", "LANG", "PWD", "SHLVL", "_"}
    assert "secret-token" not in out.stdout
    assert executor.run(["/bin/pwd"], 5, 100).stdout.strip() == "/"


def test_failure_and_missing_executable():
    assert executor.run(["/bin/false"], 5, 100).status == "failed"
    missing = executor.run(["/nonexistent/tool"], 5, 100)
    assert missing.status == "failed" and "cannot start" in missing.stderr


def test_output_is_capped_and_marked():
    out = executor.run(["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; "
                        "echo err >&2"], 5, 1024)
    assert out.stdout.startswith("x" * 1024)
    assert out.stdout.endswith("[truncated: 98976 more bytes]")
    assert out.stderr == "err\n"


def test_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    out = executor.run(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], 0.5, 100)
    assert out.status == "timed_out" and out.exit_code is None
    assert time.monotonic() - start < 5
    child = int(pidfile.read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="the grandchild to die")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split()[2] != "Z"


def test_run_as_another_user_when_root():
    import pytest

    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    out = executor.run(["/usr/bin/id", "-un"], 5, 100, user="nobody")
    assert out.stdout == "nobody\n"

"""make run's launcher: companion server + agent on loopback, telemetry printed live."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, child_env, free_port, write_config


def test_devrun_shows_telemetry_flowing_and_stops_cleanly(tmp_path):
    config = write_config(tmp_path, f"ws://127.0.0.1:{free_port()}/v1/ws",
                          device_id="laptop-test", telemetry={"interval_s": 0.5})
    env = child_env()
    env.pop("NEXUS_JWT_SECRET")  # devrun makes its own secret
    out = subprocess.run([sys.executable, "-m", "agent.devrun", "--config", str(config),
                          "--duration", "4"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "laptop-test" in line]
    assert len(lines) >= 3, out.stdout
    assert "cpu=" in lines[-1] and "mem=" in lines[-1]
    assert "(close code 1000)" in out.stderr  # the agent closed cleanly on the way out
    page = [line for line in out.stderr.splitlines() if line.startswith("fleet page: ")]
    assert len(page) == 1 and "http://127.0.0.1:" in page[0] and "/#token=ey" in page[0], \
        out.stderr[-2000:]


def test_one_ctrl_c_stops_everything_without_warnings(tmp_path):
    """Ctrl-C as a terminal sends it, to the whole foreground process group."""
    import os
    import signal

    import psutil
    from helpers import wait_for

    config = write_config(tmp_path, f"ws://127.0.0.1:{free_port()}/v1/ws",
                          device_id="laptop-test", telemetry={"interval_s": 0.2})
    env = child_env()
    env.pop("NEXUS_JWT_SECRET")
    log = tmp_path / "devrun.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.devrun", "--config", str(config)],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the first telemetry line: all three are up
        assert "laptop-test" in line, log.read_text()[-2000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the agent
        os.killpg(proc.pid, signal.SIGINT)
        proc.stdout.read()
        assert proc.wait(15) == 0, log.read_text()[-2000:]
        text = log.read_text()
        assert "stop signal again" not in text and "not waiting for acks" not in text
        assert "server closed the connection" not in text
        assert "WARNING" not in text and "Traceback" not in text, text[-2000:]
        assert "(close code 1000)" in text  # the agent stopped normally, acks awaited
        wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                 for c in children), what="the agent to be gone")
    finally:
        if proc.poll() is None:
            proc.kill()

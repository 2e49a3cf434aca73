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

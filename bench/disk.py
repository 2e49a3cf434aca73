"""Flash writes: bytes written to disk per telemetry sample (``write_bytes`` in /proc/PID/io).

Runs, all at once for ``--seconds`` (about a minute), each a separate process:

* the agent at a 1 s and a 5 s interval, ``queue.durability`` normal and full,
  online (streaming to one nexus-server on loopback) and offline (a closed
  port), with its status file in a tmpfs runtime directory as under the
  shipped unit ($RUNTIME_DIRECTORY);
* the agent at 1 s, normal, online, with its status file in ``state_dir``
  (no runtime directory): what the status file costs;
* baselines doing one insert and one delete per sample (the queue of a
  connected agent) with a payload of the agent's size, at the same pace:
  SQLite WAL synchronous=FULL with the first schema (AUTOINCREMENT, UNIQUE
  id); SQLite WAL synchronous=NORMAL with 1 KiB pages; an append-only file
  without fsync (the floor: the payload itself).

``write_bytes`` counts what a process caused to be sent to the storage layer,
charged when a page of the page cache is dirtied (a page dirtied again before
it is written back is charged once). The state directory must be on a real
disk (not tmpfs), or every figure reads 0.

    python bench/disk.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    AgentProcess,
    ServerProcess,
    child_env,
    free_port,
    wait_for,
    write_config,
)

DAY = 86400

BASELINE = r"""
import os, sqlite3, sys, time
kind, folder, interval, payload = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
path = os.path.join(folder, "q")
if kind == "append":
    f = open(path, "a")
else:
    db = sqlite3.connect(path, isolation_level=None)
    if kind == "normal-1k":
        db.execute("PRAGMA page_size=1024")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=" + ("FULL" if kind == "full-first-schema" else "NORMAL"))
    db.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY%s, id TEXT NOT NULL%s, "
               "payload TEXT NOT NULL)" % ((" AUTOINCREMENT", " UNIQUE")
                                           if kind == "full-first-schema" else ("", "")))
print("ready", flush=True)
seq, next_at = 0, time.monotonic()
while True:
    seq += 1
    if kind == "append":
        f.write(payload + "\n")
        f.flush()
    else:
        db.execute("INSERT INTO m (seq, id, payload) VALUES (?, ?, ?)",
                   (seq, "e-%d" % seq, payload))
        db.execute("DELETE FROM m WHERE seq = ?", (seq,))
    print(seq, flush=True)
    next_at += interval
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for {pid}")


class AgentRun:
    """One agent. Samples stored in the window: the window over the interval (the sampler
    keeps a fixed schedule; the status file's counters are written only every ten
    samples, too coarse for a one-minute window)."""

    def __init__(self, folder: Path, url: str, interval: float, durability: str,
                 runtime: Optional[Path], lock: str = "exclusive") -> None:
        folder.mkdir(parents=True)
        self.interval = interval
        config = write_config(folder, url, telemetry={"interval_s": interval},
                              log_level="warning",
                              queue={"durability": durability, "lock": lock},
                              server={"max_messages_per_minute": 6000})
        env = child_env()
        self.state_dir = self.status_dir = folder / "state"
        if runtime is not None:
            runtime.mkdir(parents=True)
            env["RUNTIME_DIRECTORY"] = str(runtime)
            self.status_dir = runtime
        self.agent = AgentProcess(config, env=env)
        self.start: Tuple[int, float] = (0, 0.0)

    def mark(self) -> Tuple[int, float]:
        return write_bytes(self.agent.proc.pid), time.monotonic() / self.interval


class BaselineRun:
    def __init__(self, folder: Path, kind: str, interval: float, payload: str) -> None:
        folder.mkdir(parents=True)
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE, kind, str(folder),
                                      str(interval), payload], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.count = 0
        self.start: Tuple[int, int] = (0, 0)
        os.set_blocking(self.proc.stdout.fileno(), False)

    def mark(self) -> Tuple[int, int]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout.readlines():
            self.count = int(line)
        return write_bytes(self.proc.pid), self.count


def sample_payload() -> str:
    from agent import protocol as p
    from agent.metrics import Sampler

    with tempfile.TemporaryDirectory() as d:
        metrics = Sampler(d).sample({"agent_queue_depth": 0, "agent_queue_bytes": 0,
                                     "agent_oldest_queued_age_s": 0.0, "agent_dropped": 0,
                                     "agent_reconnects": 0})
    return p.dumps({"device_id": "device-001", "metrics": metrics})


def measure(seconds: float, work: Path, shm: Path) -> List[Tuple[str, float, str, float, int]]:
    srv = ServerProcess(0, "--rate-limit", "100000")
    offline = f"ws://127.0.0.1:{free_port()}/v1/ws"
    runs: Dict[Tuple[str, float, str], object] = {}
    payload = sample_payload()
    try:
        for interval in (1.0, 5.0):
            for durability in ("normal", "full"):
                for where, url in (("online", srv.url), ("offline", offline)):
                    name = f"{durability}-{where}-{interval:g}"
                    runs[(f"agent, {durability}", interval, where)] = AgentRun(
                        work / name, url, interval, durability, shm / name)
        runs[("agent, normal, status file in state_dir", 1.0, "online")] = AgentRun(
            work / "status-on-disk", srv.url, 1.0, "normal", None)
        for where, url in (("online", srv.url), ("offline", offline)):
            runs[("agent, normal, queue.lock shared", 1.0, where)] = AgentRun(
                work / f"shared-{where}", url, 1.0, "normal", shm / f"shared-{where}",
                lock="shared")
        for kind, label in (("full-first-schema", "SQLite FULL, first schema"),
                            ("normal-1k", "SQLite NORMAL, 1 KiB pages"),
                            ("append", "append-only file, no fsync")):
            runs[(f"baseline: {label}", 1.0, "ins+del")] = BaselineRun(
                work / kind, kind, 1.0, payload)
        agents = [r for r in runs.values() if isinstance(r, AgentRun)]
        # Up and storing: its status file is written (counters come only every ten
        # samples, 50 s at 5 s) and its queue file exists.
        wait_for(lambda: all((a.status_dir / "status.json").exists() and
                             (a.state_dir / "outbox.db").exists() for a in agents),
                 timeout=30, what="every agent storing samples")
        for run in runs.values():
            run.start = run.mark()  # type: ignore[attr-defined]
        time.sleep(seconds)  # the measuring window: every process runs at its own pace
        rows = []
        for (name, interval, where), run in runs.items():
            end = run.mark()  # type: ignore[attr-defined]
            start = run.start  # type: ignore[attr-defined]
            samples = round(end[1] - start[1])
            per = (end[0] - start[0]) / samples if samples else float("nan")
            rows.append((name, interval, where, per, samples))
        return rows
    finally:
        for run in runs.values():
            if isinstance(run, AgentRun):
                run.agent.stop()
            else:
                run.proc.kill()  # type: ignore[attr-defined]
                run.proc.wait()  # type: ignore[attr-defined]
        srv.stop()


def render(rows: List[Tuple[str, float, str, float, int]], payload_bytes: int,
           seconds: float) -> str:
    out = [f"{'writer':42} {'every':>5} {'queue':8} {'B/sample':>9} {'samples':>7} "
           f"{'MB/day':>7}  power cut loses"]
    for name, interval, where, per, samples in rows:
        loses = ("-" if name.startswith("baseline") else
                 "nothing stored" if "full" in name else "at most the last 10 s")
        out.append(f"{name:42} {interval:4g}s {where:8} {per:9.0f} {samples:7d} "
                   f"{per * DAY / interval / 1e6:7.0f}  {loses}")
    out.append(f"payload: {payload_bytes} bytes a sample; MB/day = B/sample x samples a day "
               "at that interval; SIGKILL loses nothing in every agent row")
    if seconds < 1200:
        out.append("no WAL checkpoint falls in a window this short offline (one every 1,000 "
                   "frames, ~11 min at 1 s); --seconds 1200 includes them")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    os.environ.update(child_env())
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="nexus-disk-", dir=ROOT) as d, \
            tempfile.TemporaryDirectory(prefix="nexus-run-", dir=shm_root) as r:
        rows = measure(args.seconds, Path(d), Path(r))
    print(f"Flash writes: bytes written per sample over {args.seconds:g} s "
          "(write_bytes of each process)")
    print(render(rows, len(sample_payload().encode()), args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

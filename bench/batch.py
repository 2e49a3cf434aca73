"""A day offline, then back: how fast the backlog arrives (telemetry.batch vs singles).

Runs a real nexus-agent (1 s interval, the default pace of 90 messages a minute)
with a pre-filled outbox against a real nexus-server (its rate limit of 100 a
minute), once with batches offered and once with ``--no-batches``, and prints:

* time until the queue is empty (batches), and the drain rate either way
  (singles are measured for ``--singles-seconds`` and extrapolated);
* whether the server ever answered RATE_LIMITED;
* the delay of live samples taken during the drain (server arrival minus
  sample time): each should arrive within two intervals;
* the agent's RSS: idle before the drain against the peak during it.

The agent runs with the shipped unit's environment (``Environment=`` in
systemd/nexus-agent.service: glibc's malloc tunables), as systemd runs it.

Usage: ``python bench/batch.py [--samples 86400] [--singles-seconds 60]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    AgentProcess,
    ServerProcess,
    child_env,
    free_port,
    unit_env,
    wait_for,
    write_config,
)

from agent import protocol as p  # noqa: E402
from agent.outbox import Outbox  # noqa: E402
from agent.codec import CODEC  # noqa: E402


def rss_kb(pid: int) -> int:
    from footprint import memory_kb  # bench/footprint.py: one reader of a process's memory

    return memory_kb(pid)["rss"]


def prefill(state_dir: Path, n: int, now: float) -> None:
    """n samples, one a second, ending now (a day offline at 1 s when n = 86,400)."""
    box = Outbox(CODEC, str(state_dir), 10**10)
    box._db.execute("PRAGMA synchronous=OFF")  # set-up only
    payload = {"cpu_usage": 12.5, "memory_usage": 41.0, "load_1m": 0.3, "disk_usage": 55.0,
               "net_rx_bytes": 123456789, "net_tx_bytes": 98765432, "temperature_c": 48.2,
               "agent_queue_depth": 0, "agent_dropped": 0}
    for i in range(n):
        box.put("telemetry", {"device_id": "bench-001", "metrics": dict(payload, seq=i)},
                p.format_timestamp(now - n + i))
    box.close()


def server_rows(db: Path) -> List[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, sample_time, received_at FROM telemetry").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def run(samples: int, batches: bool, limit_s: float) -> Dict[str, Optional[float]]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start_wall = time.time()
        prefill(tmp / "state", samples, start_wall)
        db = tmp / "server.db"
        port = free_port()
        agent = AgentProcess(write_config(tmp, f"ws://127.0.0.1:{port}/v1/ws",
                                          device_id="bench-001", telemetry={"interval_s": 1},
                                          server={"max_messages_per_minute": 90},
                                          log_level="info"),
                             env=child_env(**unit_env()))  # as the shipped unit runs it
        srv = None
        try:
            # Idle: running and sampling, offline (the backlog waits), for a few seconds.
            wait_for(lambda: agent.status().get("pid"), timeout=30, what="the agent")
            settle = time.monotonic()
            wait_for(lambda: time.monotonic() - settle > 5, timeout=6)
            idle = rss_kb(agent.proc.pid)
            srv = ServerProcess(port, *([] if batches else ["--no-batches"]), db=str(db))
            online_wall = time.time()  # samples taken from here on are live
            began, peak, done_at = time.monotonic(), idle, None
            while time.monotonic() - began < limit_s:
                peak = max(peak, rss_kb(agent.proc.pid))
                status = agent.status()
                if status.get("queue_depth") == 0 and status.get("acked", 0) >= samples:
                    done_at = time.monotonic() - began
                    break
                time.sleep(0.5)  # sampling pace of the bench, not a synchronisation
            elapsed = done_at or (time.monotonic() - began)
            rows = server_rows(db)
            backlog_ids = {r[0] for r in rows if p.parse_timestamp(r[1]) < start_wall}
            live = [p.parse_timestamp(r[2]) - p.parse_timestamp(r[1]) for r in rows
                    if p.parse_timestamp(r[1]) >= online_wall]
            rate = len(backlog_ids) / elapsed * 60
            return {"samples": samples, "done_s": done_at, "items_per_min": rate,
                    "eta_s": None if done_at else samples / max(rate, 1e-9) * 60,
                    "rate_limited": float("RATE_LIMITED" in agent.log()),
                    "live_max_delay_s": max(live) if live else None,
                    "live_count": len(live), "rss_idle_mb": idle / 1024,
                    "rss_peak_mb": peak / 1024, "messages": agent.status().get("sent")}
        finally:
            agent.stop()
            if srv is not None:
                srv.stop()


def _fmt(value: Optional[float], unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=86_400)
    ap.add_argument("--singles-seconds", type=float, default=60.0)
    ap.add_argument("--limit", type=float, default=900.0, help="give up on batches after")
    args = ap.parse_args(argv)
    with_batches = run(args.samples, True, args.limit)
    singles = run(args.samples, False, args.singles_seconds)
    print(f"A day offline at 1 s ({args.samples:,} queued samples), agent paced at 90 "
          "messages a minute, server limit 100 a minute")
    print(f"{'':28} {'telemetry.batch':>16} {'singles':>16}  target")
    rows = [
        ("time until empty", _fmt(with_batches["done_s"], " s"),
         _fmt(singles["eta_s"], " s") + " (est.)", "< 300 s with batches"),
        ("backlog items a minute", _fmt(with_batches["items_per_min"], "", 0),
         _fmt(singles["items_per_min"], "", 0), ""),
        ("messages sent", _fmt(with_batches["messages"], "", 0),
         _fmt(singles["messages"], "", 0), ""),
        ("RATE_LIMITED answers", "yes" if with_batches["rate_limited"] else "none",
         "yes" if singles["rate_limited"] else "none", "none"),
        ("live delay, max", _fmt(with_batches["live_max_delay_s"], " s", 2),
         _fmt(singles["live_max_delay_s"], " s", 2), "< 2 s (two intervals)"),
        ("agent RSS idle / drain peak", f"{with_batches['rss_idle_mb']:.1f} / "
         f"{with_batches['rss_peak_mb']:.1f} MB", f"{singles['rss_idle_mb']:.1f} / "
         f"{singles['rss_peak_mb']:.1f} MB", "peak within 2 MB of idle"),
    ]
    for name, a, b, target in rows:
        print(f"{name:28} {a:>16} {b:>16}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

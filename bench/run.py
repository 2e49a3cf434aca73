"""make bench: memory and throughput, each next to a baseline measured in the same run.

1. Resident memory (RSS) of a running agent streaming to a companion server on
   loopback, against a bare interpreter that only imports the four device
   dependencies (websocket-client, psutil, PyJWT, PyYAML); and its CPU share at
   two samples a second, against a bare websocket-client loop sending as much.
2. Durable enqueue rate: Outbox.put (WAL, synchronous=FULL, bounded) against a
   bare SQLite insert with the same pragmas, on the same disk.
3. Backlog drain: a pre-filled outbox of N messages delivered and acked through
   nexus-server, against a bare websocket-client loop sending the same number
   of messages with the same window to the same server.
4. A day offline at 1 s (bench/batch.py): 86,400 queued samples drained with
   telemetry.batch against nexus-server, and with singles against
   ``nexus-server --no-batches``; time to empty, rate, live delay, RSS.
5. Fleet (bench/fleet.py, short): 1,000 devices at 1 msg/s for 10 s against
   nexus-server and the guide's Node reference server, with and without a
   stalled operator, and a reconnect storm of 500 clients. Its own table;
   ``python bench/fleet.py --devices 5000 --seconds 30 --stalled`` for the
   full run.
6. Two nodes behind nginx (bench/cluster.py, short): 1,000 devices against one
   node and against two ``--redis`` nodes behind nginx, and the latency the
   cross-node fan-out adds (skipped without redis-server and nginx).

Prints a table; exits non-zero only if something failed to run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import (  # noqa: E402
    AgentProcess,
    ServerProcess,
    child_env,
    mint,
    outbox_ids,
    wait_for,
    write_config,
)

BACKLOG = 2000
WINDOW = 16


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def baseline_rss() -> int:
    code = ("import websocket, psutil, jwt, yaml, os\n"
            "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout)


def cpu_share(pid: int, seconds: float) -> float:
    """Percent of one core used by ``pid`` over the next ``seconds``."""
    import psutil

    proc = psutil.Process(pid)
    before = sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    return 100.0 * (sum(proc.cpu_times()[:2]) - before) / seconds


def agent_rss_cpu(tmp: Path) -> tuple:
    """RSS (kB), CPU % while streaming one sample every 0.5 s, and whether ssl is loaded."""
    srv = ServerProcess(0, "--rate-limit", "100000")
    agent = AgentProcess(write_config(tmp, srv.url, telemetry={"interval_s": 0.5},
                                      log_level="warning"))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 10, timeout=30)
        cpu = cpu_share(agent.proc.pid, 5.0)
        rss = rss_kb(agent.proc.pid)
        ssl = "ssl" in Path(f"/proc/{agent.proc.pid}/maps").read_text()
        return rss, cpu, ssl
    finally:
        agent.stop()
        srv.stop()


BARE_CLIENT = """
import json, sys, time, websocket
ws = websocket.create_connection(sys.argv[1], header=["Authorization: Bearer " + sys.argv[2]])
ws.recv()
i = 0
while True:
    ws.send(json.dumps({"type": "telemetry", "id": "b-%d" % i, "payload": {
        "device_id": "device-001", "metrics": {"cpu_usage": 1.0}}}))
    ws.recv()
    i += 1
    time.sleep(0.5)
"""


def bare_client_cpu() -> float:
    """The same traffic from a bare websocket-client loop, no queue, no sampling."""
    srv = ServerProcess(0, "--rate-limit", "100000")
    proc = subprocess.Popen([sys.executable, "-c", BARE_CLIENT, srv.url, mint("device-001")])
    try:
        time.sleep(2.0)
        return cpu_share(proc.pid, 5.0)
    finally:
        proc.kill()
        proc.wait()
        srv.stop()


def enqueue_rates(tmp: Path, n: int = 300) -> tuple:
    from agent.outbox import Outbox

    box = Outbox(str(tmp / "ob"), 50_000_000)
    payload = {"device_id": "device-001", "metrics": {f"m{i}": i * 1.5 for i in range(20)}}
    start = time.perf_counter()
    for _ in range(n):
        box.put("telemetry", payload, "2025-01-01T00:00:00.000Z")
    ours = n / (time.perf_counter() - start)
    box.close()
    db = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT)")
    text = json.dumps(payload)
    start = time.perf_counter()
    for _ in range(n):
        db.execute("INSERT INTO t (body) VALUES (?)", (text,))
    bare = n / (time.perf_counter() - start)
    db.close()
    return ours, bare


def drain_rate(tmp: Path) -> float:
    from agent.outbox import Outbox
    from agent.protocol import format_timestamp

    config = write_config(tmp, "ws://127.0.0.1:1/v1/ws", telemetry={"interval_s": 3600},
                          log_level="warning",
                          server={"ack_window": WINDOW, "max_messages_per_minute": 100000})
    box = Outbox(str(tmp / "state"), 50_000_000)
    for i in range(BACKLOG):
        box.put("telemetry", {"device_id": "device-001", "metrics": {"cpu_usage": i % 100}},
                format_timestamp(time.time()))
    box.close()
    srv = ServerProcess(0, "--rate-limit", "1000000")
    text = config.read_text().replace("ws://127.0.0.1:1/v1/ws", srv.url)
    config.write_text(text)
    agent = AgentProcess(config)
    start = time.perf_counter()
    try:
        wait_for(lambda: len(outbox_ids(tmp / "state")) <= 1, timeout=300, interval=0.05)
        return BACKLOG / (time.perf_counter() - start)
    finally:
        agent.stop()
        srv.stop()


def bare_drain_rate() -> float:
    import websocket

    from agent.protocol import format_timestamp

    srv = ServerProcess(0, "--rate-limit", "1000000")
    try:
        ws = websocket.create_connection(srv.url, header=[
            f"Authorization: Bearer {mint('device-001')}"])
        ws.recv()
        start = time.perf_counter()
        sent = acked = 0
        while acked < BACKLOG:
            while sent < BACKLOG and sent - acked < WINDOW:
                ws.send(json.dumps({"type": "telemetry", "id": f"b-{sent}",
                                    "timestamp": format_timestamp(time.time()),
                                    "payload": {"device_id": "device-001",
                                                "metrics": {"cpu_usage": sent % 100}}}))
                sent += 1
            if json.loads(ws.recv())["type"] == "ack":
                acked += 1
        rate = BACKLOG / (time.perf_counter() - start)
        ws.close()
        return rate
    finally:
        srv.stop()


def main() -> int:
    os.environ.update(child_env())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = baseline_rss()
        (tmp / "a").mkdir()
        ours, cpu, ssl_loaded = agent_rss_cpu(tmp / "a")
        rows.append(("agent RSS, streaming (MB)", ours / 1024, base / 1024,
                     f"ssl loaded: {ssl_loaded}"))
        rows.append(("CPU at 2 msg/s (% of a core)", cpu, bare_client_cpu(),
                     "psutil sampling included"))
        (tmp / "e").mkdir()
        put, bare = enqueue_rates(tmp / "e")
        rows.append(("durable enqueue (msg/s)", put, bare, "fsync per message"))
        (tmp / "d").mkdir()
        drain = drain_rate(tmp / "d")
        rows.append((f"backlog drain of {BACKLOG} (msg/s)", drain, bare_drain_rate(),
                     f"window {WINDOW}, acked + deleted"))
    print(f"{'measure':34} {'ours':>10} {'baseline':>10} {'ratio':>7}  note")
    for name, value, baseline, note in rows:
        print(f"{name:34} {value:10.1f} {baseline:10.1f} {value / baseline:7.2f}  {note}")
    print("baselines: bare interpreter + 4 device deps; bare websocket-client sender; bare "
          "sqlite3 insert; bare websocket-client loop")
    print()
    import disk  # bench/disk.py: flash writes per sample (about 75 s)

    disk.main([])
    print()
    import batch  # bench/batch.py: a day offline at 1 s, batches against singles

    batch.main(["--singles-seconds", "60"])
    print()
    import fleet

    status = fleet.main(["--devices", "1000", "--rate", "1", "--seconds", "10", "--stalled",
                         "--storm", "500"])
    print()
    import cluster  # bench/cluster.py: two nodes behind nginx against one

    return status or cluster.main(["--devices", "1000", "--seconds", "8"])


if __name__ == "__main__":
    sys.exit(main())

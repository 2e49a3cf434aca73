"""make bench: memory and throughput, each next to a baseline measured in the same run.

1. Footprint (bench/footprint.py): RSS, PSS, USS and CPU of the agent at 1 s
   and 5 s beside a bare interpreter with exactly its imports, a bare sender,
   collectd and node_exporter (where installed), start-up to READY; targets
   marked met or missed.
2. Durable enqueue rate: Outbox.put (WAL, the default durability ``normal``,
   bounded) against a bare SQLite insert with the same pragmas, on the same disk.
3. Backlog drain: a pre-filled outbox of N messages delivered and acked as
   single messages through ``nexus-server --no-batches`` (rate limit lifted, the
   agent's pace lifted, the server's store on tmpfs), against a bare
   websocket-client loop sending the same number of messages with the same
   window to the same kind of server; both timed by the server's arrival times.
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
import shutil
import sqlite3
import statistics
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
    wait_for,
    write_config,
)

BACKLOG = 2000
WINDOW = 16
DRAIN_RUNS = 3


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
    db.execute("PRAGMA synchronous=NORMAL")  # the Outbox's default durability
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT)")
    text = json.dumps(payload)
    start = time.perf_counter()
    for _ in range(n):
        db.execute("INSERT INTO t (body) VALUES (?)", (text,))
    bare = n / (time.perf_counter() - start)
    db.close()
    return ours, bare


# The drain row's server, the same for both sides: singles only, rate limit lifted, its
# store in a file on tmpfs. Both sides are timed by the server's own arrival times
# (``received_at``, first to last), so neither start-up nor the bench's polling counts,
# and neither side has a faster server: an in-memory store has no ``received_at``, and a
# ``--db`` on a real disk fsyncs every insert (about 3,000 a second here), which once
# made this row compare an agent against a disk-bound server with a bare loop against an
# in-memory one.
DRAIN_SERVER = ("--rate-limit", "1000000", "--no-batches")
# The agent's own pace lifted too (its default, 90 a minute, is for the server's 100):
# 100,000 a second, so the transport's cost per message is what is measured.
DRAIN_PACE_PER_MINUTE = 6_000_000


def _drain_db() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="nexus-drain-", dir=shm if shm.is_dir() else None)) \
        / "server.db"


def _arrivals(db: Path) -> tuple:
    """(count, messages a second from the first arrival to the last) at the server."""
    from agent.protocol import parse_timestamp

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        first, last, count = conn.execute(
            "SELECT MIN(received_at), MAX(received_at), COUNT(*) FROM telemetry").fetchone()
    except sqlite3.OperationalError:  # not created yet
        return 0, 0.0
    finally:
        conn.close()
    if count < 2:
        return count, 0.0
    span = parse_timestamp(last) - parse_timestamp(first)
    return count, (count - 1) / span if span > 0 else float("inf")


def drain_rate(tmp: Path) -> float:
    from agent.outbox import Outbox
    from agent.protocol import format_timestamp

    config = write_config(tmp, "ws://127.0.0.1:1/v1/ws", telemetry={"interval_s": 3600},
                          log_level="warning",
                          server={"ack_window": WINDOW,
                                  "max_messages_per_minute": DRAIN_PACE_PER_MINUTE})
    box = Outbox(str(tmp / "state"), 50_000_000)
    for i in range(BACKLOG):
        box.put("telemetry", {"device_id": "device-001", "metrics": {"cpu_usage": i % 100}},
                format_timestamp(time.time()))
    box.close()
    db = _drain_db()
    srv = ServerProcess(0, *DRAIN_SERVER, db=str(db))
    text = config.read_text().replace("ws://127.0.0.1:1/v1/ws", srv.url)
    config.write_text(text)
    agent = AgentProcess(config)
    try:
        # Delivered = stored at the server (acked rows leave outbox.db lazily).
        wait_for(lambda: _arrivals(db)[0] >= BACKLOG, timeout=300, interval=0.05)
        return _arrivals(db)[1]
    finally:
        agent.stop()
        srv.stop()
        shutil.rmtree(db.parent, ignore_errors=True)


def bare_drain_rate() -> float:
    """The same messages (size, ids' length aside), the same window, the same server; the
    loop reads every ack before it sends past the window."""
    import websocket

    from agent.protocol import format_timestamp

    db = _drain_db()
    srv = ServerProcess(0, *DRAIN_SERVER, db=str(db))
    try:
        ws = websocket.create_connection(srv.url, header=[
            f"Authorization: Bearer {mint('device-001')}"])
        ws.recv()
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
        ws.close()
        return _arrivals(db)[1]
    finally:
        srv.stop()
        shutil.rmtree(db.parent, ignore_errors=True)


def drain_rates(tmp: Path) -> tuple:
    """(agent, bare loop): the median of DRAIN_RUNS runs each, taken in turns, so that a
    burst of other work on the machine does not land on one side only."""
    ours, theirs = [], []
    for run in range(DRAIN_RUNS):
        folder = tmp / f"d{run}"
        folder.mkdir()
        ours.append(drain_rate(folder))
        theirs.append(bare_drain_rate())
    return statistics.median(ours), statistics.median(theirs)


def main() -> int:
    os.environ.update(child_env())
    import footprint  # bench/footprint.py: its own table, targets marked

    footprint.main(["--seconds", "60"])
    print()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "e").mkdir()
        put, bare = enqueue_rates(tmp / "e")
        rows.append(("durable enqueue (msg/s)", put, bare, 0.9, "WAL, synchronous=NORMAL"))
        ours, theirs = drain_rates(tmp)
        rows.append((f"backlog drain of {BACKLOG} (msg/s)", ours, theirs, 0.7,
                     f"singles, window {WINDOW}, server store on tmpfs, counted at the "
                     f"server; median of {DRAIN_RUNS}, interleaved"))
    print(f"{'measure':34} {'ours':>10} {'baseline':>10} {'ratio':>16}  target  note")
    for name, value, baseline, target, note in rows:
        met = "MET" if baseline and value / baseline >= target else "MISSED"
        print(f"{name:34} {value:10.1f} {baseline:10.1f} {footprint.ratio(value, baseline):>16}"
              f"  >={target:.0%} {met}  {note}")
    print("baselines: bare sqlite3 insert; bare websocket-client loop")
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

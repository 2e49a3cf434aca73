"""make bench: memory and throughput, each next to a baseline measured in the same run.

1. Footprint (bench/footprint.py): RSS, PSS, USS and CPU of the agent at 1 s
   and 5 s beside a bare interpreter with exactly its imports, a bare sender,
   collectd and node_exporter (where installed), start-up to READY; targets
   marked met or missed.
2. Durable enqueue rate: Outbox.put of the agent's own sample (WAL, the default
   durability ``normal``, bounded) against encoding the same dict to JSON and one bare
   SQLite insert with the same pragmas, on the same disk (``enqueue_rates``; alone:
   ``python bench/run.py enqueue``).
3. Backlog drain: a pre-filled outbox of N messages delivered and acked as
   single messages through ``nexus-server --no-batches``, against a bare
   websocket-client loop sending the same number of messages with the same
   window to the same server.
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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import (  # noqa: E402
    AgentProcess,
    ServerProcess,
    child_env,
    mint,
    stored,
    wait_for,
    write_config,
)

BACKLOG = 2000
WINDOW = 16


def enqueue_rates(tmp: Path, n: int = 1000, rounds: int = 5) -> Dict[str, float]:
    """Messages per second (median of ``rounds``, taken in turns so that the machine's load
    falls on all alike) of:

    * ``put``: Outbox.put of the agent's own sample, a dict (durability ``normal``);
    * ``put_plain``: the same with rows stored uncompressed (what compression costs);
    * ``bare``: the baseline: the same dict to JSON text (protocol.dumps, as put does) and
      one INSERT of it, autocommit, WAL, ``synchronous=NORMAL``, the outbox's page size;
    * ``bare_text``: the INSERT alone of a text encoded beforehand (the baseline until
      2026-11: it left JSON encoding out of the bare side only).
    """
    import disk  # bench/disk.py: the agent's own sample

    from agent import outbox as outbox_mod
    from agent import protocol as p

    payload = json.loads(disk.sample_payload())
    ts = "2025-01-01T00:00:00.000Z"
    text = p.dumps(payload)

    def put(folder: Path, compress: bool) -> float:
        box = outbox_mod.Outbox(str(folder), 10**9)
        pack = outbox_mod.pack_payload
        if not compress:
            outbox_mod.pack_payload = lambda data: None  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            for _ in range(n):
                box.put("telemetry", payload, ts)
            return n / (time.perf_counter() - start)
        finally:
            outbox_mod.pack_payload = pack  # type: ignore[assignment]
            box.close()

    def bare(folder: Path, encode: bool) -> float:
        folder.mkdir()
        db = sqlite3.connect(folder / "bare.db", isolation_level=None)
        db.execute(f"PRAGMA page_size={outbox_mod.PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # the Outbox's default durability
        db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT)")
        start = time.perf_counter()
        for _ in range(n):
            db.execute("INSERT INTO t (body) VALUES (?)", (p.dumps(payload) if encode else text,))
        rate = n / (time.perf_counter() - start)
        db.close()
        return rate

    runs: Dict[str, List[float]] = {"put": [], "put_plain": [], "bare": [], "bare_text": []}
    for i in range(rounds):
        runs["put"].append(put(tmp / f"put-{i}", True))
        runs["put_plain"].append(put(tmp / f"plain-{i}", False))
        runs["bare"].append(bare(tmp / f"bare-{i}", True))
        runs["bare_text"].append(bare(tmp / f"text-{i}", False))
    return {name: statistics.median(rates) for name, rates in runs.items()}


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
    db = tmp / "server.db"
    srv = ServerProcess(0, "--rate-limit", "1000000", "--no-batches", db=str(db))  # singles
    text = config.read_text().replace("ws://127.0.0.1:1/v1/ws", srv.url)
    config.write_text(text)
    agent = AgentProcess(config)
    start = time.perf_counter()
    try:
        # Delivered = stored at the server. (Not "gone from outbox.db": acked rows are
        # deleted lazily, up to sync_interval_s later, which once read as 100 msg/s.)
        wait_for(lambda: len(stored(db)) >= BACKLOG, timeout=300, interval=0.05)
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


def enqueue_note(enq: Dict[str, float]) -> str:
    return (f"enqueue: put {enq['put']:,.0f}/s, put with rows uncompressed "
            f"{enq['put_plain']:,.0f}/s ({enq['put_plain'] / enq['bare']:.0%}); json + insert "
            f"{enq['bare']:,.0f}/s, insert of a text encoded beforehand {enq['bare_text']:,.0f}/s "
            f"(put: {enq['put'] / enq['bare_text']:.0%} of that)")


def main() -> int:
    os.environ.update(child_env())
    if sys.argv[1:] == ["enqueue"]:  # python bench/run.py enqueue: only the enqueue rates
        with tempfile.TemporaryDirectory(dir=ROOT) as d:
            enq = enqueue_rates(Path(d))
        print(f"durable enqueue {enq['put']:,.0f} msg/s vs json + bare insert "
              f"{enq['bare']:,.0f} ({enq['put'] / enq['bare']:.0%})")
        print(enqueue_note(enq))
        return 0
    import footprint  # bench/footprint.py: its own table, targets marked

    footprint.main(["--seconds", "60"])
    print()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "e").mkdir()
        enq = enqueue_rates(tmp / "e")
        rows.append(("durable enqueue (msg/s)", enq["put"], enq["bare"], 0.9,
                      "WAL, synchronous=NORMAL; both from the same dict"))
        (tmp / "d").mkdir()
        drain = drain_rate(tmp / "d")
        rows.append((f"backlog drain of {BACKLOG} (msg/s)", drain, bare_drain_rate(), 0.7,
                     f"singles, window {WINDOW}, acked + deleted"))
    print(f"{'measure':34} {'ours':>10} {'baseline':>10} {'ratio':>16}  target  note")
    for name, value, baseline, target, note in rows:
        met = "MET" if baseline and value / baseline >= target else "MISSED"
        print(f"{name:34} {value:10.1f} {baseline:10.1f} {footprint.ratio(value, baseline):>16}"
              f"  >={target:.0%} {met}  {note}")
    print("baselines: json + bare sqlite3 insert; bare websocket-client loop")
    print(enqueue_note(enq))
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

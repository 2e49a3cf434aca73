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
6. Application samples (bench/ingest.py): the ingest socket's rate with one client
   against a bare loop of the same SQLite inserts, bytes stored per application sample
   against the agent's own, and the idle CPU of an agent with the socket open against
   one without (alone: ``python bench/run.py ingest``).
7. Two nodes behind nginx (bench/cluster.py, short): 1,000 devices against one
   node and against two ``--redis`` nodes behind nginx, and the latency the
   cross-node fan-out adds (skipped without redis-server and nginx).
8. Modbus (bench/modbusbench.py, about 45 s): requests per poll of a 100-point device
   against one per point; one poll of 100 registers over TCP on loopback against a bare
   pymodbus read; the agent with a 50-point device at 1 s beside the same agent
   without Modbus, in the same window (skipped without pymodbus).
9. Hostile neighbours (bench/hostile.py, short): 1,000 honest devices at 1 msg/s,
   quiet and then beside 400 half-open handshakes, a token reconnecting and
   flooding, and 1,000-item batches at the sample budget (6 s each, loopback):
   honest p99 against 2x the quiet p99, and the server's RSS against its bound.
10. Client certificates (bench/mtls.py, about 20 s): connect to ``connected`` over TLS
   with a client certificate and with a token, against plain ws with a token, 200
   connects each in turns (median, p95); the agent's RSS with mTLS against a token over
   TLS (alone: ``python bench/run.py mtls``).

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
    wait_for,
    write_config,
)

BACKLOG = 2000
WINDOW = 16
DRAIN_RUNS = 3


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

    from agent import codec as codec_mod
    from agent import outbox as outbox_mod
    from agent import protocol as p

    payload = json.loads(disk.sample_payload())
    ts = "2025-01-01T00:00:00.000Z"
    text = p.dumps(payload)

    def put(folder: Path, compress: bool) -> float:
        box = outbox_mod.Outbox(codec_mod.CODEC, str(folder), 10**9)
        pack = codec_mod.pack_payload
        if not compress:
            codec_mod.pack_payload = lambda data: None  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            for _ in range(n):
                box.put("telemetry", payload, ts)
            return n / (time.perf_counter() - start)
        finally:
            codec_mod.pack_payload = pack  # type: ignore[assignment]
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
    from agent.codec import CODEC
    from agent.protocol import format_timestamp

    config = write_config(tmp, "ws://127.0.0.1:1/v1/ws", telemetry={"interval_s": 3600},
                          log_level="warning",
                          server={"ack_window": WINDOW,
                                  "max_messages_per_minute": DRAIN_PACE_PER_MINUTE})
    box = Outbox(CODEC, str(tmp / "state"), 50_000_000)
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


def enqueue_note(enq: Dict[str, float]) -> str:
    return (f"enqueue: put {enq['put']:,.0f}/s, put with rows uncompressed "
            f"{enq['put_plain']:,.0f}/s ({enq['put_plain'] / enq['bare']:.0%}); json + insert "
            f"{enq['bare']:,.0f}/s, insert of a text encoded beforehand {enq['bare_text']:,.0f}/s "
            f"(put: {enq['put'] / enq['bare_text']:.0%} of that)")


def main() -> int:
    os.environ.update(child_env())
    if sys.argv[1:2] == ["ingest"]:  # python bench/run.py ingest: only application samples
        import ingest  # bench/ingest.py

        return ingest.main(sys.argv[2:])
    if sys.argv[1:2] == ["mtls"]:  # python bench/run.py mtls: only client certificates
        import mtls  # bench/mtls.py

        return mtls.main(sys.argv[2:])
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
        ours, theirs = drain_rates(tmp)
        rows.append((f"backlog drain of {BACKLOG} (msg/s)", ours, theirs, 0.7,
                     f"singles, window {WINDOW}, server store on tmpfs, counted at the "
                     f"server; median of {DRAIN_RUNS}, interleaved"))
    print(f"{'measure':34} {'ours':>10} {'baseline':>10} {'ratio':>16}  target  note")
    for name, value, baseline, target, note in rows:
        met = "MET" if baseline and value / baseline >= target else "MISSED"
        print(f"{name:34} {value:10.1f} {baseline:10.1f} {footprint.ratio(value, baseline):>16}"
              f"  >={target:.0%} {met}  {note}")
    print("baselines: json + bare sqlite3 insert; bare websocket-client loop")
    print(enqueue_note(enq))
    print()
    import ingest  # bench/ingest.py: the ingest socket, bytes per app sample, idle CPU

    ingest.main(["--seconds", "30"])
    print()
    import modbusbench  # bench/modbusbench.py: the Modbus input's figures

    modbusbench.main(["--seconds", "30"])
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

    status = status or cluster.main(["--devices", "1000", "--seconds", "8"])
    print()
    import mtls  # bench/mtls.py: handshakes and agent RSS with client certificates

    status = mtls.main(["--connects", "200"]) or status
    print()
    import hostile  # bench/hostile.py: honest devices beside attackers, one at a time

    return status or hostile.main(["--devices", "1000", "--phase-seconds", "6"])


if __name__ == "__main__":
    sys.exit(main())

"""Two nodes behind nginx against one node, on the same machine.

    python bench/cluster.py --devices 1000,2000 --seconds 8

1. Steady load (bench/fleet.py's devices): N devices at ``--rate`` msg/s each,
   against one plain nexus-server, then against two ``--redis`` nodes behind
   nginx (the devices spread by token). Ack p50/p99/max and acks against sent.
2. Fan-out latency: an operator on node A subscribed to one device's telemetry;
   the device on A (same node) and then on B (cross node, through Redis pub/sub).
   Time from sending a sample to the operator's telemetry.update, p50/p99.

Everything (load client, nodes, Redis, nginx) shares this machine: on a small one
the figures measure contention as much as the servers. Needs redis-server and
nginx (exits 0 with a note without them).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import fleet  # noqa: E402  (puts the repository and tests/ on sys.path)
from clusterkit import NginxProcess, RedisProcess, in_cluster, missing, node  # noqa: E402
from helpers import ServerProcess, child_env  # noqa: E402


async def steady(url: str, name: str, devices: int, rate: float,
                 seconds: float) -> fleet.LoadResult:
    result = fleet.LoadResult(name, devices)
    conns = await fleet.connect_fleet(url, devices, "device")
    result.connected = len(conns)
    fleet_ = [fleet.Device(c, f"device-{i:05d}", result) for i, c in enumerate(conns)]
    readers = [asyncio.ensure_future(d.read()) for d in fleet_]
    loop = asyncio.get_running_loop()
    start, interval = loop.time() + 0.5, 1.0 / rate
    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(d.send(start + interval * i / len(fleet_), interval,
                                      start + seconds) for i, d in enumerate(fleet_)))
    finally:
        gc.enable()
    result.note = f"cpu pressure {fleet.cpu_pressure()}"
    deadline = loop.time() + fleet.ACK_GRACE_S
    while result.acked < result.sent and loop.time() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.gather(*(c.close() for c in conns))
    for task in readers:
        task.cancel()
    return result


async def fanout_latency(op_url: str, device_url: str, samples: int) -> List[float]:
    """ms from a device's send to the operator's telemetry.update, ``samples`` times."""
    op = await fleet.open_client(op_url, "bench-op", "operator")
    await op.send(json.dumps({"type": "subscribe", "id": "s", "payload": {
        "channel": "telemetry", "filters": {"device_id": "lat-dev"}}}))
    await op.recv()
    dev = await fleet.open_client(device_url, "lat-dev")
    out: List[float] = []
    tag = time.monotonic_ns()
    for i in range(samples):
        sent = time.perf_counter()
        await dev.send(fleet.telemetry("lat-dev", tag + i))
        while True:
            msg = json.loads(await asyncio.wait_for(op.recv(), 5))
            if msg["type"] == "telemetry.update":
                break
        out.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(0.02)
    await dev.close()
    await op.close()
    return out


def pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    rows: List[fleet.LoadResult] = []
    for n in args.devices:
        single = ServerProcess(0)
        try:
            rows.append(await steady(single.url, "one node", n, args.rate, args.seconds))
        finally:
            single.stop(30)
    redis = RedisProcess(tmp / "redis")
    nodes = [node(redis.url, name) for name in "AB"]
    for srv in nodes:
        in_cluster(srv)
    nginx = NginxProcess(tmp / "nginx", [srv.port for srv in nodes])
    try:
        for n in args.devices:
            rows.append(await steady(nginx.url, "two nodes + nginx", n, args.rate,
                                     args.seconds))
        same = await fanout_latency(nodes[0].url, nodes[0].url, args.samples)
        cross = await fanout_latency(nodes[0].url, nodes[1].url, args.samples)
    finally:
        nginx.stop()
        for srv in nodes:
            srv.stop(30)
        redis.kill()
    fleet.print_load(rows)
    print()
    print(f"{'telemetry.update to an operator on A':40} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8}")
    for label, values in (("device on A (same node)", same),
                          ("device on B (cross node, Redis)", cross)):
        print(f"{label:40} {pct(values, 0.5):8.2f} {pct(values, 0.99):8.2f} "
              f"{max(values):8.2f}")
    print(f"fan-out adds {pct(cross, 0.5) - pct(same, 0.5):.2f} ms at p50, "
          f"{pct(cross, 0.99) - pct(same, 0.99):.2f} ms at p99 ({len(same)} samples each)")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000", help="comma-separated fleet sizes")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--samples", type=int, default=200, help="fan-out latency samples")
    args = ap.parse_args(argv)
    args.devices = [int(n) for n in args.devices.split(",")]
    why_not = missing()
    if why_not:
        print(f"cluster bench skipped: needs {why_not}")
        return 0
    os.environ.update(child_env())
    print(f"{args.devices} devices x {args.rate:g} msg/s for {args.seconds:g} s on "
          f"{os.cpu_count()} CPUs (load client, nodes, Redis and nginx on this machine)")
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(bench(args, Path(d)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fleet load for the companion server: many devices through the real protocol.

    python bench/fleet.py --devices 3000 --rate 1 --seconds 30
    python bench/fleet.py --devices 1000 --seconds 10 --stalled --storm 500

For each server (nexus-server, and the guide's Node reference server from
tests/interop when node and npm are available), N simulated devices (asyncio
``websockets`` clients, one connection each, in this process) send telemetry
at ``--rate`` messages a second each, phases spread evenly. Reported: acks
received against sent, ack latency p50/p99/max, and the server's RSS (now and
peak) and CPU (percent of one core over the sending window).

``--loop asyncio,uvloop`` runs nexus-server once on each event loop (a row each);
``--db DIR`` gives it a store file in DIR. Besides the latencies, each row has
the server's CPU time per message ("us/msg": its user+system CPU over the
sending window divided by the messages sent), which contention on a shared
machine inflates far less than it inflates latencies.

``--stalled`` repeats the run with an operator subscribed to all telemetry
that never reads (the guide's server does not broadcast telemetry, so there it
changes nothing). ``--storm N`` connects N clients that reconnect with the
agent's own backoff (transport.backoff_delays, the agent's default delays),
restarts the server under them, and reports the time until all are back and
the peak connection attempts per second.

The load client shares the machine with the server: on a small machine its
own event loop lag is part of the latency reported. The table shows its CPU
share ("load %") and the machine's CPU pressure over the last 10 s of the
sending window (Linux PSI "some": time in which a runnable task waited for a
CPU); a high figure means the latencies measure contention, not the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    SECRET,
    ServerProcess,
    child_env,
    free_port,
    mint,
    terminate,
)
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from agent.config import ReconnectConfig  # noqa: E402
from agent.transport import backoff_delays  # noqa: E402

INTEROP = ROOT / "tests" / "interop"
CONNECT_CONCURRENCY = 200
ACK_GRACE_S = 5.0


# ---------------------------------------------------------------- servers under test


class Ours:
    name = "nexus-server"
    loop = "auto"  # nexus-server --loop: auto (uvloop when installed), uvloop or asyncio
    db_dir: Optional[str] = None  # --db: the store in a file here (default: in memory)

    def __init__(self, port: int) -> None:
        db = os.path.join(self.db_dir, f"fleet-{port}.db") if self.db_dir else None
        self._proc = ServerProcess(port, "--loop", self.loop, db=db)
        self.pid, self.url = self._proc.proc.pid, self._proc.url
        out = self._proc.proc.stdout
        assert out is not None
        # The lines after "listening on": the page's address, then the event loop's name.
        self.loop_name = next((line.split(":", 1)[1].strip() for line in out
                               if line.startswith("event loop:")), "unknown")

    @classmethod
    def on(cls, loop: str) -> type:
        """Ours on the event loop ``loop`` (each choice is a row of its own)."""
        return type(f"Ours_{loop}", (cls,), {"loop": loop})

    def log(self) -> str:
        return self._proc.log()

    def stop(self) -> None:
        self._proc.stop(30)


class Guide:
    """The guide's reference server (tests/interop), run as the interop tests run it."""

    name = "guide (Node ws)"
    node_path: Optional[Path] = None

    def __init__(self, port: int) -> None:
        assert self.node_path is not None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="guide-server-", suffix=".log")
        env = dict(os.environ, NODE_PATH=str(self.node_path), JWT_SECRET=SECRET,
                   WS_PORT=str(port))
        self._proc = subprocess.Popen(["node", str(INTEROP / "run-guide-server.js")], env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "listening on port" not in Path(self._log.name).read_text():
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError("the guide server did not start")
            time.sleep(0.05)
        self.pid, self.url = self._proc.pid, f"ws://127.0.0.1:{port}/v1/ws"

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: the guide's shutdown waits for every client to
        hang up, and reconnecting clients keep it waiting."""
        terminate(self._proc)
        self._log.close()

    @classmethod
    def available(cls, folder: Path) -> str:
        """'' when the guide server can run (npm packages installed in ``folder``), else why not."""
        if not shutil.which("node") or not shutil.which("npm"):
            return "node/npm not installed"
        out = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                              "--prefix", str(folder), "ws@8", "jsonwebtoken@9"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            return f"npm install failed: {out.stderr.strip()[:200]}"
        cls.node_path = folder / "node_modules"
        return ""


def cpu_pressure() -> str:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"


def proc_stats(pid: int) -> Dict[str, float]:
    """RSS and peak RSS (MB), and user+system CPU seconds, from /proc."""
    stats: Dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                stats[line[:5]] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    stats["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return stats


# ---------------------------------------------------------------- steady load


@dataclass
class LoadResult:
    server: str
    devices: int
    connected: int = 0
    sent: int = 0
    acked: int = 0
    latencies_ms: List[float] = field(default_factory=list)
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_pct: float = 0.0
    cpu_us_per_msg: float = float("nan")  # server CPU time / messages sent: contention-proof
    client_cpu_pct: float = 0.0  # the load client's own share: on a small machine, contention
    note: str = ""

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def telemetry(device_id: str, seq: int) -> str:
    return json.dumps({"type": "telemetry", "id": f"{device_id}-{seq}",
                       "timestamp": "2025-11-03T01:53:54.518Z",
                       "payload": {"device_id": device_id,
                                   "metrics": {"cpu_usage": 12.5, "memory_usage": 40.1}}})


async def open_client(url: str, subject: str, role: str = "device",
                      **options: object) -> ClientConnection:
    conn = await connect(url, additional_headers={"Authorization": f"Bearer {mint(subject, role)}"},
                         compression=None, ping_interval=None, open_timeout=60,
                         **options)  # type: ignore[arg-type]
    welcome = json.loads(await conn.recv())
    if welcome.get("type") != "connected":
        raise RuntimeError(f"no welcome: {welcome}")
    return conn


class Device:
    """One simulated device: a sender on a fixed schedule, a reader timing the acks."""

    def __init__(self, conn: ClientConnection, device_id: str, result: LoadResult) -> None:
        self.conn, self.device_id, self.result = conn, device_id, result
        self.pending: Dict[str, float] = {}

    async def send(self, first: float, interval: float, end: float) -> None:
        loop, seq, at = asyncio.get_running_loop(), 0, first
        while at < end:
            await asyncio.sleep(max(0.0, at - loop.time()))
            seq += 1
            text = telemetry(self.device_id, seq)
            self.pending[f"{self.device_id}-{seq}"] = time.perf_counter()
            try:
                await self.conn.send(text)
            except ConnectionClosed:
                return
            self.result.sent += 1
            at += interval

    async def read(self) -> None:
        try:
            async for text in self.conn:
                msg = json.loads(text)
                sent = self.pending.pop(msg.get("id"), None)
                if msg.get("type") == "ack" and sent is not None:
                    self.result.acked += 1
                    self.result.latencies_ms.append((time.perf_counter() - sent) * 1000)
        except ConnectionClosed:
            pass


async def connect_fleet(url: str, n: int, prefix: str) -> List[ClientConnection]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> Optional[ClientConnection]:
        async with gate:
            try:
                return await open_client(url, f"{prefix}-{i:05d}")
            except (OSError, ConnectionClosed, RuntimeError, asyncio.TimeoutError):
                return None

    conns = await asyncio.gather(*(one(i) for i in range(n)))
    return [c for c in conns if c is not None]


async def stalled_operator(url: str) -> ClientConnection:
    """Subscribed to all telemetry, then reads no more (max_queue=1: the socket fills).

    Its receive buffer is small (4 KiB, set before connecting so the window never
    grows): Linux would otherwise buffer up to tcp_rmem's maximum (32 MiB here) for it
    before the server notices anything.
    """
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    conn = await open_client(url, "stalled-operator", "operator", max_queue=1, sock=sock)
    await conn.send(json.dumps({"type": "subscribe", "id": "s",
                                "payload": {"channel": "telemetry"}}))
    return conn


async def drain(conn: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in conn:
            pass


async def run_load(server: object, devices: int, rate: float, seconds: float,
                   stalled: bool) -> LoadResult:
    url, pid = server.url, server.pid  # type: ignore[attr-defined]
    name = server.name  # type: ignore[attr-defined]
    if getattr(server, "loop_name", None):
        name += f" ({server.loop_name.split()[0]})"  # type: ignore[attr-defined]
    result = LoadResult(name + (" + stalled op" if stalled else ""), devices)
    operator = await stalled_operator(url) if stalled else None
    closed = asyncio.ensure_future(operator.wait_closed()) if operator else None
    conns = await connect_fleet(url, devices, "device")
    result.connected = len(conns)
    fleet = [Device(c, f"device-{i:05d}", result) for i, c in enumerate(conns)]
    readers = [asyncio.ensure_future(d.read()) for d in fleet]
    loop = asyncio.get_running_loop()
    start, interval = loop.time() + 0.5, 1.0 / rate
    end = start + seconds
    # This process holds a whole fleet of connections too: its own collector pauses
    # (a full collection here takes 100+ ms) would be charged to the server measured.
    gc.collect()
    gc.disable()
    before, client_before = proc_stats(pid), time.process_time()
    try:
        await asyncio.gather(*(d.send(start + interval * i / len(fleet), interval, end)
                               for i, d in enumerate(fleet)))
    finally:
        gc.enable()
    after = proc_stats(pid)
    result.note = f"cpu pressure {cpu_pressure()}"
    result.cpu_pct = 100 * (after["cpu_s"] - before["cpu_s"]) / (loop.time() - start)
    if result.sent:
        result.cpu_us_per_msg = 1e6 * (after["cpu_s"] - before["cpu_s"]) / result.sent
    result.client_cpu_pct = 100 * (time.process_time() - client_before) / (loop.time() - start)
    result.rss_mb, result.peak_rss_mb = after["VmRSS"], after["VmHWM"]
    deadline = loop.time() + ACK_GRACE_S
    while result.acked < result.sent and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if operator is not None:
        assert closed is not None
        # Only read now: the close frame is behind everything the kernels buffered.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drain(operator), 2.0)
        logged = server.log().count("send queue is full")  # type: ignore[attr-defined]
        result.note += (f"; stalled operator closed ({operator.close_code} seen), overflow "
                        f"logged {logged}x" if closed.done() else "; stalled operator open")
        operator.transport.abort()
    await asyncio.gather(*(c.close() for c in conns))
    for task in readers:
        task.cancel()
    return result


# ---------------------------------------------------------------- reconnect storm


@dataclass
class StormResult:
    server: str
    clients: int
    down_s: float = float("nan")  # from the stop signal until the new server listens
    back_s: float = float("nan")  # from the stop signal until every client is welcomed again
    peak_attempts_per_s: int = 0
    missing: int = 0  # clients not back 180 s after the restart
    attempts: int = 0


class Reconnecting:
    """A client that reconnects forever like nexus-agent: full-jitter backoff, reset on success."""

    def __init__(self, url: str, subject: str, attempts: List[float], seed: int) -> None:
        self.url, self.subject, self.attempts = url, subject, attempts
        self.rng = random.Random(seed)
        self.connected = asyncio.Event()
        self.conn: Optional[ClientConnection] = None

    async def run(self) -> None:
        cfg = ReconnectConfig()
        delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
        while True:
            self.attempts.append(time.monotonic())
            try:
                self.conn = await open_client(self.url, self.subject)
            except (OSError, ConnectionClosed, RuntimeError, asyncio.TimeoutError):
                await asyncio.sleep(next(delays))
                continue
            self.connected.set()
            await self.conn.wait_closed()
            self.connected.clear()
            delays = backoff_delays(cfg.base_delay_s, cfg.max_delay_s, self.rng)
            await asyncio.sleep(next(delays))


async def run_storm(kind: type, port: int, clients: int) -> StormResult:
    server = kind(port)
    result = StormResult(kind.name, clients)  # type: ignore[attr-defined]
    attempts: List[float] = []
    fleet = [Reconnecting(server.url, f"storm-{i:05d}", attempts, i) for i in range(clients)]
    tasks = [asyncio.ensure_future(c.run()) for c in fleet]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in fleet)), 120)
        attempts.clear()
        restart = time.monotonic()
        await asyncio.to_thread(server.stop)
        server = await asyncio.to_thread(kind, port)
        result.down_s = time.monotonic() - restart
        try:
            await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in fleet)), 180)
            result.back_s = time.monotonic() - restart
        except asyncio.TimeoutError:
            result.missing = sum(not c.connected.is_set() for c in fleet)
        result.attempts = len(attempts)
        per_second: Dict[int, int] = {}
        for at in attempts:
            per_second[int(at - restart)] = per_second.get(int(at - restart), 0) + 1
        result.peak_attempts_per_s = max(per_second.values(), default=0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(server.stop)
    return result


# ---------------------------------------------------------------- the hub alone


def hub_cost(messages: int, devices: int = 5000) -> float:
    """CPU microseconds per telemetry message in Hub.handle, in this process, no sockets:
    the part of us/msg that is the hub's (JSON, validation, the store in memory, the ack)."""
    from agent.server.hub import Hub
    from agent.server.tokens import Identity

    class Quiet:
        def send(self, text: str) -> None: ...

        def close(self, code: int, reason: str) -> None: ...

    hub, now = Hub(), time.time()
    clients = [hub.connect(Identity(f"device-{i:05d}", "device", now + 3600), Quiet(), now)[0]
               for i in range(devices)]
    frames = [telemetry(f"device-{i % devices:05d}", i // devices) for i in range(messages)]
    start = time.process_time()
    for i, frame in enumerate(frames):
        hub.handle(clients[i % devices], frame, now + i * 1e-4)
    return 1e6 * (time.process_time() - start) / messages


# ---------------------------------------------------------------- report


def print_load(rows: List[LoadResult]) -> None:
    print(f"{'server':36} {'devices':>7} {'sent':>8} {'acked':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'RSS MB':>7} {'peak MB':>7} {'CPU %':>6} {'us/msg':>6} {'load %':>6}"
          "  note")
    for r in rows:
        note = r.note if r.connected == r.devices else f"only {r.connected} connected; {r.note}"
        print(f"{r.server:36} {r.devices:7d} {r.sent:8d} {r.acked:8d} {r.percentile(0.5):8.1f} "
              f"{r.percentile(0.99):8.1f} {max(r.latencies_ms, default=float('nan')):8.1f} "
              f"{_measured(r.rss_mb, 7)} {_measured(r.peak_rss_mb, 7)} {_measured(r.cpu_pct, 6)} "
              f"{_measured(r.cpu_us_per_msg, 6)} {_measured(r.client_cpu_pct, 6)}  {note}")


def _measured(value: float, width: int) -> str:
    """A figure, or "-" where the run did not measure it (bench/cluster.py's rows: several
    processes serve, none of them is "the server")."""
    return f"{'-':>{width}}" if not value or math.isnan(value) else f"{value:{width}.0f}"


def print_storm(rows: List[StormResult]) -> None:
    print(f"{'reconnect storm':28} {'clients':>7} {'down s':>7} {'all back s':>10} "
          f"{'peak att/s':>10} {'attempts':>8}")
    for s in rows:
        print(f"{s.server:28} {s.clients:7d} {s.down_s:7.1f} {s.back_s:10.1f} "
              f"{s.peak_attempts_per_s:10d} {s.attempts:8d}"
              + (f"  {s.missing} not back after 180 s" if s.missing else ""))


async def bench(args: argparse.Namespace, kinds: List[type]) -> None:
    rows: List[LoadResult] = []
    for kind in kinds if args.devices else []:
        for stalled in [False, True] if args.stalled else [False]:
            server = kind(free_port())
            try:
                rows.append(await run_load(server, args.devices, args.rate, args.seconds,
                                           stalled))
            finally:
                server.stop()
    if rows:
        print_load(rows)
    storms: List[StormResult] = []
    for kind in kinds if args.storm else []:
        storms.append(await run_storm(kind, free_port(), args.storm))
    if storms:
        print_storm(storms)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="0: no steady load")
    ap.add_argument("--rate", type=float, default=1.0, help="messages a second per device")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the sending window")
    ap.add_argument("--stalled", action="store_true",
                    help="also run with an operator subscribed to telemetry that never reads")
    ap.add_argument("--storm", type=int, default=0, metavar="N",
                    help="also restart each server under N reconnecting clients")
    ap.add_argument("--servers", default="ours,guide", help="ours, guide, or both (default)")
    ap.add_argument("--hub", type=int, default=0, metavar="N", help="also time Hub.handle "
                    "alone on N telemetry messages, in this process (CPU us per message)")
    ap.add_argument("--db", metavar="DIR", help="nexus-server stores in a file in DIR "
                    "(--db; default: in memory)")
    ap.add_argument("--loop", default="auto", help="nexus-server's event loop: auto (uvloop "
                    "when installed), uvloop, asyncio, or several, comma-separated (a row each)")
    args = ap.parse_args(argv)
    os.environ.update(child_env())
    Ours.db_dir = args.db
    if args.hub:
        print(f"Hub.handle alone: {hub_cost(args.hub):.1f} us of CPU per telemetry message "
              f"({args.hub} messages, in this process)")
    kinds: List[type] = ([Ours.on(loop) for loop in args.loop.split(",")]
                         if "ours" in args.servers else [])
    with tempfile.TemporaryDirectory() as npm:
        if "guide" in args.servers:
            why_not = Guide.available(Path(npm))
            if why_not:
                print(f"guide reference server skipped: {why_not}")
            else:
                kinds.append(Guide)
        print(f"{args.devices} devices x {args.rate:g} msg/s for {args.seconds:g} s "
              f"on {os.cpu_count()} CPUs (load client in this process)")
        asyncio.run(bench(args, kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

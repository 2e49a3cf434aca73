"""Footprint (issue 15): CPU, memory and start-up of a streaming agent, beside its peers.

Every subject runs at the same time, in its own process, over the same window:

* the agent at a 1 s and at a 5 s interval, each streaming to one nexus-server
  on loopback (default server settings, rate limit lifted);
* a bare interpreter that imports exactly the agent's third-party and C
  dependencies (websocket-client without ssl, psutil, sqlite3, PyYAML) and
  then sleeps: the memory floor of a Python agent with these libraries;
* a bare websocket-client loop sending one message a second and reading its
  ack: the CPU floor of the same traffic with no sampling and no queue;
* a bare loop that takes the agent's psutil readings once a second and sends
  them with websocket-client, reading the ack: the CPU floor of the agent's
  job in Python with its libraries, without the queue, threads and checks;
  and the same loop reading ``/proc`` itself instead of through psutil;
* collectd (cpu, memory, interface, load plugins, network output to a UDP
  socket of this bench, interval 1 s) and prometheus-node-exporter (default
  collectors, scraped every second by this bench), where installed.

CPU is each process's own user + system time from ``/proc/PID/stat`` over the
window (10 ms ticks; the tick count is printed so the resolution is visible),
so other work on the machine does not inflate it. Memory is read at the end
of the window from ``/proc/PID/smaps_rollup``: RSS, PSS (shared pages divided
among the processes sharing them) and USS (pages of this process alone).
Start-up is the wall time from ``exec`` to the ``READY=1`` datagram on a
notify socket this bench binds, over several starts (min / median / max);
wall time is sensitive to other load on the machine, CPU figures are not.

    python bench/footprint.py [--seconds 60] [--starts 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import (  # noqa: E402
    AgentProcess,
    ServerProcess,
    child_env,
    free_port,
    mint,
    terminate,
    unit_env,
    write_config,
)

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
TARGET_CPU_1S = 0.1  # % of one core at a 1 s interval
TARGET_RSS_OVER_BARE_MB = 1.0
TARGET_READY_MS = 300.0

# The agent's dependencies, imported the way the agent imports them (ssl hidden for ws://).
BARE_IMPORTS = """
import os, socket, sys, time
sys.modules["ssl"] = None
import websocket
del sys.modules["ssl"]
import psutil, sqlite3, yaml
address = os.environ.get("NOTIFY_SOCKET")
if address:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"READY=1", address)
    s.close()
while True:
    time.sleep(3600)
"""

# The bare loops' connection: URL and token from argv (ssl hidden, as the agent does for ws://).
_CONNECT = """
import json, os, sys, time
sys.modules["ssl"] = None
import websocket
del sys.modules["ssl"]
ws = websocket.create_connection(sys.argv[1], header=["Authorization: Bearer " + sys.argv[2]])
ws.recv()
"""

# The end of a sampling loop: the metrics ``m`` and the slow ones sent as telemetry of the
# device named by argv[3], and the ack read.
_SEND_SAMPLE = """
    m.update(slow)
    ws.send(json.dumps({"type": "telemetry", "id": "s-%d" % i, "timestamp":
        time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "payload": {"device_id": sys.argv[3], "metrics": m}}))
    ws.recv()
    i += 1
"""

BARE_SENDER = _CONNECT + """
i = 0
while True:
    ws.send(json.dumps({"type": "telemetry", "id": "b-%d" % i, "timestamp":
        "2026-01-01T00:00:00.000Z", "payload": {"device_id": "device-002",
        "metrics": {"cpu_usage": 1.0, "memory_usage": 2.0}}}))
    ws.recv()
    i += 1
    time.sleep(1.0)
"""

# The floor of the agent's job in Python with its libraries: the same psutil readings as a
# sample (disk usage and temperature every 10 s, as the agent), JSON, one send and its ack a
# second; no queue, no threads, no status file, no reconnection, no checks.
BARE_SAMPLER_SENDER = _CONNECT + """
import psutil
psutil.cpu_percent()
me, slow, temp, i = psutil.Process(), {}, None, 0
while True:
    time.sleep(1.0)
    vm = psutil.virtual_memory()
    net = psutil.net_io_counters()
    m = {"cpu_usage": psutil.cpu_percent(), "memory_usage": vm.percent,
         "memory_available_bytes": vm.available, "swap_usage": psutil.swap_memory().percent,
         "uptime_s": round(time.time() - psutil.boot_time(), 1),
         "net_bytes_sent": net.bytes_sent, "net_bytes_recv": net.bytes_recv}
    m["load_1m"], m["load_5m"], m["load_15m"] = os.getloadavg()
    if i % 10 == 0:
        slow = {"disk_root_usage": psutil.disk_usage("/").percent,
                "agent_rss_bytes": me.memory_info().rss}
        temp = psutil.sensors_temperatures()""" + _SEND_SAMPLE

# The same job with the readings taken from /proc directly instead of through psutil (Linux
# only; swap, the process's RSS and the temperature left out): what psutil itself costs at a
# sample a second.
BARE_PROC_SENDER = _CONNECT + """
def cpu():
    with open("/proc/stat", "rb") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v), v[3] + v[4]
def mem():
    with open("/proc/meminfo", "rb") as fh:
        d = {l.split(b":")[0]: int(l.split()[1]) for l in fh}
    return d
def net():
    s = r = 0
    with open("/proc/net/dev", "rb") as fh:
        for line in fh.readlines()[2:]:
            v = line.split(b":")[1].split()
            r += int(v[0]); s += int(v[8])
    return s, r
last = cpu(); i = 0; slow = {}
while True:
    time.sleep(1.0)
    now = cpu(); tot, idle = now[0] - last[0], now[1] - last[1]; last = now
    d = mem(); s, r = net()
    m = {"cpu_usage": round(100 * (tot - idle) / tot, 1) if tot else 0.0,
         "memory_usage": round(100 * (d[b"MemTotal"] - d[b"MemAvailable"]) / d[b"MemTotal"], 1),
         "memory_available_bytes": d[b"MemAvailable"] * 1024,
         "swap_usage": 0.0, "net_bytes_sent": s, "net_bytes_recv": r}
    m["load_1m"], m["load_5m"], m["load_15m"] = os.getloadavg()
    if i % 10 == 0:
        st = os.statvfs("/")
        slow = {"disk_root_usage": round(100 * (st.f_blocks - st.f_bfree) / st.f_blocks, 1)}""" + \
    _SEND_SAMPLE

COLLECTD_CONF = """Interval 1
BaseDir "{dir}"
PIDFile "{dir}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin interface
LoadPlugin load
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "{port}"
</Plugin>
"""


# --------------------------------------------------------------------------- /proc readings


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of ``pid`` (all its threads, exited ones included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def memory_kb(pid: int) -> Dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in kB, from smaps_rollup."""
    values: Dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                values[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": values["Rss"], "pss": values["Pss"],
            "uss": values["Private_Clean"] + values["Private_Dirty"]}


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as text; a zero baseline is said so, never divided by."""
    if baseline == 0:
        return "n/a (baseline 0)"
    return f"{value / baseline:.2f}"


# --------------------------------------------------------------------------- subjects


class Subject:
    """One measured process: its CPU ticks at the start of the window, its readings at the end."""

    def __init__(self, name: str, proc: subprocess.Popen, note: str = "") -> None:
        self.name, self.proc, self.note = name, proc, note
        self.ticks0 = 0
        self.result: Dict[str, Any] = {}

    def start(self) -> None:
        self.ticks0 = cpu_ticks(self.proc.pid)

    def finish(self, seconds: float) -> None:
        if self.proc.poll() is not None:
            self.result = {"error": f"exited with {self.proc.returncode}"}
            return
        ticks = cpu_ticks(self.proc.pid) - self.ticks0
        self.result = {"ticks": ticks, "cpu": 100.0 * ticks * TICK_S / seconds,
                       **memory_kb(self.proc.pid)}

    def stop(self) -> None:
        terminate(self.proc)


class Drain(threading.Thread):
    """Reads and drops collectd's UDP datagrams (the "server" of its network output)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.packets = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.sock.recv(65536)
                self.packets += 1
            except socket.timeout:
                continue


class Scraper(threading.Thread):
    """Scrapes node_exporter's /metrics every second, like a 1 s Prometheus job."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.scrapes = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                pass


def agent_config(folder: Path, url: str, interval: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # The shipped defaults (example config), not the test suite's fast timers.
    return write_config(folder, url, device_id=f"device-1{interval:02.0f}", log_level="info",
                        telemetry={"interval_s": interval},
                        server={"url": url, "connect_timeout_s": 10, "ping_interval_s": 20,
                                "ping_timeout_s": 10, "ack_timeout_s": 30,
                                "max_messages_per_minute": 90},
                        reconnect={"base_delay_s": 1, "max_delay_s": 60})


def start_peers(tmp: Path, notes: List[str]) -> Tuple[List[Subject], List[Any]]:
    subjects: List[Subject] = []
    helpers: List[Any] = []
    collectd = shutil.which("collectd") or ("/usr/sbin/collectd"
                                            if os.path.exists("/usr/sbin/collectd") else None)
    if collectd:
        drain = Drain()
        drain.start()
        helpers.append(drain)
        conf = tmp / "collectd.conf"
        (tmp / "collectd").mkdir()
        conf.write_text(COLLECTD_CONF.format(dir=tmp / "collectd", port=drain.port))
        proc = subprocess.Popen([collectd, "-f", "-C", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        subjects.append(Subject("collectd (C)", proc, "cpu, memory, interface, load -> UDP"))
    else:
        notes.append("collectd: not installed (Debian: collectd-core), row skipped")
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter:
        port = free_port()
        proc = subprocess.Popen([exporter, f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
        scraper.start()
        helpers.append(scraper)
        subjects.append(Subject("node_exporter (Go)", proc, "default collectors, scraped 1/s"))
    else:
        notes.append("node_exporter: not installed (Debian: prometheus-node-exporter), "
                     "row skipped")
    return subjects, helpers


# --------------------------------------------------------------------------- start-up


def _notify_socket(tmp: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp / "notify.sock"
    if path.exists():
        path.unlink()
    sock.bind(str(path))
    sock.settimeout(0.05)
    return sock


def time_to_ready(argv: List[str], tmp: Path, timeout: float = 20.0) -> Optional[float]:
    """Milliseconds from exec to READY=1 on the notify socket, or None."""
    sock = _notify_socket(tmp)
    env = child_env(NOTIFY_SOCKET=str(tmp / "notify.sock"))
    env.pop("WATCHDOG_USEC", None)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    ready = None
    try:
        while ready is None and time.perf_counter() - start < timeout and proc.poll() is None:
            try:
                if b"READY=1" in sock.recv(4096).split(b"\n"):
                    ready = (time.perf_counter() - start) * 1000.0
            except socket.timeout:
                continue
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
    return ready


def startup_times(tmp: Path, url: str, starts: int) -> Dict[str, List[float]]:
    config = agent_config(tmp / "startup", url, 1.0)
    out: Dict[str, List[float]] = {"agent": [], "bare": []}
    for _ in range(starts):
        for name, argv in (("agent", [sys.executable, "-m", "agent", "--config", str(config)]),
                           ("bare", [sys.executable, "-c", BARE_IMPORTS])):
            ms = time_to_ready(argv, tmp)
            if ms is not None:
                out[name].append(ms)
    return out


# --------------------------------------------------------------------------- the run


def measure(seconds: float, starts: int) -> Tuple[List[Subject], Dict[str, List[float]],
                                                   List[str]]:
    notes: List[str] = []
    with tempfile.TemporaryDirectory(prefix="nexus-footprint-") as d:
        tmp = Path(d)
        server = ServerProcess(0, "--rate-limit", "100000")
        subjects: List[Subject] = []
        helpers: List[Any] = []
        try:
            startups = startup_times(tmp, server.url, starts)
            # The agent runs with the shipped unit's environment (glibc malloc tunables), and
            # so does the bare interpreter it is compared with.
            agents = {interval: AgentProcess(agent_config(tmp / f"agent-{interval:g}s",
                                                          server.url, interval),
                                             env=child_env(**unit_env()))
                      for interval in (1.0, 5.0)}
            for interval, agent in agents.items():
                subjects.append(Subject(f"nexus-agent, {interval:g} s", agent.proc,
                                        "streaming to nexus-server on loopback"))
            env = child_env(**unit_env())
            subjects.append(Subject("bare interpreter + agent's imports",
                                    subprocess.Popen([sys.executable, "-c", BARE_IMPORTS],
                                                     env=env), "websocket (no ssl), psutil, "
                                    "sqlite3, yaml; sleeping"))
            subjects.append(Subject("bare websocket-client sender, 1 s",
                                    subprocess.Popen([sys.executable, "-c", BARE_SENDER,
                                                      server.url, mint("device-002")], env=env),
                                    "1 message + ack a second, no sampling, no queue"))
            subjects.append(Subject("bare sampler + sender, 1 s",
                                    subprocess.Popen([sys.executable, "-c", BARE_SAMPLER_SENDER,
                                                      server.url, mint("device-003"),
                                                      "device-003"], env=env),
                                    "the same psutil readings, JSON, send + ack; no queue, "
                                    "no threads"))
            subjects.append(Subject("bare /proc sampler + sender, 1 s",
                                    subprocess.Popen([sys.executable, "-c", BARE_PROC_SENDER,
                                                      server.url, mint("device-004"),
                                                      "device-004"], env=env),
                                    "the same, read from /proc without psutil"))
            peers, helpers = start_peers(tmp, notes)
            subjects += peers
            time.sleep(8.0)  # imports, first connection, first acks, collectd's first read
            for s in subjects:
                s.start()
            time.sleep(seconds)
            for s in subjects:
                s.finish(seconds)
            for interval, agent in agents.items():
                status = agent.status()
                notes.append(f"agent {interval:g} s: {status.get('acked', 0)} acked, connected "
                             f"{status.get('connected')}")
            for h in helpers:
                if isinstance(h, Drain):
                    notes.append(f"collectd: {h.packets} UDP packets received by the bench")
                elif isinstance(h, Scraper):
                    notes.append(f"node_exporter: {h.scrapes} scrapes")
        finally:
            for h in helpers:
                h.stopped.set()
            for s in subjects:
                s.stop()
            server.stop()
    return subjects, startups, notes


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def _spread(values: List[float]) -> str:
    if not values:
        return "no READY"
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def report(subjects: List[Subject], startups: Dict[str, List[float]], notes: List[str],
           seconds: float) -> List[str]:
    lines = [f"Footprint: {seconds:g} s window, every subject at once; CPU from each "
             f"process's own /proc times (1 tick = {TICK_S * 1000:.0f} ms = "
             f"{100 * TICK_S / seconds:.3f} % over the window)",
             "",
             "| subject | RSS MB | PSS MB | USS MB | CPU % of a core | ticks | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for s in subjects:
        r = s.result
        if "error" in r:
            lines.append(f"| {s.name} | | | | | | {r['error']} |")
            continue
        lines.append(f"| {s.name} | {_mb(r['rss'])} | {_mb(r['pss'])} | {_mb(r['uss'])} | "
                     f"{r['cpu']:.3f} | {r['ticks']} | {s.note} |")
    lines.append("")
    lines.append(f"Start-up, exec to READY=1 (ms, min / median / max of {len(startups['agent'])}"
                 f"): agent {_spread(startups['agent'])}; bare interpreter + imports "
                 f"{_spread(startups['bare'])}")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append("")
    lines += targets(subjects, startups)
    return lines


def targets(subjects: List[Subject], startups: Dict[str, List[float]]) -> List[str]:
    by = {s.name: s.result for s in subjects}
    agent, bare = by.get("nexus-agent, 1 s", {}), by.get("bare interpreter + agent's imports", {})
    out = ["Targets:"]

    def mark(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    if "cpu" in agent:
        out.append(f"- CPU at 1 s <= {TARGET_CPU_1S} % of a core: {agent['cpu']:.3f} % "
                   f"({agent['ticks']} ticks) {mark(agent['cpu'] <= TARGET_CPU_1S)}")
    for floor_name in ("bare sampler + sender, 1 s", "bare /proc sampler + sender, 1 s"):
        floor = by.get(floor_name, {})
        if "cpu" in agent and "cpu" in floor:
            out.append(f"- CPU at 1 s against the {floor_name[:-5]} (the same readings and "
                       f"traffic, nothing else): {agent['cpu']:.3f} % against "
                       f"{floor['cpu']:.3f} % (ratio {ratio(agent['cpu'], floor['cpu'])})")
    if "rss" in agent and "rss" in bare:
        over = (agent["rss"] - bare["rss"]) / 1024
        out.append(f"- RSS within {TARGET_RSS_OVER_BARE_MB:g} MB of the bare interpreter: "
                   f"{over:+.1f} MB (PSS {(agent['pss'] - bare['pss']) / 1024:+.1f} MB, USS "
                   f"{(agent['uss'] - bare['uss']) / 1024:+.1f} MB) "
                   f"{mark(over <= TARGET_RSS_OVER_BARE_MB)}")
        out.append(f"- RSS against the bare interpreter: ratio {ratio(agent['rss'], bare['rss'])}")
    if startups["agent"]:
        median = statistics.median(startups["agent"])
        out.append(f"- start-up to READY < {TARGET_READY_MS:.0f} ms: median {median:.0f} ms "
                   f"{mark(median < TARGET_READY_MS)}")
    else:
        out.append("- start-up to READY: no READY received MISSED")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="CPU window (default 60)")
    ap.add_argument("--starts", type=int, default=5, help="start-up runs (default 5)")
    args = ap.parse_args(argv)
    os.environ.update(child_env())
    # As installed (make install compiles the bytecode): the agent's modules from .pyc, like
    # its dependencies from site-packages, not compiled again at every start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "agent")], check=True)
    subjects, startups, notes = measure(args.seconds, args.starts)
    print("\n".join(report(subjects, startups, notes, args.seconds)))
    return 0 if all("error" not in s.result for s in subjects) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Application samples (issue 24): the ingest socket's rate, bytes stored per sample, and the
idle cost of an open socket, each beside a baseline measured in the same run.

1. Ingest: one client writes ``N`` line-protocol samples to a running agent's socket
   (durability ``normal``, no server: everything stays queued), 200 lines per write,
   waiting for the 200 answers before the next write; samples a second from the first
   write to the last ``ok``. Baseline: a bare loop of the same number of SQLite inserts
   (autocommit, WAL, ``synchronous=NORMAL``, the outbox's page size, on the same disk)
   of the same payload, encoded to JSON in the loop from the same dict, as the
   "durable enqueue" row's baseline does. Target (the issue): at least 5,000 a second
   and 70 %.
2. Bytes stored per sample: the payload cell of an application sample (4 metrics, 2
   tags, DEFLATE_2) against the agent's own sample (20 metrics, DEFLATE_1), and the
   outbox file's growth per sample over 2,000 puts of each.
3. Idle: two agents connected to one nexus-server for the same window, one with the
   socket open and no client, one without; CPU each (``utime + stime``) and how often
   the socket's thread woke up (its voluntary context switches: 0 means it slept in
   ``select`` the whole time, no polling).

Alone: ``python bench/run.py ingest`` (or ``python bench/ingest.py``).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import AgentProcess, ServerProcess, child_env, wait_for, write_config  # noqa: E402

INGEST_SAMPLES = 20_000
CHUNK = 200
IDLE_SECONDS = 30.0


def _line(i: int) -> bytes:
    return b"line3,shift=b count=%di,temp_c=41.5,pressure_bar=3.25,cycle_ms=%di\n" % (i, 800 + i)


def _app_dict(i: int) -> dict:
    return {"device_id": "device-001", "source": "line3",
            "metrics": {"count": i, "temp_c": 41.5, "pressure_bar": 3.25, "cycle_ms": 800 + i},
            "tags": {"shift": "b"}}


def _app_payload(i: int) -> str:
    from agent import protocol as p

    return p.dumps(_app_dict(i))


def ingest_rate(tmp: Path, n: int = INGEST_SAMPLES) -> float:
    """Samples a second through a running agent's socket (see the module docstring)."""
    sock_path = tmp / "ingest.sock"
    agent = AgentProcess(write_config(tmp, "ws://127.0.0.1:9/v1/ws",
                                      telemetry={"interval_s": 5},
                                      queue={"max_bytes": 10**9},
                                      inputs={"socket": {"path": str(sock_path),
                                                         "max_samples_per_s": 10**6}}))
    try:
        wait_for(lambda: sock_path.exists(), timeout=30, what="the agent's socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(str(sock_path))
        chunks = [b"".join(_line(i + j) for j in range(CHUNK)) for i in range(0, n, CHUNK)]
        oks = 0
        start = time.perf_counter()
        for chunk in chunks:
            sock.sendall(chunk)
            got = b""
            while got.count(b"\n") < CHUNK:
                got += sock.recv(65536)
            oks += got.count(b"ok ")
        elapsed = time.perf_counter() - start
        sock.close()
        if oks != n:
            raise RuntimeError(f"only {oks} of {n} samples were answered ok")
        return n / elapsed
    finally:
        agent.stop()


def bare_insert_rate(tmp: Path, n: int = INGEST_SAMPLES) -> float:
    from agent import outbox as outbox_mod
    from agent import protocol as p

    dicts = [_app_dict(i) for i in range(n)]
    db = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    db.execute(f"PRAGMA page_size={outbox_mod.PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT)")
    start = time.perf_counter()
    for payload in dicts:
        db.execute("INSERT INTO t (body) VALUES (?)", (p.dumps(payload),))
    rate = n / (time.perf_counter() - start)
    db.close()
    return rate


def stored_bytes(tmp: Path, n: int = 2000) -> Dict[str, Tuple[float, float]]:
    """(payload cell bytes, outbox file growth) per sample, for app and system samples."""
    import disk  # bench/disk.py: the agent's own sample

    from agent import codec
    from agent import protocol as p
    from agent.outbox import Outbox

    system = disk.sample_payload()
    out: Dict[str, Tuple[float, float]] = {}
    for name, payload_of in (("app", _app_payload), ("system", lambda i: system)):
        folder = tmp / f"bytes-{name}"
        box = Outbox(codec.CODEC, str(folder), 10**9)
        for i in range(n):
            box.put("telemetry", json.loads(payload_of(i)), p.format_timestamp(1.7e9 + i))
        cells = box._db.execute("SELECT AVG(LENGTH(payload)) FROM messages").fetchone()[0]
        box.close()  # checkpointed: the file holds every row
        size = sum(f.stat().st_size for f in folder.glob("outbox.db*"))
        out[name] = (float(cells), size / n)
    return out


def _cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _thread_switches(pid: int, name: str) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == name[:15]:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    return -1


def idle_cpu(tmp: Path, seconds: float = IDLE_SECONDS) -> Dict[str, float]:
    """CPU ms of an agent with the socket open and no client, and of one without, over the
    same window, and the socket thread's wake-ups in it."""
    server = ServerProcess()
    agents: Dict[str, AgentProcess] = {}
    try:
        for name, inputs in (("socket", {"socket": {"path": str(tmp / "with" / "i.sock")}}),
                             ("plain", None)):
            folder = tmp / ("with" if inputs else "without")
            folder.mkdir()
            extra = {"inputs": inputs} if inputs else {}
            agents[name] = AgentProcess(write_config(folder, server.url,
                                                     telemetry={"interval_s": 5},
                                                     log_level="info", **extra))
        for agent in agents.values():
            wait_for(lambda agent=agent: agent.status().get("connected"), timeout=30,
                     what="the agents to connect")
        time.sleep(2.0)  # bench only: let start-up settle before the window opens
        pid = {name: a.proc.pid for name, a in agents.items()}
        cpu0 = {name: _cpu_ms(p) for name, p in pid.items()}
        wake0 = _thread_switches(pid["socket"], "nexus-input-socket")
        time.sleep(seconds)  # bench only: the measured idle window
        result = {f"cpu_{name}": _cpu_ms(p) - cpu0[name] for name, p in pid.items()}
        result["socket_wakeups"] = _thread_switches(pid["socket"], "nexus-input-socket") - wake0
        return result
    finally:
        for agent in agents.values():
            agent.stop()
        server.stop()


def measure(seconds: float = IDLE_SECONDS) -> Dict[str, object]:
    with tempfile.TemporaryDirectory(dir=ROOT) as d:  # the same disk as the agent's
        tmp = Path(d)
        (tmp / "agent").mkdir()
        rates: List[Tuple[float, float]] = []
        for i in range(3):  # in turns: the machine's load falls on both alike
            (tmp / f"bare-{i}").mkdir()
            (tmp / f"agent-{i}").mkdir()
            rates.append((ingest_rate(tmp / f"agent-{i}"), bare_insert_rate(tmp / f"bare-{i}")))
        ours = sorted(r[0] for r in rates)[1]
        bare = sorted(r[1] for r in rates)[1]
        return {"ingest": ours, "bare": bare, "bytes": stored_bytes(tmp),
                "idle": idle_cpu(tmp, seconds)}


def report(m: Dict[str, object], seconds: float = IDLE_SECONDS) -> List[str]:
    ingest, bare = float(m["ingest"]), float(m["bare"])  # type: ignore[arg-type]
    sizes: Dict[str, Tuple[float, float]] = m["bytes"]  # type: ignore[assignment]
    idle: Dict[str, float] = m["idle"]  # type: ignore[assignment]
    ok = "MET" if ingest >= 5000 and ingest / bare >= 0.7 else "MISSED"
    return [
        f"ingest socket, one client, normal  {ingest:10,.0f} /s  bare inserts {bare:10,.0f} /s"
        f"  {ingest / bare:.0%}  target >=5,000/s and >=70% {ok}"
        f"  ({INGEST_SAMPLES:,} samples, {CHUNK} lines a write; median of 3, in turns)",
        f"bytes stored per sample            app {sizes['app'][0]:6.1f} (payload cell), "
        f"{sizes['app'][1]:6.1f} (file)   system {sizes['system'][0]:6.1f}, "
        f"{sizes['system'][1]:6.1f}   app <= system: "
        f"{'MET' if sizes['app'][0] <= sizes['system'][0] else 'MISSED'}",
        f"idle CPU over {seconds:.0f} s (5 s interval)    socket open {idle['cpu_socket']:6.0f} ms"
        f"   no socket {idle['cpu_plain']:6.0f} ms   socket thread woke "
        f"{idle['socket_wakeups']:.0f} times (0: no polling)",
    ]


def main(argv: List[str]) -> int:
    os.environ.update(child_env())
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else IDLE_SECONDS
    print("Application samples (issue 24)")
    for line in report(measure(seconds), seconds):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

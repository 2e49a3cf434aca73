"""The Modbus input (issue 25): what merging saves, what a poll costs, what the input costs.

1. Requests per poll of a 100-point device, planned by ``modbus.plan`` against one
   request per point (what reading point by point costs), for four layouts.
2. One poll of 100 holding registers over TCP on loopback against pymodbus's server in
   its own process: the input's way (``modbus.poll`` through ``modbus_client.Port``:
   one merged request, 100 values decoded) against one bare pymodbus read of the same
   100 registers and against one read per register; median of ``--polls``, in turns.
3. The agent with one device of 50 points polled every second, beside the same agent
   without Modbus, both streaming to one nexus-server on loopback in the same window:
   CPU (its own user + system ticks) and RSS at the end (bench/footprint.py readings).

    python bench/modbusbench.py [--seconds 30] [--polls 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from footprint import TICK_S, Subject, agent_config, ratio  # noqa: E402
from helpers import AgentProcess, ServerProcess, child_env, unit_env  # noqa: E402

from agent import modbus  # noqa: E402

# A pymodbus server in its own process (so that its event loop does not share our GIL):
# prints its URL, serves until stdin closes. Holding registers 0-299 hold 0..299.
PEER = """
import sys
sys.path.insert(0, sys.argv[1])
from modbuskit import Peer
peer = Peer({1: {"holding": {i: i for i in range(300)}, "input": {i: i for i in range(300)}}})
print(peer.url, flush=True)
sys.stdin.read()
peer.stop()
"""


def layouts() -> Dict[str, List[modbus.Point]]:
    h = "holding"
    return {
        "100 uint16, adjacent": [modbus.Point(f"p{i}", h, i, "uint16") for i in range(100)],
        "100 float32, adjacent": [modbus.Point(f"p{i}", h, 2 * i, "float32")
                                  for i in range(100)],
        "100 uint16, every 5th register": [modbus.Point(f"p{i}", h, 5 * i, "uint16")
                                           for i in range(100)],
        "100 uint16, every 20th register": [modbus.Point(f"p{i}", h, 20 * i, "uint16")
                                            for i in range(100)],
    }


def device(points: List[modbus.Point], url: str = "tcp://127.0.0.1:502") -> modbus.Device:
    return modbus.Device("bench", url, modbus.parse_url(url, "url"), 1, 1.0, 1.0,
                         tuple(points))


def merging() -> List[str]:
    lines = [f"{'100-point device':34} {'requests/poll':>13} {'one per point':>14}"]
    for name, points in layouts().items():
        lines.append(f"{name:34} {len(modbus.plan(device(points))):13d} {len(points):14d}")
    return lines


def start_peer() -> tuple:
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(ROOT / "tests")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL,  # pymodbus's deprecation notices
                            env=child_env(), cwd=ROOT)
    url = proc.stdout.readline().strip() if proc.stdout else ""
    if not url.startswith("tcp://"):
        proc.kill()
        raise RuntimeError(f"the pymodbus peer did not start: {url!r}")
    return proc, url


def stop_peer(proc: subprocess.Popen) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def poll_times(url: str, polls: int) -> Dict[str, float]:
    """Median milliseconds of one poll of 100 registers, three ways, taken in turns."""
    from agent.modbus_client import Port

    d = device(layouts()["100 uint16, adjacent"], url)
    port = Port(d.endpoint, 2.0)
    requests = modbus.plan(d)  # planned once, as the input does
    port.read("holding", 0, 1, 1)  # connected before the clock runs
    client = port._client  # the same connection, bare
    keyword = port._unit_keyword
    times: Dict[str, List[float]] = {"input": [], "bare": [], "per_register": []}
    try:
        for _ in range(polls):
            t0 = time.perf_counter()
            result, kinds, _ = modbus.poll(d, port.read, frozenset(), requests)
            t1 = time.perf_counter()
            regs = client.read_holding_registers(0, count=100, **{keyword: 1}).registers
            t2 = time.perf_counter()
            for i in range(100):
                client.read_holding_registers(i, count=1, **{keyword: 1})
            t3 = time.perf_counter()
            assert not kinds and result["p99"] == 99 and regs[99] == 99
            times["input"].append((t1 - t0) * 1000)
            times["bare"].append((t2 - t1) * 1000)
            times["per_register"].append((t3 - t2) * 1000)
    finally:
        port.close()
    return {name: statistics.median(values) for name, values in times.items()}


def fifty_points() -> List[Dict[str, object]]:
    points: List[Dict[str, object]] = [
        {"name": f"reg{i}", "table": "holding", "address": i, "type": "uint16"}
        for i in range(25)]
    points += [{"name": f"flt{i}", "table": "input", "address": 2 * i, "type": "float32",
                "scale": 0.1} for i in range(25)]
    return points


def footprint(url: str, seconds: float) -> List[Subject]:
    with tempfile.TemporaryDirectory(prefix="nexus-modbus-bench-") as d:
        tmp = Path(d)
        server = ServerProcess(0, "--rate-limit", "100000")
        subjects: List[Subject] = []
        agents = []
        try:
            for name, inputs in (("without Modbus", None), ("with 50 points at 1 s", {
                    "modbus": [{"name": "meter", "url": url, "unit": 1, "interval_s": 1,
                                "timeout_s": 1, "points": fifty_points()}]})):
                config = agent_config(tmp / name.split()[0], server.url, 1.0)
                raw = yaml.safe_load(config.read_text())
                raw["server"]["max_messages_per_minute"] = 600  # 1 or 2 samples a second
                if inputs:
                    raw["inputs"] = inputs
                config.write_text(yaml.safe_dump(raw))
                agent = AgentProcess(config, env=child_env(**unit_env()))
                agents.append(agent)
                subjects.append(Subject(f"nexus-agent, 1 s, {name}", agent.proc))
            time.sleep(6.0)  # imports, first connection, first polls
            for s in subjects:
                s.start()
            time.sleep(seconds)
            for s in subjects:
                s.finish(seconds)
            modbus_status = agents[1].status().get("input_details", {}).get("modbus", {})
            meter = modbus_status.get("devices", {}).get("meter", {})
            subjects[1].note = (f"{meter.get('polls', 0)} polls, condition "
                                f"{meter.get('condition')!r}")
        finally:
            for agent in agents:
                agent.stop()
            server.stop()
    return subjects


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--polls", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        import pymodbus  # noqa: F401
    except ImportError:
        print("modbus: skipped (pymodbus, the modbus extra, is not installed)")
        return 0
    print("Modbus: requests per poll (merging, modbus.plan; at most 125 registers each)")
    print("\n".join(merging()))
    proc, url = start_peer()
    try:
        t = poll_times(url, args.polls)
        print()
        print(f"one poll of 100 registers, TCP loopback, median of {args.polls} (ms):")
        print(f"  the input (1 request planned once, 100 decoded): {t['input']:.2f}")
        print(f"  bare pymodbus read of the 100 registers:      {t['bare']:.2f}  (input/bare "
              f"{ratio(t['input'], t['bare'])})")
        print(f"  one read per register (100 requests):         {t['per_register']:.2f}")
        subjects = footprint(url, args.seconds)
    finally:
        stop_peer(proc)
    print()
    print(f"agent, same window of {args.seconds:g} s, both streaming to one nexus-server:")
    base = subjects[0].result
    for s in subjects:
        r = s.result
        if "error" in r:
            print(f"  {s.name}: {r['error']}")
            continue
        print(f"  {s.name:42} CPU {r['cpu']:5.2f} % ({r['ticks']} ticks)  RSS "
              f"{r['rss'] / 1024:5.1f} MB  {s.note}")
    if "error" not in base and "error" not in subjects[1].result:
        extra = subjects[1].result
        print(f"  Modbus adds {extra['cpu'] - base['cpu']:+.2f} % CPU and "
              f"{(extra['rss'] - base['rss']) / 1024:+.1f} MB RSS (tick {TICK_S * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

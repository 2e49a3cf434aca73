"""CPU of two (or more) versions of the agent side by side, thread by thread (issue 15).

Ticks from ``/proc/PID/stat`` (what bench/footprint.py reports) are 10 ms
each, and the agent at 1 s uses about a dozen a minute: one tick either way is
8 %, and a shared machine moves more than that between runs. So a change is
measured here against the version before it *in the same run*: every version
named on the command line (a git revision, or a directory holding ``agent/``)
is exported, compiled to bytecode, and started at the same time against one
nexus-server at 1 s with the shipped timers and the unit's environment (as in
bench/footprint.py); after a warm-up, each thread's CPU is read from
``/proc/PID/task/TID/schedstat`` (nanoseconds of run time, not ticks) over the
window. Threads are listed in the order they start: main, outbox syncer,
sampler, transport (then command workers, if any).

Name a version twice to see the noise between two copies of the same code.

    python bench/abcpu.py [--seconds 60] main HEAD [HEAD]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import footprint  # noqa: E402
from helpers import ServerProcess, child_env, terminate, unit_env  # noqa: E402

THREADS = ("main", "syncer", "sampler", "transport")


def export(version: str, into: Path) -> Path:
    """A directory holding ``agent/`` for ``version`` (a directory, or a git revision)."""
    if (Path(version) / "agent").is_dir():
        return Path(version)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", version, "agent"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def thread_times(pid: int) -> Dict[int, int]:
    """Run time in ns of each thread of ``pid``, by thread id."""
    out: Dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except OSError:
            continue  # a thread that ended
    return out


def measure(versions: List[str], seconds: float) -> List[Tuple[str, int, List[float]]]:
    with tempfile.TemporaryDirectory(prefix="nexus-abcpu-") as d:
        tmp = Path(d)
        trees = [export(v, tmp / f"v{i}") for i, v in enumerate(versions)]
        for tree in trees:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "agent")],
                           check=True)
        server = ServerProcess(0, "--rate-limit", "100000")
        procs: List[subprocess.Popen] = []
        try:
            for i, tree in enumerate(trees):
                config = footprint.agent_config(tmp / f"a{i}", server.url, 1.0)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agent", "--config", str(config)], cwd=tree,
                    env=child_env(**unit_env()), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
            time.sleep(8.0)  # imports, first connection, first acks
            before = [(thread_times(p.pid), footprint.cpu_ticks(p.pid)) for p in procs]
            time.sleep(seconds)
            after = [(thread_times(p.pid), footprint.cpu_ticks(p.pid)) for p in procs]
        finally:
            for p in procs:
                terminate(p)
            server.stop()
    out = []
    for version, (t0, k0), (t1, k1) in zip(versions, before, after):
        per = [(ns - t0.get(tid, 0)) / 1e6 for tid, ns in sorted(t1.items())]
        out.append((version, k1 - k0, per))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="window (default 60)")
    ap.add_argument("versions", nargs="+", help="git revisions or directories holding agent/")
    args = ap.parse_args(argv)
    os.environ.update(child_env())
    rows = measure(args.versions, args.seconds)
    names = list(THREADS) + [f"thread {i}" for i in range(len(THREADS),
                                                           max(len(r[2]) for r in rows))]
    print(f"CPU over {args.seconds:g} s at 1 s, all versions at once (ms of run time; "
          "ticks of 10 ms)")
    print("| version | ticks | ms | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for version, ticks, per in rows:
        cells = [f"{x:.1f}" for x in per] + [""] * (len(names) - len(per))
        print(f"| {version} | {ticks} | {sum(per):.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

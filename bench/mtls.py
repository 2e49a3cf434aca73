"""Client certificates (issue 27): what mTLS costs a connect and the agent's memory, each
beside a baseline measured in the same run.

1. Handshake: TCP connect, TLS handshake, WebSocket upgrade, until the server's
   ``connected`` arrives, with websocket-client against a real ``nexus-server`` on
   loopback, ``N`` times each (default 200), the kinds taken in turns so that the
   machine's load falls on all alike:

   * ``tls+token``: wss, a device token in ``Authorization``, no client certificate;
   * ``mtls``: wss, a device certificate and no token (the server reads the device from
     the certificate the handshake verified);
   * ``ws+token``: plain ws with a token: the baseline.

   Both wss kinds go to the same server (``--tls-cert --tls-key --client-ca``: it asks
   every client for a certificate); the plain one to a second server. Every connection
   is a full handshake (websocket-client makes a new SSL context for each: no session
   resumption, as an agent after a restart). Keys are ECDSA P-256 (tests/pki.py).
   Median and p95, in milliseconds.
2. Agent RSS: ``nexus-agent`` with a client certificate and no token, and with a token
   over TLS (and, for scale, with a token over plain ws, where the agent never imports
   ``ssl``), started together against those servers; VmRSS once each has ``acked``
   ``SAMPLES`` samples, median of ``ROUNDS`` rounds.

Alone: ``python bench/mtls.py [--connects N]`` (also part of ``make bench``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import AgentProcess, ServerProcess, child_env, mint, wait_for, write_config  # noqa: E402
from pki import make_ca, make_cert  # noqa: E402

CONNECTS = 200
SAMPLES = 20
ROUNDS = 3
DEVICE = "bench-device"
KINDS = ("tls+token", "mtls", "ws+token")
# Every connect of the one device identity counts against its budget; lifted.
SERVER_ARGS = ("--rate-limit", "1000000")


def make_pki(folder: Path) -> Dict[str, Tuple[Path, Path]]:
    ca = make_ca(folder)
    return {"ca": ca,
            "server": make_cert(folder, ca, "server", "127.0.0.1", san="IP:127.0.0.1"),
            "device": make_cert(folder, ca, "device", DEVICE,
                                san=f"URI:urn:nexus:device:{DEVICE}")}


def connect_once(kind: str, urls: Dict[str, str], pki) -> float:
    """Seconds from connect to the ``connected`` message; the close is not timed."""
    import websocket

    token_header = [f"Authorization: Bearer {mint(DEVICE)}"]
    sslopt = {"ca_certs": str(pki["ca"][0])}
    if kind == "mtls":
        sslopt.update(certfile=str(pki["device"][0]), keyfile=str(pki["device"][1]))
    url = urls["wss" if kind != "ws+token" else "ws"]
    header = [] if kind == "mtls" else token_header  # minted before the clock starts
    start = time.perf_counter()
    ws = websocket.create_connection(url, header=header, timeout=10,
                                     sslopt=sslopt if url.startswith("wss") else None)
    try:
        first = ws.recv()
        took = time.perf_counter() - start
        if '"connected"' not in first:
            raise RuntimeError(f"{kind}: not connected: {first[:200]}")
        return took
    finally:
        ws.close(timeout=1)


def handshakes(urls: Dict[str, str], pki, n: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    for _ in range(n):
        for kind in KINDS:  # in turns
            times[kind].append(connect_once(kind, urls, pki))
    return times


def p95(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def agent_config(folder: Path, kind: str, urls: Dict[str, str], pki) -> Path:
    import yaml

    folder.mkdir(parents=True)
    url = urls["ws" if kind == "ws+token" else "wss"]
    server = {} if kind == "ws+token" else {"ca_file": str(pki["ca"][0])}
    device = DEVICE if kind == "mtls" else f"{DEVICE}-{kind.split('+')[0]}"
    path = write_config(folder, url, device, log_level="warning", server=server)
    if kind == "mtls":
        cfg = yaml.safe_load(path.read_text())
        del cfg["server"]["token_file"]
        cfg["server"].update(client_cert=str(pki["device"][0]),
                             client_key=str(pki["device"][1]))
        path.write_text(yaml.safe_dump(cfg))
    return path


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def agent_rss(tmp: Path, urls: Dict[str, str], pki) -> Dict[str, List[int]]:
    """VmRSS (KiB) of each kind's agent once it has SAMPLES acked, ROUNDS times."""
    out: Dict[str, List[int]] = {kind: [] for kind in KINDS}
    for rnd in range(ROUNDS):
        agents = {kind: AgentProcess(agent_config(tmp / f"r{rnd}-{kind}", kind, urls, pki))
                  for kind in KINDS}
        try:
            for kind, agent in agents.items():
                wait_for(lambda: agent.status().get("acked", 0) >= SAMPLES,  # noqa: B023
                         timeout=60, what=f"{kind} agent's {SAMPLES} samples acked")
                out[kind].append(rss_kb(agent.proc.pid))
        finally:
            for agent in agents.values():
                agent.stop()
    return out


def measure(n: int) -> Tuple[Dict[str, List[float]], Dict[str, List[int]]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "pki").mkdir()
        pki = make_pki(tmp / "pki")
        wss = ServerProcess(0, *SERVER_ARGS, "--tls-cert", str(pki["server"][0]),
                            "--tls-key", str(pki["server"][1]),
                            "--client-ca", str(pki["ca"][0]))
        ws = ServerProcess(0, *SERVER_ARGS)
        try:
            urls = {"wss": wss.url, "ws": ws.url}
            times = handshakes(urls, pki, n)
            rss = agent_rss(tmp, urls, pki)
        finally:
            wss.stop()
            ws.stop()
    return times, rss


def report(times: Dict[str, List[float]], rss: Dict[str, List[int]]) -> List[str]:
    base = statistics.median(times["ws+token"])
    lines = [f"{'connect to connected (ms)':28} {'median':>8} {'p95':>8} {'x ws median':>12}"]
    for kind in KINDS:
        med = statistics.median(times[kind])
        lines.append(f"{kind:28} {med * 1e3:8.2f} {p95(times[kind]) * 1e3:8.2f} "
                     f"{med / base:12.2f}")
    lines.append(f"(n = {len(times['ws+token'])} each, in turns; baseline: ws+token)")
    tls = statistics.median(rss["tls+token"])
    lines.append(f"{'agent VmRSS (MB)':28} {'median':>8} {'vs tls+token':>13}")
    for kind in ("mtls", "tls+token", "ws+token"):
        value = statistics.median(rss[kind])
        lines.append(f"{kind:28} {value / 1024:8.1f} {(value - tls) / 1024:+12.1f}")
    lines.append(f"(after {SAMPLES} samples acked; median of {ROUNDS} rounds; "
                 "baseline: tls+token)")
    return lines


def main(argv: List[str]) -> int:
    os.environ.update(child_env())
    n = int(argv[argv.index("--connects") + 1]) if "--connects" in argv else CONNECTS
    print("Client certificates (issue 27)")
    if shutil.which("openssl") is None:  # tests/pki.py makes the certificates with it
        print("skipped: no openssl command")
        return 0
    for line in report(*measure(n)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

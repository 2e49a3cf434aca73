"""Application samples through an outage, end to end (issue 24's figure): samples sent to
the ingest socket while the server is down arrive exactly once, with their sources, tags
and timestamps, within 2 minutes of the server's return (as batches).

Opt-in (marked ``soak``): ``make ingest-outage`` runs the issue's full figure, 100,000
samples and a 10-minute outage (about 13 minutes). ``pytest -m soak
tests/test_ingest_outage.py`` alone runs a shorter default: 5,000 samples, 10 s down.
``NEXUS_INGEST_SAMPLES`` and ``NEXUS_INGEST_OUTAGE_S`` set other sizes.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time

import pytest
from helpers import AgentProcess, ServerProcess, free_port, wait_for, write_config

SAMPLES = int(os.environ.get("NEXUS_INGEST_SAMPLES", "5000"))
OUTAGE_S = float(os.environ.get("NEXUS_INGEST_OUTAGE_S", "10"))
BACK_WITHIN_S = 120.0
T0_NS = 1_764_669_600_000_000_000  # 2025-12-02T10:00:00Z; sample i is i ms later


def _rows(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, sample_time, payload FROM telemetry WHERE payload LIKE "
                           "'%\"source\"%'").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


@pytest.mark.soak
def test_samples_sent_during_an_outage_arrive_once_with_source_tags_and_time(tmp_path):
    import json

    db = tmp_path / "server.db"
    port = free_port()
    server = ServerProcess(port, db=str(db))
    sock_path = tmp_path / "ingest.sock"
    agent = AgentProcess(write_config(
        tmp_path, server.url, server={"max_messages_per_minute": 90},
        telemetry={"interval_s": 5}, queue={"max_bytes": 200_000_000},
        inputs={"socket": {"path": str(sock_path), "max_samples_per_s": 100_000}}))
    try:
        wait_for(lambda: sock_path.exists() and agent.status().get("connected"), timeout=30,
                 what="the agent connected with its socket")
        server.stop()
        down_at = time.monotonic()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(str(sock_path))
        ids = []
        for start in range(0, SAMPLES, 500):
            lines = b"".join(b"line%d,shift=s%d count=%di,temp_c=%d.5 %d\n"
                             % (i % 3, i % 2, i, i % 90, T0_NS + i * 1_000_000)
                             for i in range(start, min(SAMPLES, start + 500)))
            sock.sendall(lines)
            got = b""
            while got.count(b"\n") < lines.count(b"\n"):
                got += sock.recv(65536)
            answers = got.decode().splitlines()
            assert all(a.startswith("ok ") for a in answers), answers[:3]
            ids += [a[3:] for a in answers]
        sock.close()
        remaining = OUTAGE_S - (time.monotonic() - down_at)
        if remaining > 0:
            time.sleep(remaining)  # the outage itself: the server is down this long
        server = ServerProcess(port, db=str(db))
        back_at = time.monotonic()
        wait_for(lambda: len(_rows(db)) >= SAMPLES, timeout=BACK_WITHIN_S, interval=0.5,
                 what=f"{SAMPLES} samples at the server within {BACK_WITHIN_S:.0f} s")
        took = time.monotonic() - back_at
        rows = _rows(db)
        assert len(rows) == SAMPLES == len({r[0] for r in rows})  # each once
        assert sorted(r[0] for r in rows) == sorted(ids)
        for _, sample_time, payload in rows:
            body = json.loads(payload)
            i = body["metrics"]["count"]
            assert body["source"] == f"line{i % 3}" and body["tags"] == {"shift": f"s{i % 2}"}
            assert sample_time == time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(T0_NS // 10**9 + i // 1000)) + \
                f".{i % 1000:03d}Z"
        print(f"{SAMPLES} samples, {OUTAGE_S:.0f} s down: all at the server {took:.1f} s "
              "after its return")
    finally:
        assert agent.stop() == 0
        server.stop()

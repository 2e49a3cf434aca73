"""Kill -9 durability: a process writes the queue and acks at full speed; we SIGKILL it at
random moments (also while it is still opening the file) and check after each kill.

After every kill: each message whose put returned is either still queued or was acked
(an ack that was under way counts as either), no id appears twice or is reused, the
file passes SQLite's integrity check, and it opens within 1 s. Both durability
settings; the kill points are random but seeded, so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from faults import record, times
from helpers import REPO

from agent.outbox import Outbox
from agent.codec import CODEC

WRITER = textwrap.dedent("""
    import random, sys
    from agent.outbox import Outbox
    from agent.codec import CODEC
    box = Outbox(CODEC, sys.argv[1], 10**9, durability=sys.argv[2], sync_interval_s=0.01)
    rng = random.Random(int(sys.argv[3]))
    print("R", flush=True)
    queued = []
    while True:
        record = box.put("telemetry", {"device_id": "d", "metrics": {"n": len(queued)}},
                         "2025-01-01T00:00:00.000Z")
        print("P", record.id, flush=True)
        queued.append(record.id)
        if len(queued) > 8 and rng.random() < 0.5:
            done, queued = queued[:rng.randint(1, 6)], queued[6:]
            print("a", ",".join(done), flush=True)
            box.ack(done)
            print("A", flush=True)
""")


def _run_and_kill(state, durability, rng, seed):
    """Start the writer, kill it at a random moment; what it said it had done."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state), durability, str(seed)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        if rng.random() < 0.2:
            delay = rng.uniform(0, 0.15)  # often still opening (or migrating) the file
        else:
            assert proc.stdout.readline().strip() == "R"
            delay = rng.uniform(0, 0.3)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:  # a random kill point, not a synchronisation
            pass
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    put, acked, maybe = [], set(), set()
    pending = set()
    for line in out.split("\n")[:-1]:  # the last piece is cut short by the kill, or empty
        kind, _, rest = line.partition(" ")
        if kind == "P":
            put.append(rest)
        elif kind == "a":
            pending = set(rest.split(","))
        elif kind == "A":
            acked |= pending
            pending = set()
    maybe |= pending  # an ack under way when killed: gone or not, both are right
    return put, acked, maybe


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path, durability):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    state = tmp_path / "state"
    all_put, all_acked, all_maybe = [], set(), set()
    slowest = 0.0
    for _ in range(times(10, 100)):
        put, acked, maybe = _run_and_kill(state, durability, rng, rng.randrange(10**6))
        all_put += put
        all_acked |= acked
        all_maybe |= maybe
        record("kills")
        if not (state / "outbox.db").exists():
            continue
        start = time.monotonic()
        box = Outbox(CODEC, str(state), 10**9, durability=durability)
        opened = time.monotonic() - start
        slowest = max(slowest, opened)
        queued = [r.id for r in box.read_after(0, 10**6)]
        box.close()
        con = sqlite3.connect(state / "outbox.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        present = set(queued)
        lost = [i for i in all_put if i not in present and i not in all_acked
                and i not in all_maybe]
        record("kills_lost", len(lost))
        assert not lost, f"seed {seed}: committed and lost: {lost[:5]}"
        duplicated = len(all_put) - len(set(all_put)) + len(queued) - len(set(queued))
        record("kills_duplicated", duplicated)
        assert duplicated == 0, f"seed {seed}: an id was reused"
        assert opened < 1.0, f"seed {seed}: open took {opened:.2f} s"
    record("slowest_open_ms", slowest * 1000, how="max")
    assert all_put, "the writer never got to write"
    os.sync()

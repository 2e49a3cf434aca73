"""Shared by the fault suite (tests/test_faults_*.py): how hard to try, and the figures.

The default run tries each fault a few times; ``make faults`` sets NEXUS_FAULTS=full
and tries each many times, then prints the table that ``record`` fills (see
``pytest_terminal_summary`` in conftest.py). ``docs/reliability.md`` holds the last
table.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import DefaultDict

FULL = os.environ.get("NEXUS_FAULTS") == "full"

FIGURES: DefaultDict[str, float] = defaultdict(float)

# The table's rows, in order: key -> what it counts.
ROWS = {
    "kills": "SIGKILLs of a process writing the queue (recovery included)",
    "kills_lost": "messages committed before a kill and found neither queued nor acked",
    "kills_duplicated": "ids found twice, or reused after a kill",
    "slowest_open_ms": "slowest queue open after a kill (ms)",
    "outages": "companion server SIGKILLed and restarted under a sampling agent",
    "outage_lost": "samples never stored after the outages",
    "outage_duplicates_stored": "samples stored twice",
    "wire_duplicate_pct": "samples sent more than once on the wire (% of those stored)",
    "network_faults": "network faults injected through the proxy",
    "network_lost": "samples lost to network faults",
    "corruptions_injected": "queue files corrupted (stopped and running)",
    "corruptions_detected": "of those, detected and set aside with the loss said",
    "power_cuts": "power cuts: agent SIGKILLed online, its WAL cut at a random frame",
    "power_cut_lost": "samples acked after a power cut's restart but not stored as themselves",
    "bit_flips": "single bits flipped in a queue file, then the queue drained",
    "bit_flips_delivered": "of those, everything delivered (the bit did not matter)",
    "bit_flips_rows_set_aside": "of those, rows set aside with a reason, the rest delivered",
    "bit_flips_file_set_aside": "of those, the file set aside as corrupt, the loss said",
    "bit_flips_refused": "of those, the agent refused to start naming the file",
    "lying_server_connections": "connections to a server that refuses frames over 64 KiB",
    "device_starts_simulated": "device starts (epochs) drawn, no id repeated",
    "disk_full": "disk-full episodes (a private tmpfs filled up)",
    "model_examples": "model-based queue examples (put, read, ack, set aside, reopen, cap)",
    "bad_inputs": "bad frames and tokens tried against the server and the agent",
    "crashes": "fault tests failed (a crash, hang, loss or leaked thread fails its test)",
}


def times(default: int, full: int) -> int:
    """How many times to try: ``full`` under make faults, else ``default``."""
    return full if FULL else default


def record(key: str, amount: float = 1, how: str = "add") -> None:
    if how == "max":
        FIGURES[key] = max(FIGURES[key], amount)
    else:
        FIGURES[key] += amount

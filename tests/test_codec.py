"""The codec's dictionaries: the system input's rows unchanged, application samples with a
dictionary of their own (DEFLATE_2) that costs them no more bytes than system samples."""

from __future__ import annotations

import json
import os
import sys

from agent import codec
from agent import protocol as p
from agent.codec import CODEC
from agent.inputs import Sample
from agent.mailbox import telemetry_payload
from agent.outbox import Outbox

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import disk  # noqa: E402  bench/disk.py: the agent's own sample



def app_payload(i: int) -> bytes:
    sample = Sample("line3", 0.0, {"count": 12 + i, "temp_c": 41.5 + i / 10,
                                   "pressure_bar": 3.25, "cycle_ms": 812 + i},
                    {"shift": "b", "site": "north"})
    return p.dumps(telemetry_payload("device-001", sample)).encode()


def test_system_samples_keep_dictionary_1_and_application_samples_take_dictionary_2():
    system = disk.sample_payload().encode()
    assert codec.pack_payload(system)[0] == codec.DEFLATE_1
    result = p.dumps(p.CommandResult("c-1", "device-001", "succeeded", 0, "", "", 12)
                     .to_payload()).encode()
    assert codec.pack_payload(result)[0] == codec.DEFLATE_1
    app = codec.pack_payload(app_payload(0))
    assert app[0] == codec.DEFLATE_2
    assert codec.unpack_payload(app) == app_payload(0).decode()
    # ZDICT_1 is released: the second dictionary leaves it as it was
    assert codec.ZDICT_1.startswith(b'{"command_id":"","device_id":""')
    assert codec.ZDICT_1.endswith(b'"agent_reconnects":0,"agent_clock_offset_s":0}}')
    assert codec._ZDICTS[codec.DEFLATE_1] is codec.ZDICT_1


def test_names_no_dictionary_holds_still_compress_and_read_back():
    text = p.dumps({"device_id": "device-001", "source": "kiln-controller-17",
                    "metrics": {f"zone_{i}_setpoint_kelvin": 1000.0 + i for i in range(12)},
                    "tags": {"operator_shift_supervisor": "someone-unusual"}}).encode()
    packed = codec.pack_payload(text)
    assert packed is not None and packed[0] == codec.DEFLATE_2 and len(packed) < len(text) / 2
    assert codec.unpack_payload(packed) == text.decode()


def test_an_application_sample_costs_no_more_stored_bytes_than_a_system_sample(tmp_path):
    """Bytes stored per sample: the payload cell, and the file's growth over 500 samples."""
    system = disk.sample_payload()
    sys_cell = len(codec.pack_payload(system.encode()))
    app_cells = [len(codec.pack_payload(app_payload(i))) for i in range(50)]
    assert max(app_cells) <= sys_cell
    # Without its own dictionary the same app sample would cost more (what DEFLATE_2 buys).
    c = codec._DEFLATER_1.copy()
    assert len(c.compress(app_payload(0)) + c.flush()) + 1 > app_cells[0]

    def stored_bytes(folder, payload_of):
        box = Outbox(CODEC, str(tmp_path / folder), 10**8)
        try:
            before = box._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) "
                                     "FROM messages").fetchone()[0]
            for i in range(500):
                box.put("telemetry", payload_of(i), p.format_timestamp(1.7e9 + i))
            return (box._db.execute("SELECT SUM(LENGTH(payload)) FROM messages").fetchone()[0]
                    - before) / 500
        finally:
            box.close()

    per_system = stored_bytes("system", lambda i: json.loads(system))
    per_app = stored_bytes("app", lambda i: json.loads(app_payload(i)))
    assert per_app <= per_system, (per_app, per_system)

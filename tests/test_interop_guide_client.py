"""The platform guide's own Node.js client, unmodified, against nexus-server."""

from __future__ import annotations

import json
import os
import subprocess

from helpers import connected, mint
from nodejs import INTEROP


def test_guide_client_connects_subscribes_sends_and_gets_ack_and_update(server, node_path):
    watcher = connected(server.url, "alice", "operator")
    watcher.request({"type": "subscribe", "id": "w", "payload": {"channel": "telemetry"}})
    env = dict(os.environ, NODE_PATH=node_path)
    out = subprocess.run(["node", str(INTEROP / "run-guide-client.js"), server.url,
                          mint("device-001"), "device-001"],
                         env=env, capture_output=True, text=True, timeout=60)
    events = [json.loads(line[6:]) for line in out.stdout.splitlines()
              if line.startswith("EVENT ")]
    kinds = [e["event"] for e in events]
    assert out.returncode == 0, (kinds, out.stderr[-2000:])
    assert kinds[0] == "connected"
    assert "server_error" not in kinds
    assert "ack" in kinds and kinds[-1] == "telemetry.update"
    update = events[-1]["payload"]
    assert update["device_id"] == "device-001"
    assert update["metrics"] == {"cpu_usage": 12.5, "memory_usage": 40.1}
    ack_id = next(e["id"] for e in events if e["event"] == "ack")
    assert [r["id"] for r in server.hub.telemetry("device-001")] == [ack_id]
    # an operator watching the channel saw the same sample
    assert watcher.recv_type("telemetry.update")["payload"]["message_id"] == ack_id

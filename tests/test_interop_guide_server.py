"""nexus-agent against the platform guide's own reference server (Node.js, verbatim)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import SECRET, AgentProcess, free_port, wait_for, write_config
from nodejs import INTEROP


class GuideServer:
    def __init__(self, node_path: str, log_path) -> None:
        self.port = free_port()
        self._log = open(log_path, "w")
        self.log_path = log_path
        env = dict(os.environ, NODE_PATH=node_path, JWT_SECRET=SECRET, WS_PORT=str(self.port))
        self.proc = subprocess.Popen(["node", str(INTEROP / "run-guide-server.js")], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: "listening on port" in log_path.read_text(), what="the guide server")
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def telemetry(self):
        return [json.loads(line[10:]) for line in self.log_path.read_text().splitlines()
                if line.startswith("TELEMETRY ")]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


@pytest.mark.parametrize("auth", ["header", "query"])
def test_agent_streams_to_the_guide_reference_server(tmp_path, node_path, auth):
    server = GuideServer(node_path, tmp_path / "guide-server.log")
    agent = AgentProcess(write_config(tmp_path, server.url, server={"auth": auth}))
    try:
        samples = wait_for(lambda: len(server.telemetry()) >= 3 and server.telemetry(),
                           what="telemetry at the guide server")
        assert samples[0]["device_id"] == "device-001"
        assert {"cpu_usage", "memory_usage"} <= set(samples[0]["metrics"])
        status = wait_for(lambda: agent.status().get("acked", 0) >= 3 and agent.status(),
                          what="acks from the guide server")
        assert status["connected"] and status["clock_offset_s"] is not None
        assert "Invalid JSON" not in server.log_path.read_text()
    finally:
        assert agent.stop() == 0
        server.stop()


def test_guide_server_gets_only_single_telemetry_from_an_agent_with_a_backlog(tmp_path,
                                                                             node_path):
    """The guide's server offers no capabilities: a backlog must arrive as plain telemetry
    messages (a telemetry.batch would be answered UNKNOWN_MESSAGE_TYPE and logged)."""
    from agent.outbox import Outbox
    from agent.codec import CODEC

    box = Outbox(CODEC, str(tmp_path / "state"), 10**7)
    for i in range(40):
        box.put("telemetry", {"device_id": "device-001", "metrics": {"cpu_usage": 1.0,
                                                                     "memory_usage": 2.0,
                                                                     "seq": i}},
                "2025-11-03T01:53:54.518Z")
    box.close()
    server = GuideServer(node_path, tmp_path / "guide-server.log")
    agent = AgentProcess(write_config(tmp_path, server.url))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 40 and
                 agent.status().get("queue_depth", 1) <= 2, timeout=30, what="the backlog")
        seqs = [t["metrics"].get("seq") for t in server.telemetry()]
        assert set(range(40)) <= set(seqs)
        assert "telemetry.batch offered" not in agent.log()
        assert "UNKNOWN_MESSAGE_TYPE" not in agent.log() and "server error" not in agent.log()
    finally:
        assert agent.stop() == 0
        server.stop()


def test_guide_server_takes_application_samples_with_source_and_tags(tmp_path, node_path):
    """The guide's server reads device_id and metrics and passes the payload on: the extra
    source and tags keys of an application's sample are neither refused nor lost."""
    from agent.codec import CODEC
    from agent.inputs import Sample
    from agent.mailbox import Mailbox
    from agent.outbox import Outbox

    box = Outbox(CODEC, str(tmp_path / "state"), 10**7)
    mailbox = Mailbox(box, lambda: None, "device-001")
    ids = [mailbox.sample(Sample("line3", 1_764_669_600 + i, {"count": i, "temp_c": 41.5},
                                 {"shift": "b"})) for i in range(5)]
    box.close()
    server = GuideServer(node_path, tmp_path / "guide-server.log")
    agent = AgentProcess(write_config(tmp_path, server.url))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 5, timeout=30, what="acks")
        apps = [t for t in server.telemetry() if "source" in t]
        assert [t["metrics"]["count"] for t in apps] == list(range(5)) and len(ids) == 5
        assert apps[0] == {"device_id": "device-001", "source": "line3",
                           "metrics": {"count": 0, "temp_c": 41.5}, "tags": {"shift": "b"}}
        assert "UNKNOWN_MESSAGE_TYPE" not in agent.log() and "server error" not in agent.log()
    finally:
        assert agent.stop() == 0
        server.stop()

"""Property: random and malformed frames never crash the server; every answer is documented.

One server for the whole property (fast); after each frame a ping with a fresh id
marks the end of the answers to that frame. Every message in between must be a
known reply type or an ``error`` with a documented code, and a second client must
still be served at the end.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from helpers import SECRET, Peer, connected
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol as p

REPLY_TYPES = {"pong", "subscribed", "unsubscribed", "ack", "error", "telemetry.update",
               "commands.update", "command.result"}
DOCUMENTED_CLOSES = {1008, 1009}  # 1011 would mean a handler crashed

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
types = st.one_of(st.sampled_from(p.CLIENT_TYPES + ("connected", "ack", "error", "")),
                  st.text(max_size=12), scalars)
payloads = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "device_id": st.one_of(st.just("device-001"), scalars),
    "metrics": st.one_of(st.dictionaries(st.text(max_size=8), scalars, max_size=4),
                         json_values),
    "channel": st.one_of(st.sampled_from(p.CHANNELS), scalars),
    "filters": json_values,
    "command_id": scalars, "name": scalars, "args": json_values, "status": scalars,
    "duration_ms": scalars, "ttl_s": scalars}))
envelopes = st.fixed_dictionaries({}, optional={
    "type": types, "id": st.one_of(st.text(max_size=140), scalars),
    "timestamp": st.one_of(st.just("2025-11-03T01:53:54.518Z"), st.text(max_size=30), scalars),
    "payload": payloads, "error": json_values})
frames = st.one_of(envelopes.map(json.dumps), json_values.map(json.dumps),
                   st.text(max_size=200), st.binary(max_size=64))


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[Any]:
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=10**6,
                                         close_timeout_s=0.2), SECRET.encode()).start()
    yield srv
    srv.stop()


class Session:
    def __init__(self, url: str) -> None:
        self.url = url
        self.peer: Peer = connected(url)
        self.n = 0

    def check(self, frame: str | bytes) -> None:
        self.n += 1
        marker = f"end-{self.n}"
        try:
            if isinstance(frame, bytes):
                self.peer.ws.send_binary(frame)
            else:
                self.peer.send(frame)
            self.peer.send({"type": "ping", "id": marker})
            while True:
                msg = self.peer.recv()
                assert msg["type"] in REPLY_TYPES, msg
                if msg["type"] == "error":
                    assert msg["error"]["code"] in p.ERROR_CODES, msg
                    assert msg["error"]["code"] != "INTERNAL_ERROR", msg
                if msg["type"] == "pong" and msg.get("id") == marker:
                    return
        except ConnectionError as exc:  # the server closed: the code must be documented
            code = int(str(exc).rsplit(" ", 1)[-1])
            assert code in DOCUMENTED_CLOSES, code
            self.peer = connected(self.url)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=frames)
def test_random_frames_get_documented_answers(fuzz_server, frame):
    session = getattr(fuzz_server, "_fuzz_session", None)
    if session is None:
        session = fuzz_server._fuzz_session = Session(fuzz_server.url)
    session.check(frame)


def test_server_still_serves_after_the_fuzz(fuzz_server):
    other = connected(fuzz_server.url, "device-002")
    assert other.request({"type": "ping", "id": "after"})["type"] == "pong"

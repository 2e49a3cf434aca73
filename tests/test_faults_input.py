"""Bad input at both ends: generated frames at the server's hub and at the agent's session
(both sans-I/O, so thousands of frames a second), every negative JWT case, oversize
frames and floods against a real server. Each gets its documented answer; nothing
raises where it should not, and no thread is left behind.
"""

from __future__ import annotations

import json
import threading
import time

import jwt
import pytest
from faults import record, times
from helpers import SECRET, Peer, connected, mint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol as p
from agent.server.hub import Hub, HubSettings
from agent.server.tokens import Identity
from agent.session import CommandArrived, End, Ended, Send, Session, SessionConfig

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=20), st.sampled_from(["\ud800", "x" * 5000, "-1e999"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
item = st.fixed_dictionaries({}, optional={"id": st.one_of(st.text(max_size=10), scalars),
                                           "timestamp": st.one_of(st.just(
                                               "2025-11-03T01:53:54.518Z"), scalars),
                                           "metrics": st.one_of(st.dictionaries(
                                               st.text(max_size=5), scalars, max_size=3),
                                               values)})
payload = st.one_of(values, st.fixed_dictionaries({}, optional={
    "device_id": st.one_of(st.just("device-001"), scalars), "metrics": values,
    "items": st.one_of(st.lists(item, max_size=5), values), "channel": scalars,
    "filters": values, "name": scalars, "args": values, "command_id": scalars,
    "status": scalars, "duration_ms": scalars, "client_id": scalars,
    "server_time": scalars, "capabilities": values, "rejected": values}))
envelope = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(p.CLIENT_TYPES + (
        "connected", "ack", "error", "pong", "commands.update", "telemetry.update")), scalars),
    "id": st.one_of(st.sampled_from(["same", "same", "\ud800"]), st.text(max_size=130),
                    scalars),
    "timestamp": st.one_of(st.just("2025-11-03T01:53:54.518Z"), scalars),
    "payload": payload, "error": st.one_of(values, st.fixed_dictionaries(
        {"code": st.sampled_from(p.ERROR_CODES), "message": st.text(max_size=5)}))})
frames = st.one_of(envelope.map(lambda e: json.dumps(e)), values.map(json.dumps),
                   st.text(max_size=100), st.binary(max_size=40),
                   st.integers(1, 3000).map(lambda n: "[" * n + "]" * n))


class _Peer:
    def __init__(self):
        self.sent, self.closed = [], []

    def send(self, text):
        self.sent.append(text)

    def close(self, code, reason):
        self.closed.append(code)


# The rate budget is tested on its own, below: here it never runs out.
HUB = Hub(settings=HubSettings(rate_limit_per_minute=10**9, samples_per_minute=10**9))
DEVICE = HUB.connect(Identity("device-001", "device", 2**40), _Peer(), 0.0)[0]
OPERATOR = HUB.connect(Identity("ops", "operator", 2**40), _Peer(), 0.0)[0]


@settings(max_examples=times(600, 20000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames, as_operator=st.booleans())
def test_hub_answers_every_frame_with_documented_messages(frame, as_operator):
    record("bad_inputs")
    client = OPERATOR if as_operator else DEVICE
    for _, text in HUB.handle(client, frame, time.time()):
        msg = json.loads(text)
        text.encode("utf-8")  # always sendable
        if msg["type"] == "error":
            assert msg["error"]["code"] in p.ERROR_CODES
            assert msg["error"]["code"] != p.INTERNAL_ERROR, msg  # would be a bug of ours


def _session():
    s = Session(SessionConfig("device-001", 5, 20, 10, 30, 16, 90, True), 0.0)
    s.receive(p.encode(p.make("connected", 0.0, p.welcome_payload("c", 0.0, None))), 0.0, 0.0)
    return s


@settings(max_examples=times(600, 20000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames)
def test_agent_session_takes_any_frame_from_a_server(frame):
    record("bad_inputs")
    s = _session()
    events = s.receive(frame, 1.0, 1.0)  # never raises
    for event in events:
        if isinstance(event, Ended):  # only an AUTH_FAILED error may end it from a frame
            assert event.why is End.AUTH_REFUSED, event
        elif isinstance(event, Send):
            p.decode(event.text)
        elif isinstance(event, CommandArrived):
            assert event.request.device_id == "device-001"


def _token(claims, key=SECRET, algorithm="HS256"):
    import warnings

    with warnings.catch_warnings():  # HS512 with our 39-byte test key: a weak key on purpose
        warnings.simplefilter("ignore")
        return jwt.encode(claims, key, algorithm=algorithm)


def _bad_tokens():
    """Made when a test runs (a long run would otherwise outlive "not yet valid")."""
    now = int(time.time())
    return {
        "alg none": jwt.encode({"sub": "device-001", "role": "device", "exp": now + 600}, None,
                               algorithm="none"),
        "another algorithm": _token({"sub": "device-001", "role": "device", "exp": now + 600},
                                    algorithm="HS512"),
        "wrong key": _token({"sub": "device-001", "role": "device", "exp": now + 600},
                            key="another-secret-of-enough-length-000000"),
        "expired": _token({"sub": "device-001", "role": "device", "exp": now - 10}),
        "not yet valid": _token({"sub": "device-001", "role": "device", "exp": now + 600,
                                 "nbf": now + 300}),
        "missing exp": _token({"sub": "device-001", "role": "device"}),
        "exp as a string": _token({"sub": "device-001", "role": "device",
                                   "exp": str(now + 600)}),
        "wrong role": _token({"sub": "device-001", "role": "admin", "exp": now + 600}),
        "no role": _token({"sub": "device-001", "exp": now + 600}),
        "no subject": _token({"role": "device", "exp": now + 600}),
        "garbage": "not.a.jwt",
        "neither header nor query": None,
    }


@pytest.mark.parametrize("case", sorted(_bad_tokens()))
def test_every_bad_token_gets_auth_failed_then_4000(server, case):
    record("bad_inputs")
    peer = Peer(server.url, _bad_tokens()[case])
    assert peer.recv()["error"]["code"] == "AUTH_FAILED"
    assert peer.close_code() == 4000


def test_a_device_claiming_another_device_and_floods_and_oversize(server):
    threads = threading.active_count()
    device = connected(server.url)
    record("bad_inputs", 3)
    reply = device.request({"type": "telemetry", "id": "t", "payload": {
        "device_id": "device-002", "metrics": {"cpu_usage": 1}}})
    assert reply["error"]["code"] == "FORBIDDEN"
    big = connected(server.url)
    big.send("x" * (p.MAX_MESSAGE_BYTES + 1))
    assert big.close_code() == 1009
    from agent.server.app import CompanionServer, ServerSettings

    small = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=5,
                                           close_timeout_s=0.2), SECRET.encode()).start()
    try:
        flood = Peer(small.url, mint("device-001"))
        flood.recv()
        codes = []
        for n in range(20):
            flood.send({"type": "ping", "id": f"f{n}"})
        try:
            while True:
                codes.append(flood.recv()["type"])
        except ConnectionError as exc:
            assert "1008" in str(exc)
        assert "error" in codes
    finally:
        small.stop()
    assert threading.active_count() <= threads + 1  # no thread left behind

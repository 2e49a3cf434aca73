"""The connection rules (agent/session.py) without a socket or a clock.

Wired to the companion server's own sans-I/O Hub in memory, or to scripted replies;
time is a number the test moves. One test per rule in session.py's docstring.
"""

from __future__ import annotations

import json

import pytest

from agent import protocol as p
from agent.server.hub import Hub
from agent.server.tokens import Identity
from agent.session import AuthRefused, ConnectionLost, Outgoing, Session, SessionConfig

WALL = 1_750_000_000.0


def config(**overrides):
    base = dict(device_id="device-001", connect_timeout_s=5, ping_interval_s=20,
                ping_timeout_s=10, ack_timeout_s=30, ack_window=4,
                max_messages_per_minute=600, subscribe_commands=False)
    base.update(overrides)
    return SessionConfig(**base)


def telemetry(n):
    text = json.dumps({"type": "telemetry", "id": f"e-{n}", "timestamp": p.format_timestamp(WALL),
                       "payload": {"device_id": "device-001", "metrics": {"n": n}}})
    return Outgoing(f"e-{n}", text)


def welcome_text(now=WALL):
    return p.encode(p.make("connected", now, {"client_id": "c1",
                                               "server_time": p.format_timestamp(now + 2.5)}))


def reply(type_, msg_id, **extra):
    return json.dumps({"type": type_, "id": msg_id, **extra})


def error(msg_id, code):
    return json.dumps({"type": "error", "id": msg_id, "error": {"code": code, "message": "m"}})


def opened(now=0.0, **overrides):
    s = Session(config(**overrides), now)
    s.receive(welcome_text(), now, WALL)
    return s


class _Peer:
    def __init__(self):
        self.texts = []

    def send(self, text):
        self.texts.append(text)

    def close(self, code, reason):
        self.texts.append(("close", code))


class InMemory:
    """A Session wired to the companion server's Hub: every text goes straight across."""

    def __init__(self, **overrides):
        self.hub = Hub()
        self.peer = _Peer()
        self.client, first = self.hub.connect(Identity("device-001", "device", 2**40), self.peer,
                                              WALL)
        self.now = 0.0
        self.session = Session(config(**overrides), self.now)
        self.deliver([first])

    def deliver(self, texts):
        for text in texts:
            self.session.frame_seen(self.now)
            self.session.receive(text, self.now, WALL + self.now)

    def pump(self):
        """Send what the session wants to send; deliver every answer."""
        while self.session.sends:
            sends, self.session.sends = self.session.sends, []
            for text in sends:
                answers = self.hub.handle(self.client, text, WALL + self.now)
                self.deliver([t for peer, t in answers if peer is self.peer])


# ---------------------------------------------------------------- welcome


def test_nothing_goes_before_the_welcome_and_it_times_out():
    s = Session(config(), 0.0)
    assert not s.open and not s.may_send(0.0)
    s.tick(4.9, WALL)
    assert s.deadline(0.0) == 5.0
    with pytest.raises(ConnectionLost, match="no 'connected'"):
        s.tick(5.1, WALL)


def test_welcome_opens_and_subscribes_to_own_commands():
    s = Session(config(subscribe_commands=True), 0.0, make_id=lambda: "sub-1")
    s.receive(welcome_text(), 0.0, WALL)
    assert s.open and s.welcome.server_time == pytest.approx(WALL + 2.5)
    sub = json.loads(s.sends.pop())
    assert sub == {"type": "subscribe", "id": "sub-1", "timestamp": sub["timestamp"],
                   "payload": {"channel": "commands", "filters": {"device_id": "device-001"}}}


# ---------------------------------------------------------------- window, pace, acks


def test_round_trip_with_the_real_hub_acks_everything_in_order():
    wire = InMemory(subscribe_commands=True)
    wire.pump()  # the subscribe
    for n in range(10):
        while not wire.session.may_send(wire.now):
            wire.pump()
        wire.session.send(telemetry(n), wire.now)
        wire.pump()
    assert wire.session.acks == [f"e-{n}" for n in range(10)]
    assert not wire.session.inflight and wire.session.worked
    assert [r["id"] for r in wire.hub.telemetry()] == [f"e-{n}" for n in range(10)]


def test_window_holds_sends_until_acks_come():
    s = opened(ack_window=2)
    s.send(telemetry(1), 0.0)
    s.send(telemetry(2), 0.0)
    assert not s.may_send(0.0) and not s.throttled  # the window, not the rate
    s.receive(reply("ack", "e-1"), 0.1, WALL)
    assert s.acks == ["e-1"] and s.may_send(0.1)
    s.receive(reply("ack", "unknown"), 0.1, WALL)  # harmless
    assert s.acks == ["e-1"]


def test_pace_never_exceeds_the_rate():
    s = opened(max_messages_per_minute=60, ack_window=1000)  # 1/s, burst 6
    sent = 0
    for tenth in range(600):  # one minute
        now = tenth / 10
        while s.may_send(now):
            s.send(telemetry(sent), now)
            sent += 1
    assert sent <= 60 + 6
    assert s.throttled and s.deadline(60.0) <= 61.0  # the next token


# ---------------------------------------------------------------- errors


def test_rate_limited_pauses_and_resends_that_message_first():
    s = opened()
    s.send(telemetry(1), 0.0)
    s.receive(error("e-1", "RATE_LIMITED"), 1.0, WALL)
    assert not s.may_send(5.9) and s.throttled and s.deadline(1.0) == pytest.approx(6.0)
    assert s.may_send(6.1)
    assert s.next_retry().id == "e-1" and s.next_retry() is None


def test_invalid_message_is_set_aside_other_errors_keep_it():
    s = opened()
    s.send(telemetry(1), 0.0)
    s.send(telemetry(2), 0.0)
    s.receive(json.dumps({"type": "error", "id": "e-1", "error": {
        "code": "INVALID_MESSAGE", "message": "bad", "field": "payload.metrics"}}), 0.1, WALL)
    assert s.set_aside == [("e-1", "the server rejected it: INVALID_MESSAGE: bad "
                            "(field payload.metrics)")]
    s.receive(error("e-2", "INTERNAL_ERROR"), 0.1, WALL)
    assert s.set_aside[1:] == [] and s.acks == []  # stays queued for the next connection


def test_a_single_message_of_a_type_the_server_does_not_know_is_set_aside():
    """Kept, it would stay the oldest in flight and end every connection at the ack
    timeout, forever (a type damaged on disk; issue 21)."""
    s = opened()
    s.send(telemetry(1), 0.0)
    s.receive(error("e-1", "UNKNOWN_MESSAGE_TYPE"), 0.1, WALL)
    assert [msg_id for msg_id, _ in s.set_aside] == ["e-1"] and not s.inflight


def test_auth_failed_ends_as_refused():
    s = opened()
    with pytest.raises(AuthRefused):
        s.receive(error(None, "AUTH_FAILED"), 0.0, WALL)


def test_malformed_and_unknown_messages_are_ignored():
    s = opened()
    for text in ["{not json", "[" * 5000 + "]" * 5000, b"\xff\xfe", '{"type":"weird","id":"x"}',
                 '{"type":"telemetry.update","id":"x","payload":{}}']:
        s.receive(text, 0.0, WALL)
    assert s.open and not (s.sends or s.acks or s.commands or s.set_aside)


# ---------------------------------------------------------------- liveness


def test_ping_after_silence_and_timeout_without_answer():
    s = opened(ping_interval_s=20, ping_timeout_s=10)
    s.tick(19.9, WALL)
    assert s.sends == [] and s.deadline(0.0) == 20.0
    s.tick(20.0, WALL)
    assert json.loads(s.sends.pop())["type"] == "ping"
    assert s.deadline(20.0) == 30.0
    s.tick(29.9, WALL)
    with pytest.raises(ConnectionLost, match="no answer to ping"):
        s.tick(30.1, WALL)


def test_any_frame_answers_the_ping_and_a_pong_marks_worked():
    s = opened(ping_interval_s=20, ping_timeout_s=10)
    s.tick(20.0, WALL)
    s.frame_seen(25.0)  # e.g. a protocol-level ping or a fragment from the server
    s.tick(34.0, WALL)  # no timeout: the peer is alive
    assert not s.worked
    s.tick(45.0, WALL)  # silent again for 20 s: ping again
    ping = json.loads(s.sends[-1])
    s.receive(reply("pong", ping["id"]), 46.0, WALL)
    assert s.worked and s.ping_sent is None


def test_ack_timeout_ends_the_connection():
    s = opened(ack_timeout_s=30, ping_interval_s=1000)
    s.send(telemetry(1), 0.0)
    assert s.deadline(0.0) == 30.0
    s.frame_seen(29.0)  # frames that are not its ack do not help
    with pytest.raises(ConnectionLost, match="no ack within 30 s"):
        s.tick(30.5, WALL)


# ---------------------------------------------------------------- commands


def test_commands_for_this_device_only():
    s = opened(subscribe_commands=True)
    for device in ("device-001", "device-999"):
        s.receive(json.dumps({"type": "commands.update", "id": "u", "payload": {
            "command_id": f"c-{device}", "device_id": device, "name": "ls", "args": {}}}),
            0.0, WALL)
    assert [c.command_id for c in s.commands] == ["c-device-001"]


def test_commands_ignored_without_an_allow_list():
    s = opened(subscribe_commands=False)
    s.receive(json.dumps({"type": "commands.update", "id": "u", "payload": {
        "command_id": "c", "device_id": "device-001", "name": "ls", "args": {}}}), 0.0, WALL)
    assert s.commands == []


# ---------------------------------------------------------------- batches


def batch(ids):
    return Outgoing("b-1", "{}", tuple(ids))


def welcome_with_batches(now=WALL):
    return p.encode(p.make("connected", now, p.welcome_payload(
        "c1", now, p.BatchOffer(1000, 700_000))))


def test_batches_only_when_offered_and_allowed():
    assert opened().batch_offer is None  # the guide's welcome offers nothing
    s = Session(config(), 0.0)
    s.receive(welcome_with_batches(), 0.0, WALL)
    assert s.batch_offer == p.BatchOffer(1000, 700_000)
    s = Session(config(batches=False), 0.0)
    s.receive(welcome_with_batches(), 0.0, WALL)
    assert s.batch_offer is None


def test_a_batch_ack_deletes_its_items_and_sets_aside_the_rejected():
    s = opened()
    s.send(batch(["e-1", "e-2", "e-3"]), 0.0)
    s.receive(json.dumps({"type": "ack", "id": "b-1", "payload": {
        "items": 3, "stored": 2, "rejected": [{"index": 1, "id": "e-2",
                                               "field": "payload.items.1.metrics.x",
                                               "message": "must be a finite number"}]}}),
        0.1, WALL)
    assert s.acks == ["e-1", "e-3"]
    assert s.set_aside == [("e-2", "the server rejected it in a batch: "
                            "payload.items.1.metrics.x: must be a finite number")]
    assert not s.inflight and s.worked


def test_a_plain_ack_for_a_batch_deletes_every_item():
    s = opened()
    s.send(batch(["e-1", "e-2"]), 0.0)
    s.receive(reply("ack", "b-1"), 0.1, WALL)
    assert s.acks == ["e-1", "e-2"] and s.set_aside == []


@pytest.mark.parametrize("code", ["INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE"])
def test_a_refused_batch_sets_nothing_aside_and_ends_with_batches_refused(code):
    from agent.session import BatchesRefused

    s = opened()
    s.send(batch(["e-1", "e-2"]), 0.0)
    with pytest.raises(BatchesRefused):
        s.receive(error("b-1", code), 0.1, WALL)
    assert s.set_aside == [] and s.acks == []


def test_a_welcome_with_a_bad_offer_offers_nothing():
    for offer in ("yes", {"max_items": "many", "max_bytes": 10}, {"max_items": 1}):
        s = Session(config(), 0.0)
        s.receive(json.dumps({"type": "connected", "id": "w", "payload": {
            "client_id": "c", "server_time": p.format_timestamp(WALL),
            "capabilities": {"telemetry.batch": offer}}}), 0.0, WALL)
        assert s.open and s.batch_offer is None

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
from agent.session import (
    Acked,
    CommandArrived,
    End,
    Ended,
    Opened,
    Outgoing,
    Refused,
    Send,
    Session,
    SessionConfig,
    Worked,
)

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


def sent(events):
    return [e.text for e in events if isinstance(e, Send)]


def acked(events):
    return [i for e in events if isinstance(e, Acked) for i in e.ids]


def refused(events):
    return [(e.id, e.reason) for e in events if isinstance(e, Refused)]


def ended(events):
    ends = [e for e in events if isinstance(e, Ended)]
    assert len(ends) == 1 and events[-1] is ends[0], events  # the last event, once
    return ends[0]


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
        self.events = []  # every event the session returned, in order
        self.pending = []  # texts the session wants sent
        self.deliver([first])

    def deliver(self, texts):
        for text in texts:
            self.session.frame_seen(self.now)
            self.take(self.session.receive(text, self.now, WALL + self.now))

    def take(self, events):
        self.events += events
        self.pending += sent(events)

    def pump(self):
        """Send what the session wants to send; deliver every answer."""
        while self.pending:
            text = self.pending.pop(0)
            answers = self.hub.handle(self.client, text, WALL + self.now)
            self.deliver([t for peer, t in answers if peer is self.peer])


# ---------------------------------------------------------------- welcome


def test_nothing_goes_before_the_welcome_and_it_times_out():
    s = Session(config(), 0.0)
    assert not s.open and not s.may_send(0.0)
    assert s.tick(4.9, WALL) == []
    assert s.deadline(0.0) == 5.0
    end = ended(s.tick(5.1, WALL))
    assert end.why is End.NO_WELCOME and "no 'connected'" in end.reason
    assert s.tick(6.0, WALL) == [] and not s.open  # nothing after the end


def test_welcome_opens_and_subscribes_to_own_commands():
    s = Session(config(subscribe_commands=True), 0.0, make_id=lambda: "sub-1")
    events = s.receive(welcome_text(), 0.0, WALL)
    assert isinstance(events[0], Opened) and events[0].welcome is s.welcome
    assert s.open and s.welcome.server_time == pytest.approx(WALL + 2.5)
    sub = json.loads(sent(events)[0])
    assert sub == {"type": "subscribe", "id": "sub-1", "timestamp": sub["timestamp"],
                   "payload": {"channel": "commands", "filters": {"device_id": "device-001"}}}


# ---------------------------------------------------------------- window, pace, acks


def test_round_trip_with_the_real_hub_acks_everything_in_order():
    wire = InMemory(subscribe_commands=True)
    wire.pump()  # the subscribe
    for n in range(10):
        while not wire.session.may_send(wire.now):
            wire.pump()
        wire.take(wire.session.send(telemetry(n), wire.now))
        wire.pump()
    assert acked(wire.events) == [f"e-{n}" for n in range(10)]
    assert not wire.session.unacked and [e for e in wire.events if isinstance(e, Worked)]
    assert [r["id"] for r in wire.hub.telemetry()] == [f"e-{n}" for n in range(10)]


def test_window_holds_sends_until_acks_come():
    s = opened(ack_window=2)
    assert sent(s.send(telemetry(1), 0.0)) == [telemetry(1).text]
    s.send(telemetry(2), 0.0)
    assert not s.may_send(0.0) and s.deadline(0.0) == 20.0  # the window, not the rate
    assert acked(s.receive(reply("ack", "e-1"), 0.1, WALL)) == ["e-1"] and s.may_send(0.1)
    assert s.receive(reply("ack", "unknown"), 0.1, WALL) == []  # harmless


def test_pace_never_exceeds_the_rate():
    s = opened(max_messages_per_minute=60, ack_window=1000)  # 1/s, burst 6
    sent = 0
    for tenth in range(600):  # one minute
        now = tenth / 10
        while s.may_send(now):
            s.send(telemetry(sent), now)
            sent += 1
    assert sent <= 60 + 6
    assert s.deadline(59.9) <= 60.9  # throttled: the next token is the deadline


# ---------------------------------------------------------------- errors


def test_rate_limited_pauses_and_resends_that_message_first():
    s = opened()
    s.send(telemetry(1), 0.0)
    assert s.receive(error("e-1", "RATE_LIMITED"), 1.0, WALL) == []
    assert not s.may_send(5.9) and s.deadline(1.0) == pytest.approx(6.0)
    assert s.may_send(6.1)
    assert s.next_retry().id == "e-1" and s.next_retry() is None


def test_invalid_message_is_set_aside_other_errors_keep_it():
    s = opened()
    s.send(telemetry(1), 0.0)
    s.send(telemetry(2), 0.0)
    events = s.receive(json.dumps({"type": "error", "id": "e-1", "error": {
        "code": "INVALID_MESSAGE", "message": "bad", "field": "payload.metrics"}}), 0.1, WALL)
    assert refused(events) == [("e-1", "the server rejected it: INVALID_MESSAGE: bad "
                                "(field payload.metrics)")]
    # Any other error: nothing to do; the message stays queued for the next connection.
    assert s.receive(error("e-2", "INTERNAL_ERROR"), 0.1, WALL) == []


def test_a_single_message_of_a_type_the_server_does_not_know_is_set_aside():
    """Kept, it would stay the oldest in flight and end every connection at the ack
    timeout, forever (a type damaged on disk; issue 21)."""
    s = opened()
    s.send(telemetry(1), 0.0)
    events = s.receive(error("e-1", "UNKNOWN_MESSAGE_TYPE"), 0.1, WALL)
    assert [msg_id for msg_id, _ in refused(events)] == ["e-1"] and not s.unacked


def test_auth_failed_ends_as_refused():
    s = opened()
    assert ended(s.receive(error(None, "AUTH_FAILED"), 0.0, WALL)).why is End.AUTH_REFUSED


@pytest.mark.parametrize("code,why", [(4000, End.AUTH_REFUSED), (1009, End.CLOSED),
                                      (None, End.CLOSED)])
def test_the_servers_close_ends_with_its_code_and_what_was_in_flight(code, why):
    s = opened()
    s.send(telemetry(1), 0.0)
    s.send(batch(["e-7", "e-8"]), 0.0)
    end = ended(s.closed(code, "bye"))
    assert (end.why, end.code, end.oldest, end.batch_bytes) == (why, code, "e-1", 2)
    assert s.closed(code, "again") == [] and not s.open


def test_malformed_and_unknown_messages_are_ignored():
    s = opened()
    for text in ["{not json", "[" * 5000 + "]" * 5000, b"\xff\xfe", '{"type":"weird","id":"x"}',
                 '{"type":"telemetry.update","id":"x","payload":{}}']:
        assert s.receive(text, 0.0, WALL) == []
    assert s.open


# ---------------------------------------------------------------- liveness


def test_ping_after_silence_and_timeout_without_answer():
    s = opened(ping_interval_s=20, ping_timeout_s=10)
    assert s.tick(19.9, WALL) == [] and s.deadline(0.0) == 20.0
    assert json.loads(sent(s.tick(20.0, WALL))[0])["type"] == "ping"
    assert s.deadline(20.0) == 30.0
    assert s.tick(29.9, WALL) == []
    end = ended(s.tick(30.1, WALL))
    assert end.why is End.PING_TIMEOUT and "no answer to ping" in end.reason


def test_any_frame_answers_the_ping_and_a_pong_marks_worked():
    s = opened(ping_interval_s=20, ping_timeout_s=10)
    s.tick(20.0, WALL)
    s.frame_seen(25.0)  # e.g. a protocol-level ping or a fragment from the server
    assert s.tick(34.0, WALL) == []  # no timeout: the peer is alive
    ping = json.loads(sent(s.tick(45.0, WALL))[-1])  # silent again for 20 s: ping again
    assert s.receive(reply("pong", ping["id"]), 46.0, WALL) == [Worked()]
    events = s.tick(56.0, WALL)  # past the old ping's timeout: answered, so a new ping
    assert json.loads(sent(events)[0])["type"] == "ping" and not any(
        isinstance(e, Ended) for e in events)
    assert s.receive(reply("pong", "again"), 47.0, WALL) == []  # worked once


def test_ack_timeout_ends_the_connection():
    s = opened(ack_timeout_s=30, ping_interval_s=1000)
    s.send(telemetry(1), 0.0)
    assert s.deadline(0.0) == 30.0
    s.frame_seen(29.0)  # frames that are not its ack do not help
    end = ended(s.tick(30.5, WALL))
    assert (end.why, end.reason, end.oldest, end.batch_bytes) == \
        (End.ACK_TIMEOUT, "no ack within 30 s", "e-1", None)


# ---------------------------------------------------------------- commands


def test_commands_for_this_device_only():
    s = opened(subscribe_commands=True)
    events = []
    for device in ("device-001", "device-999"):
        events += s.receive(json.dumps({"type": "commands.update", "id": "u", "payload": {
            "command_id": f"c-{device}", "device_id": device, "name": "ls", "args": {}}}),
            0.0, WALL)
    assert [e.request.command_id for e in events if isinstance(e, CommandArrived)] == \
        ["c-device-001"] and len(events) == 1


def test_commands_ignored_without_an_allow_list():
    s = opened(subscribe_commands=False)
    assert s.receive(json.dumps({"type": "commands.update", "id": "u", "payload": {
        "command_id": "c", "device_id": "device-001", "name": "ls", "args": {}}}),
        0.0, WALL) == []


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
    events = s.receive(json.dumps({"type": "ack", "id": "b-1", "payload": {
        "items": 3, "stored": 2, "rejected": [{"index": 1, "id": "e-2",
                                               "field": "payload.items.1.metrics.x",
                                               "message": "must be a finite number"}]}}),
        0.1, WALL)
    assert events == [Worked(), Refused("e-2", "the server rejected it in a batch: "
                                        "payload.items.1.metrics.x: must be a finite number"),
                      Acked(("e-1", "e-3"), batch=True)]
    assert not s.unacked


def test_a_plain_ack_for_a_batch_deletes_every_item():
    s = opened()
    s.send(batch(["e-1", "e-2"]), 0.0)
    assert s.receive(reply("ack", "b-1"), 0.1, WALL) == \
        [Worked(), Acked(("e-1", "e-2"), batch=True)]


@pytest.mark.parametrize("code", ["INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE"])
def test_a_refused_batch_sets_nothing_aside_and_ends_with_batches_refused(code):
    s = opened()
    s.send(batch(["e-1", "e-2"]), 0.0)
    end = ended(s.receive(error("b-1", code), 0.1, WALL))  # the only event: nothing refused
    assert end.why is End.BATCHES_REFUSED and end.batch_bytes == 2


def test_a_welcome_with_a_bad_offer_offers_nothing():
    for offer in ("yes", {"max_items": "many", "max_bytes": 10}, {"max_items": 1}):
        s = Session(config(), 0.0)
        s.receive(json.dumps({"type": "connected", "id": "w", "payload": {
            "client_id": "c", "server_time": p.format_timestamp(WALL),
            "capabilities": {"telemetry.batch": offer}}}), 0.0, WALL)
        assert s.open and s.batch_offer is None


def test_a_renewed_token_is_taken_only_when_offered_and_allowed():
    from agent.session import TokenRenewed

    renewed = json.dumps({"type": "token.renewed", "id": "r", "payload": {"token": "a.b.c"}})
    offering = p.encode(p.make("connected", WALL, p.welcome_payload("c1", WALL, None, 0.8)))
    for offered, allowed, expected in ((True, True, [TokenRenewed("a.b.c")]),
                                       (False, True, []), (True, False, [])):
        s = Session(config(renew_tokens=allowed), 0.0)
        s.receive(offering if offered else welcome_text(), 0.0, WALL)
        assert s.welcome.renews_tokens is offered
        assert s.receive(renewed, 0.1, WALL) == expected
    s = Session(config(renew_tokens=True), 0.0)
    s.receive(offering, 0.0, WALL)
    bad = json.dumps({"type": "token.renewed", "id": "r", "payload": {"token": "a b"}})
    assert s.receive(bad, 0.1, WALL) == []  # not one token: ignored, logged
    assert s.receive(renewed, 0.2, WALL) == [TokenRenewed("a.b.c")]
    assert s.receive(renewed, 0.3, WALL) == []  # one per connection: a flood is not taken

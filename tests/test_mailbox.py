"""The mailbox: a sample or a result is stored, then the transport is woken; the sample's
payload is the guide's, byte for byte as the sampler always sent it."""

from __future__ import annotations

import sqlite3

import pytest

from agent import protocol as p
from agent.errors import NotStored
from agent.inputs import Sample
from agent.mailbox import Mailbox
from agent.outbox import Outbox
from agent.codec import CODEC


def test_a_sample_is_stored_as_the_guides_telemetry_then_the_transport_woken(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    wakes = []
    mailbox = Mailbox(box, lambda: wakes.append(1), "device-001")
    metrics = {"cpu_usage": 12.5, "memory_usage": 40.1, "agent_queue_depth": 0}
    try:
        mailbox.sample(Sample("system", 1700000000.25, metrics))
        [record] = box.read_after(0, 10)
        assert record.type == "telemetry" and record.ts == p.format_timestamp(1700000000.25)
        assert record.payload == p.dumps({"device_id": "device-001", "metrics": metrics})
        assert record.payload == ('{"device_id":"device-001","metrics":{"cpu_usage":12.5,'
                                  '"memory_usage":40.1,"agent_queue_depth":0}}')
        assert wakes == [1]
        mailbox.post("command.result", {"command_id": "c1"}, p.format_timestamp(1.0))
        assert [r.type for r in box.read_after(0, 10)] == ["telemetry", "command.result"]
        assert wakes == [1, 1]
        with pytest.raises(ValueError):  # the system input's payload has no tags
            mailbox.sample(Sample("system", 1.0, metrics, {"site": "a"}))
        assert wakes == [1, 1]
    finally:
        box.close()


def test_an_application_sample_carries_its_source_and_tags_and_returns_its_id(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    mailbox = Mailbox(box, lambda: None, "device-001")
    try:
        first = mailbox.sample(Sample("line3", 1700000000.5, {"count": 12, "temp_c": 41.5},
                                      {"shift": "b"}))
        second = mailbox.sample(Sample("line4", 1700000001.0, {"count": 1}))
        one, two = box.read_after(0, 10)
        assert (one.id, two.id) == (first, second)
        assert one.ts == "2023-11-14T22:13:20.500Z"  # the sample's time is the envelope's
        assert one.payload == ('{"device_id":"device-001","source":"line3","metrics":'
                               '{"count":12,"temp_c":41.5},"tags":{"shift":"b"}}')
        assert two.payload == ('{"device_id":"device-001","source":"line4","metrics":'
                               '{"count":1}}')  # no tags: no key
    finally:
        box.close()


class FailingOutbox:
    def __init__(self, message):
        self.message = message

    def put(self, *args):
        raise sqlite3.OperationalError(self.message)


@pytest.mark.parametrize("message, waiting", [("database or disk is full", False),
                                              ("database is locked", True)])
def test_a_store_failure_says_whether_it_is_a_lock(message, waiting):
    wakes = []
    mailbox = Mailbox(FailingOutbox(message), lambda: wakes.append(1), "d")  # type: ignore
    with pytest.raises(NotStored) as err:
        mailbox.sample(Sample("system", 1.0, {"cpu_usage": 1.0}))
    assert err.value.waiting is waiting and message in err.value.reason and wakes == []

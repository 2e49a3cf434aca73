"""The hub's side of a cluster, without Redis: what a ClusterView brings in and takes out."""

from __future__ import annotations

import json
from typing import List

import pytest

from agent.server.hub import ClusterView, Hub
from hubkit import NOW, join


def frame(type_: str, msg_id: str, payload: dict) -> str:
    return json.dumps({"type": type_, "id": msg_id, "payload": payload})


def types(out) -> List[str]:
    return [json.loads(text)["type"] for _, text in out]


def test_duplicates_are_acked_not_stored_and_new_ones_are_published():
    hub = Hub()
    dev = join(hub, "d1")
    view = ClusterView(duplicates=frozenset({"old"}))
    out = hub.handle(dev, frame("telemetry", "old", {"device_id": "d1", "metrics": {"c": 1}}),
                     NOW, view)
    assert types(out) == ["ack"] and hub.telemetry() == [] and view.published == []
    view = ClusterView()
    hub.handle(dev, frame("telemetry", "new", {"device_id": "d1", "metrics": {"c": 1}}), NOW, view)
    assert view.stored == [("d1", "new")]
    assert [(c, p["message_id"]) for c, p in view.published] == [("telemetry", "new")]


def test_command_for_a_device_on_another_node_is_forwarded_and_its_result_routed_back():
    a, b = Hub(), Hub()
    op = join(a, "alice", "operator")
    view = ClusterView(device_nodes={"d1": "B"})
    cmd = frame("command", "c1", {"device_id": "d1", "name": "reboot", "args": {}})
    assert a.handle(op, cmd, NOW, view) == []
    (node, delivery), = view.forward
    assert node == "B" and delivery["command_id"] == "c1"
    dev = join(b, "d1")
    b.handle(dev, frame("subscribe", "s", {"channel": "commands"}), NOW)
    assert types(b.deliver_command(delivery, "A", NOW)) == ["commands.update"]
    result = {"command_id": "c1", "device_id": "d1", "status": "succeeded", "exit_code": 0,
              "stdout": "", "stderr": "", "duration_ms": 1}
    view = ClusterView()
    assert types(b.handle(dev, frame("command.result", "r1", result), NOW, view)) == ["ack"]
    (node, relayed), = view.results
    assert node == "A"
    out = a.deliver_result(relayed, NOW)
    assert [json.loads(t)["id"] for _, t in out] == ["c1"]


def test_ttl_command_is_parked_in_the_view_and_failure_reported_once():
    hub = Hub()
    op = join(hub, "alice", "operator")
    view = ClusterView()
    cmd = frame("command", "c2", {"device_id": "gone", "name": "x", "args": {}, "ttl_s": 5})
    assert hub.handle(op, cmd, NOW, view) == []
    assert [(d["command_id"], exp) for d, exp in view.parked] == [("c2", NOW + 5)]
    out = hub.command_failed("gone", "c2", "no node took it", NOW)
    assert json.loads(out[0][1])["error"]["code"] == "DEVICE_OFFLINE"
    assert hub.command_failed("gone", "c2", "again", NOW) == []
    assert hub.deliver_command({"command_id": "c3", "device_id": "gone", "name": "x",
                                "args": {}}, "A", NOW) is None


def test_commands_parked_in_redis_count_against_the_bound():
    """A cluster node parks ttl_s commands in Redis, not in the hub: the bound on waiting
    commands (MAX_PENDING_COMMANDS) counted the hub's own only, none on a cluster node."""
    from agent.server.hub import MAX_PENDING_COMMANDS

    hub = Hub()
    op = join(hub, "alice", "operator")
    cmd = frame("command", "c9", {"device_id": "gone", "name": "x", "args": {}, "ttl_s": 5})
    view = ClusterView(parked_here=MAX_PENDING_COMMANDS)
    (_, text), = hub.handle(op, cmd, NOW, view)
    assert json.loads(text)["error"]["code"] == "RATE_LIMITED" and view.parked == []
    view = ClusterView(parked_here=MAX_PENDING_COMMANDS - 1)
    assert hub.handle(op, cmd, NOW, view) == [] and len(view.parked) == 1


def test_seen_keys_of_two_different_pairs_never_collide():
    pytest.importorskip("redis")
    from agent.server.cluster import seen_key

    assert seen_key("dev-1", "e1-7") == "nexus:seen:dev-1:e1-7"
    pairs = [("a:b", "c"), ("a", "b:c"), ("a%3Ab", "c"), ("a%", "3Ab:c"), ("", "a:b:c"),
             ("a:b:c", ""), ("%", "%"), ("%25", "")]
    assert len({seen_key(d, i) for d, i in pairs}) == len(pairs)


def test_a_result_from_a_device_on_another_node_is_taken_only_from_the_commands_device():
    """Node B delivered c1 (from node A) to d1: d2's result for c1 is refused there, and
    the operator's node relays only a result from d1."""
    b = Hub()
    d1, d2 = join(b, "d1"), join(b, "d2")
    for dev in (d1, d2):
        b.handle(dev, frame("subscribe", "s", {"channel": "commands"}), NOW)
    delivery = {"command_id": "c1", "device_id": "d1", "name": "x", "args": {}}
    assert types(b.deliver_command(delivery, "A", NOW)) == ["commands.update"]
    result = {"command_id": "c1", "device_id": "d2", "status": "succeeded", "exit_code": 0,
              "stdout": "", "stderr": "", "duration_ms": 1}
    view = ClusterView()
    out = b.handle(d2, frame("command.result", "r1", result), NOW, view)
    assert json.loads(out[0][1])["error"]["code"] == "FORBIDDEN" and view.results == []
    view = ClusterView()
    assert types(b.handle(d1, frame("command.result", "r2", dict(result, device_id="d1")),
                          NOW, view)) == ["ack"]
    assert [node for node, _ in view.results] == ["A"]
    a = Hub()
    op = join(a, "alice", "operator")
    a.handle(op, frame("command", "c1", {"device_id": "d1", "name": "x", "args": {}}), NOW,
             ClusterView(device_nodes={"d1": "B"}))
    assert a.deliver_result(dict(result, device_id="d2"), NOW) == []  # not the device asked
    assert types(a.deliver_result(dict(result, device_id="d1"), NOW)) == ["command.result"]

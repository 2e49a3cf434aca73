"""The hub without sockets: what one frame costs it, and that its shortcuts say exactly
what the protocol module would have said."""

from __future__ import annotations

import json
import time
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import protocol as p
from agent.protocol import TimestampClock as Clock
from agent.protocol import ack_text
from agent.server.hub import Hub
from hubkit import NOW, join


def telemetry(msg_id: str, device: str) -> str:
    return json.dumps({"type": "telemetry", "id": msg_id, "timestamp": "2025-11-03T01:53:54.518Z",
                       "payload": {"device_id": device, "metrics": {"cpu_usage": 1.5}}})


@given(st.lists(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False), min_size=1,
                max_size=20))
def test_clock_formats_as_format_timestamp(instants):
    clock = Clock()
    for now in instants + sorted(instants) + [instants[0]]:  # cached and fresh, same answer
        assert clock(now) == p.format_timestamp(now)


def test_clock_rounds_near_a_second_boundary_as_datetime_does():
    clock = Clock()
    for now in (1.9999995, 1.9999994, 1_800_000_000.9999996, 1_800_000_000.0005, 0.0):
        assert clock(now) == p.format_timestamp(now), now


@given(st.text(min_size=1, max_size=p.MAX_ID_CHARS).filter(p._is_unicode))
def test_ack_text_is_what_encode_writes(msg_id):
    stamp = p.format_timestamp(NOW)
    assert ack_text(msg_id, stamp) == p.encode(p.make("ack", NOW, None, msg_id))


def test_a_broadcast_is_one_text_for_every_subscriber():
    hub = Hub()
    device = join(hub, "d1")
    operators = [join(hub, f"op-{i}", "operator") for i in range(3)]
    for op in operators:
        hub.handle(op, json.dumps({"type": "subscribe", "id": "s",
                                   "payload": {"channel": "telemetry"}}), NOW)
    out = hub.handle(device, telemetry("t-1", "d1"), NOW)
    updates = [text for peer, text in out if peer is not device.peer]
    assert len(updates) == 3 and len(set(updates)) == 1  # one message id for all of them
    assert json.loads(updates[0])["payload"]["message_id"] == "t-1"


def test_a_frame_is_validated_once(monkeypatch):
    calls: List[str] = []
    original = p.parse_telemetry

    def counting(env: p.Envelope) -> p.Telemetry:
        calls.append(env.id or "")
        return original(env)

    monkeypatch.setattr(p, "parse_telemetry", counting)
    hub = Hub()
    assert json.loads(hub.handle(join(hub, "d1"), telemetry("t-1", "d1"), NOW)[0][1])["type"] \
        == "ack"
    assert calls == ["t-1"]


def test_a_malformed_batch_is_invalid_even_where_batches_are_not_offered():
    from agent.server.hub import HubSettings

    hub = Hub(settings=HubSettings(batch=None))
    bad = json.dumps({"type": p.TELEMETRY_BATCH, "id": "b", "payload": {"device_id": "d1"}})
    good = json.dumps({"type": p.TELEMETRY_BATCH, "id": "b2", "payload": {
        "device_id": "d1", "items": [{"id": "i", "timestamp": "2025-11-03T01:53:54.518Z",
                                      "metrics": {"c": 1}}]}})
    device = join(hub, "d1")
    assert json.loads(hub.handle(device, bad, NOW)[0][1])["error"]["code"] == p.INVALID_MESSAGE
    assert json.loads(hub.handle(device, good, NOW)[0][1])["error"]["code"] \
        == p.UNKNOWN_MESSAGE_TYPE


def test_presence_of_a_large_fleet_costs_no_scan_per_disconnect():
    """10,000 devices leave: each asks "is another connection of this device left?" from
    an index, not by walking the fleet (which was 50 million steps here)."""
    hub = Hub()
    watcher = join(hub, "watcher", "operator")
    hub.handle(watcher, json.dumps({"type": "subscribe", "id": "s",
                                    "payload": {"channel": "events"}}), NOW)
    clients = [join(hub, f"d{i}") for i in range(10_000)]
    twin = join(hub, "d0")  # a reconnect that overtook the old connection
    start = time.process_time()
    offline = [hub.disconnect(c, NOW) for c in clients]
    assert time.process_time() - start < 2.0
    assert offline[0] == []  # d0 is still connected through its twin
    assert all(len(out) == 1 for out in offline[1:])
    assert json.loads(offline[1][0][1])["payload"] == {"event": "device.offline",
                                                       "device_id": "d1"}
    assert len(hub.disconnect(twin, NOW)) == 1
    assert hub.device_listening("d0") is False


def test_with_a_store_file_answers_wait_for_the_group_commit(tmp_path):
    import sqlite3

    from agent.server.hub import HubSettings

    path = str(tmp_path / "store.db")
    hub = Hub(path, HubSettings(rate_limit_per_minute=3))
    device, other = join(hub, "d1"), join(hub, "d2")
    reader = sqlite3.connect(path)
    assert hub.handle(device, telemetry("t-1", "d1"), NOW) == []  # held: not on disk yet
    assert hub.handle(other, json.dumps({"type": "ping", "id": "p"}), NOW) == []  # in line
    assert hub.uncommitted
    assert reader.execute("SELECT COUNT(*) FROM telemetry").fetchone() == (0,)
    for i in range(2, 8):  # past twice the rate limit: the close waits behind the acks
        hub.handle(device, telemetry(f"t-{i}", "d1"), NOW)
    out, closes = hub.commit()
    assert reader.execute("SELECT COUNT(*) FROM telemetry").fetchone() == (3,)
    assert [(peer is device.peer, json.loads(text)["type"]) for peer, text in out] == [
        (True, "ack"), (False, "pong"), (True, "ack"), (True, "ack"), (True, "error"),
        (True, "error"), (True, "error")]
    assert closes == [(device.peer, p.CLOSE_POLICY, "rate limit exceeded")]
    assert device.peer.closed == [] and not hub.uncommitted
    assert hub.commit() == ([], [])
    # Nothing written, nothing held: answered at once.
    assert json.loads(hub.handle(other, json.dumps({"type": "ping", "id": "q"}), NOW)[0][1])[
        "type"] == "pong"
    hub.close()


def test_in_memory_every_answer_goes_at_once():
    hub = Hub()
    out = hub.handle(join(hub, "d1"), telemetry("t-1", "d1"), NOW)
    assert [json.loads(text)["type"] for _, text in out] == ["ack"] and not hub.uncommitted


def subscribe(hub: Hub, client, channel: str = "telemetry") -> None:
    hub.handle(client, json.dumps({"type": "subscribe", "id": "s",
                                   "payload": {"channel": channel}}), NOW)


def batch(msg_id: str, device: str, item_ids: List[str]) -> str:
    return json.dumps({"type": p.TELEMETRY_BATCH, "id": msg_id, "payload": {
        "device_id": device, "items": [{"id": i, "timestamp": "2025-11-03T01:53:54.518Z",
                                        "metrics": {"cpu_usage": 2.0}} for i in item_ids]}})


@pytest.mark.parametrize("store", ["memory", "file"])
def test_two_devices_sending_the_same_id_are_both_stored_and_broadcast(tmp_path, store):
    """A message id is the device's own (``<epoch>-<seq>`` restarts for every device):
    dedupe is on (device_id, id), never on the id alone."""
    hub = Hub(str(tmp_path / "store.db") if store == "file" else ":memory:")
    op = join(hub, "op", "operator")
    subscribe(hub, op)
    first, second = join(hub, "d1"), join(hub, "d2")

    def answers(*frames) -> List[tuple]:
        """(to the operator?, message) for the frames, after the commit with a file."""
        out = [pair for client, text in frames for pair in hub.handle(client, text, NOW)]
        if store == "file":
            out += hub.commit()[0]
        return [(peer is op.peer, json.loads(text)) for peer, text in out]

    def updates(answered) -> List[tuple]:
        return [(m["payload"]["device_id"], m["payload"]["message_id"])
                for to_op, m in answered if to_op]

    assert updates(answers((first, telemetry("1-1", "d1")), (second, telemetry("1-1", "d2")))) \
        == [("d1", "1-1"), ("d2", "1-1")]
    out = answers((first, batch("b1", "d1", ["1-2", "1-3"])),
                  (second, batch("b2", "d2", ["1-2", "1-3"])))
    assert [m["payload"]["stored"] for to_op, m in out if not to_op] == [2, 2]
    assert updates(out) == [("d1", "1-2"), ("d1", "1-3"), ("d2", "1-2"), ("d2", "1-3")]
    # Each device's resend is still a duplicate of its own sample.
    assert updates(answers((first, telemetry("1-1", "d1")),
                           (second, batch("b3", "d2", ["1-2"])))) == []
    assert sorted((row["device_id"], row["id"]) for row in hub.telemetry()) == [
        (d, i) for d in ("d1", "d2") for i in ("1-1", "1-2", "1-3")]
    hub.close()


def test_a_store_file_keyed_by_id_alone_is_rekeyed_and_keeps_its_rows(tmp_path):
    import sqlite3

    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE telemetry (id TEXT PRIMARY KEY, device_id TEXT NOT NULL,
            sample_time TEXT NOT NULL, received_at TEXT NOT NULL, payload TEXT NOT NULL);
        CREATE INDEX telemetry_device ON telemetry (device_id);
        INSERT INTO telemetry VALUES ('1-1', 'd1', 't', 'r', '{"device_id": "d1"}');
        INSERT INTO telemetry VALUES ('1-2', 'd1', 't', 'r', '{"device_id": "d1"}');
        CREATE TABLE command_results (command_id TEXT PRIMARY KEY, device_id TEXT NOT NULL,
            status TEXT NOT NULL, received_at TEXT NOT NULL, payload TEXT NOT NULL);
        INSERT INTO command_results VALUES ('c1', 'd1', 'succeeded', 'r', '{}');""")
    old.commit()
    old.close()
    hub = Hub(path)
    hub.handle(join(hub, "d2"), telemetry("1-1", "d2"), NOW)
    hub.handle(join(hub, "d1"), telemetry("1-2", "d1"), NOW)  # still a duplicate
    hub.commit()
    assert [(r["device_id"], r["id"]) for r in hub.telemetry()] == [
        ("d1", "1-1"), ("d1", "1-2"), ("d2", "1-1")]
    hub.close()
    hub = Hub(path)  # opened again: nothing to do, nothing lost
    assert len(hub.telemetry()) == 3
    hub.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT command_id, device_id FROM command_results").fetchall() == [
        ("c1", "d1")]
    pk = [r[1] for r in sorted(check.execute("PRAGMA table_info(command_results)"),
                               key=lambda r: r[5]) if r[5]]
    assert pk == ["device_id", "command_id"]
    check.close()


def test_a_big_batch_is_handled_a_step_at_a_time_and_acked_after_the_last(tmp_path):
    """No single call stores more than batch_step_items items: the server's event loop
    serves other clients between the steps of a 1,000-item batch."""
    import time as clock

    from agent.server.hub import HubSettings
    from hubkit import handle_all

    hub = Hub(str(tmp_path / "s.db"), HubSettings(samples_per_minute=10**6))
    op = join(hub, "op", "operator")
    subscribe(hub, op)
    device = join(hub, "d1")
    text = json.dumps({"type": p.TELEMETRY_BATCH, "id": "big", "payload": {
        "device_id": "d1", "items": [
            {"id": f"i-{i}", "timestamp": "2025-11-03T01:53:54.518Z",
             "metrics": {f"metric_{k}": 1.5 * k for k in range(14)} if i != 7 else {"x": "y"}}
            for i in range(1000)]}})
    steps, longest = [], 0.0
    start = clock.perf_counter()
    hub.handle(device, text, NOW)
    steps.append(hub.commit()[0])
    longest = clock.perf_counter() - start
    while device.job is not None:
        start = clock.perf_counter()
        hub.resume(device, NOW)
        steps.append(hub.commit()[0])
        longest = max(longest, clock.perf_counter() - start)
    print(f"\n1,000-item batch: {len(steps)} steps, the longest {longest * 1e3:.1f} ms")
    assert len(steps) == 10
    assert all(sum(peer is op.peer for peer, _ in out) <= 100 for out in steps)
    acks = [json.loads(text) for out in steps for peer, text in out if peer is device.peer]
    assert len(acks) == 1 and steps[-1][-1][0] is device.peer  # the ack, last of all
    assert acks[0]["payload"]["stored"] == 999 and acks[0]["payload"]["rejected"][0]["index"] == 7
    assert len(hub.telemetry()) == 999
    # what the server does, in one helper: the same outcome
    again = handle_all(hub, join(hub, "d2"), text.replace('"d1"', '"d2"'))
    hub.commit()
    assert len(hub.telemetry("d2")) == 999 and again is not None
    hub.close()


def test_one_device_flooding_the_store_evicts_only_its_own_rows(tmp_path):
    """The issue's attack, scaled down: with a store file, a device that sends far more
    than the store holds loses its own oldest rows; another device's rows all stay."""
    import sqlite3

    from agent.server.hub import HubSettings
    from hubkit import handle_all

    path = str(tmp_path / "store.db")
    hub = Hub(path, HubSettings(max_rows=2000, max_rows_per_device=500,
                                samples_per_minute=10**6))
    quiet, flood = join(hub, "quiet"), join(hub, "flood")
    for i in range(50):
        hub.handle(quiet, telemetry(f"q-{i}", "quiet"), NOW)
    hub.commit()
    for b in range(10):  # 10,000 samples: 20 times this device's bound
        handle_all(hub, flood, batch(f"b{b}", "flood", [f"f-{b}-{i}" for i in range(1000)]))
        hub.commit()
    assert [r["id"] for r in hub.telemetry("quiet")] == [f"q-{i}" for i in range(50)]
    kept = [r["id"] for r in hub.telemetry("flood")]
    assert 500 <= len(kept) <= 600 and kept[-1] == "f-9-999"  # its newest, in order
    hub.close()
    on_disk = sqlite3.connect(path).execute(
        "SELECT device_id, COUNT(*) FROM telemetry GROUP BY device_id").fetchall()
    assert dict(on_disk) == {"quiet": 50, "flood": len(kept)}


def test_past_the_whole_store_s_bound_the_largest_devices_give_up_their_oldest_first():
    from agent.server.hub import HubSettings

    hub = Hub(settings=HubSettings(max_rows=1000, max_rows_per_device=600,
                                   rate_limit_per_minute=10**6, samples_per_minute=10**6))
    small, big, bigger = join(hub, "small"), join(hub, "big"), join(hub, "bigger")
    for i in range(100):
        hub.handle(small, telemetry(f"s-{i}", "small"), NOW)
    for name, client, n in (("big", big, 450), ("bigger", bigger, 600)):
        for i in range(n):
            hub.handle(client, telemetry(f"{name}-{i}", name), NOW)
    counts = {d: len(hub.telemetry(d)) for d in ("small", "big", "bigger")}
    assert counts["small"] == 100  # never touched
    assert sum(counts.values()) <= 1000 + 100  # the bound, and the slack between trims
    assert hub.telemetry("bigger")[-1]["id"] == "bigger-599"  # the oldest went
    assert counts["bigger"] < 600


def test_rate_budgets_and_command_waits_follow_the_monotonic_clock_not_the_wall_clock():
    """The wall clock steps back an hour (the issue: every client got RATE_LIMITED and
    1008 at once), or ahead an hour: neither changes a rate budget or a ttl_s wait."""
    from agent.server.hub import HubSettings
    from agent.server.tokens import Identity
    from hubkit import FakePeer

    hub = Hub(settings=HubSettings(rate_limit_per_minute=5))
    device, _ = hub.connect(Identity("d1", "device", NOW + 7200), FakePeer(), NOW, 1000.0)
    operator, _ = hub.connect(Identity("op", "operator", NOW + 7200), FakePeer(), NOW, 1000.0)
    for i in range(40):  # 4 a minute, under the limit of 5
        wall = NOW + 15 * i - (3600 if i >= 20 else 0)
        (_, text), = hub.handle(device, json.dumps({"type": "ping", "id": f"p{i}"}), wall,
                                mono=1000.0 + 15 * i)
        assert json.loads(text)["type"] == "pong", (i, text)
    assert device.peer.closed == []
    command = json.dumps({"type": "command", "id": "c1", "payload": {
        "device_id": "d9", "name": "reboot", "ttl_s": 30}})
    assert hub.handle(operator, command, NOW, mono=2000.0) == []
    assert hub.tick(NOW + 3600, mono=2001.0) == []  # an hour ahead on the wall: still waits
    (_, text), = hub.tick(NOW + 3600, mono=2031.0)
    assert json.loads(text)["error"]["code"] == "DEVICE_OFFLINE"


def test_two_operators_parking_commands_with_one_id_for_two_devices_both_arrive():
    """Command ids are the operators' own: two parked (ttl_s) commands with the same id for
    two offline devices are two commands. Keyed by the id alone, the second replaced the
    first, which was never delivered."""
    from hubkit import join

    hub = Hub()
    alice, bob = join(hub, "alice", "operator"), join(hub, "bob", "operator")
    for operator, device in ((alice, "d1"), (bob, "d2")):
        command = json.dumps({"type": "command", "id": "restart-1", "payload": {
            "device_id": device, "name": "restart-app", "ttl_s": 60}})
        assert hub.handle(operator, command, NOW) == []
    for device in ("d1", "d2"):
        client = join(hub, device)
        subscribe = json.dumps({"type": "subscribe", "id": f"s-{device}", "payload": {
            "channel": "commands"}})
        delivered = [json.loads(text) for _, text in hub.handle(client, subscribe, NOW)]
        commands = [m for m in delivered if m["type"] == "commands.update"]
        assert [c["payload"]["device_id"] for c in commands] == [device], delivered

"""telemetry.batch end to end: offered by nexus-server, used by nexus-agent for its backlog.

Real server processes (or the in-process fixture), real agents, real SQLite files.
"""

from __future__ import annotations

import time

from helpers import (
    SECRET,
    AgentProcess,
    Peer,
    ServerProcess,
    connected,
    free_port,
    mint,
    outbox_ids,
    stored,
    wait_for,
    write_config,
)

from agent import protocol as p
from agent.outbox import Outbox
from agent.codec import CODEC

TS = "2025-11-03T01:53:54.518Z"


def prefill(state_dir, n, device="device-001"):
    """n stored samples, as an agent offline for a while would have them."""
    box = Outbox(CODEC, str(state_dir), 10**9)
    box._db.execute("PRAGMA synchronous=OFF")  # test set-up only: 10,000 fsyncs take a while
    ids = [box.put("telemetry", {"device_id": device, "metrics": {"cpu_usage": i % 100,
                                                                  "memory_usage": 40.0}},
                   p.format_timestamp(1_750_000_000 + i)).id for i in range(n)]
    box.close()
    return ids


def batch_msg(batch_id, ids, device="device-001", bad=()):
    items = [{"id": i, "timestamp": TS, "metrics": {"cpu_usage": "x" if i in bad else 1.0}}
             for i in ids]
    return {"type": "telemetry.batch", "id": batch_id, "timestamp": TS,
            "payload": {"device_id": device, "items": items}}


# ---------------------------------------------------------------- the server side


def test_welcome_offers_batches_within_the_frame_limit(server):
    peer = Peer(server.url, mint("device-001"))
    offer = peer.recv()["payload"]["capabilities"]["telemetry.batch"]
    assert offer == {"max_items": p.MAX_BATCH_ITEMS, "max_bytes": p.MAX_BATCH_BYTES}
    assert offer["max_bytes"] < 1 << 20  # under the agent's 1 MiB per message


def test_batch_round_trip_and_a_regrouped_resend_is_stored_once(server):
    operator = connected(server.url, "ops", "operator")
    operator.request({"type": "subscribe", "id": "s", "payload": {"channel": "telemetry"}})
    device = connected(server.url)
    ack = device.request(batch_msg("b1", [f"e-{i}" for i in range(1, 6)]))
    assert ack["type"] == "ack" and ack["payload"] == {"items": 5, "stored": 5, "rejected": []}
    # after a reconnect the agent may group differently: 3..8 overlaps the first batch
    ack = device.request(batch_msg("b2", [f"e-{i}" for i in range(3, 9)]))
    assert ack["payload"]["stored"] == 3
    ids = [r["id"] for r in server.hub.telemetry("device-001")]
    assert ids == [f"e-{i}" for i in range(1, 9)]
    updates = [operator.recv_type("telemetry.update")["payload"] for _ in range(8)]
    assert [u["message_id"] for u in updates] == ids  # one broadcast per new item, as singles
    assert updates[0]["device_id"] == "device-001" and updates[0]["sample_time"] == TS


def test_a_bad_item_rejects_only_itself(server):
    device = connected(server.url)
    ack = device.request(batch_msg("b1", [f"e-{i}" for i in range(6)], bad={"e-3"}))
    assert ack["payload"]["stored"] == 5
    (rejected,) = ack["payload"]["rejected"]
    assert rejected["index"] == 3 and rejected["id"] == "e-3"
    assert rejected["field"] == "payload.items.3.metrics.cpu_usage"
    assert "e-3" not in [r["id"] for r in server.hub.telemetry()]


def test_a_batch_for_another_device_or_without_items_is_refused_whole(server):
    device = connected(server.url)
    error = device.request(batch_msg("b1", ["e-1"], device="device-999"))
    assert error["error"]["code"] == "FORBIDDEN"
    empty = batch_msg("b2", [])
    assert device.request(empty)["error"]["field"] == "payload.items"
    assert server.hub.telemetry() == []


def test_an_item_over_64_kib_rejects_itself_and_the_others_are_stored_and_broadcast(server):
    """An 80 KB item is refused (it could never be broadcast: other nodes and operators would
    choke on it); the items around it are stored and broadcast."""
    operator = connected(server.url, "ops", "operator")
    operator.request({"type": "subscribe", "id": "s", "payload": {"channel": "telemetry"}})
    device = connected(server.url)
    big = {f"k{i:03d}-" + "x" * 400: float(i) for i in range(200)}  # about 82 KB of metrics
    msg = batch_msg("b1", ["e-0", "e-1", "e-2"])
    msg["payload"]["items"][1]["metrics"] = big
    ack = device.request(msg)
    assert ack["type"] == "ack", ack
    assert ack["payload"]["stored"] == 2
    (rejected,) = ack["payload"]["rejected"]
    assert (rejected["index"], rejected["id"], rejected["field"]) == (1, "e-1", "payload.items.1")
    assert [r["id"] for r in server.hub.telemetry()] == ["e-0", "e-2"]
    assert [operator.recv_type("telemetry.update")["payload"]["message_id"]
            for _ in range(2)] == ["e-0", "e-2"]


def test_a_200000_character_id_is_echoed_cut_and_the_good_items_are_acked(server):
    """A refused item's id is echoed cut to 128 characters: the ack fits, so the good items
    stored before and after it are acked, not lost behind a whole-batch error."""
    device = connected(server.url)
    long_id = "L" * 200_000
    ack = device.request(batch_msg("b1", ["e-0", long_id, "e-2"]))
    assert ack["type"] == "ack", ack.get("error")
    assert ack["payload"]["stored"] == 2
    (rejected,) = ack["payload"]["rejected"]
    assert rejected["index"] == 1 and rejected["id"] == "L" * p.MAX_ID_CHARS
    assert [r["id"] for r in server.hub.telemetry()] == ["e-0", "e-2"]


def test_a_thousand_refused_items_still_get_an_ack_within_the_limit_naming_each(server):
    """Every entry of `rejected` in full (a 128-character id, a field path cut to 256
    characters) would take about 420 KB: the ack lists every index, in full while they
    fit, and stays within what a client must accept."""
    device = connected(server.url)
    ids = [f"{i:04d}" + "i" * 124 for i in range(1000)]
    msg = batch_msg("b1", ids)
    for item in msg["payload"]["items"]:
        item["metrics"] = {"m" * 300: "not a number"}
    device.send(msg)
    text = device.ws.recv()
    assert len(text.encode()) <= p.MAX_SERVER_MESSAGE_BYTES
    ack = __import__("json").loads(text)
    assert ack["type"] == "ack" and ack["payload"]["stored"] == 0, ack.get("error")
    rejected = ack["payload"]["rejected"]
    assert [r["index"] for r in rejected] == list(range(1000))
    assert rejected[0]["id"] == ids[0] and len(rejected[0]["field"]) == p.MAX_FIELD_CHARS
    assert "field" not in rejected[-1]  # past the room: the index alone


def test_a_batch_counts_once_against_the_rate_limit():
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=5, close_timeout_s=0.2),
                          SECRET.encode()).start()
    try:
        device = connected(srv.url)
        for n in range(5):
            ack = device.request(batch_msg(f"b{n}", [f"e-{n}-{i}" for i in range(200)]))
            assert ack["type"] == "ack"
        assert len(srv.hub.telemetry()) == 1000
        assert device.request(batch_msg("b9", ["x"]))["error"]["code"] == "RATE_LIMITED"
    finally:
        srv.stop()


def test_a_server_started_without_batches_offers_nothing(tmp_path):
    srv = ServerProcess(0, "--no-batches")
    try:
        peer = connected(srv.url)
        assert peer.request(batch_msg("b1", ["e-1"]))["error"]["code"] == "UNKNOWN_MESSAGE_TYPE"
    finally:
        srv.stop()


# ---------------------------------------------------------------- the agent side


def test_a_10000_sample_backlog_drains_in_batches_within_a_minute(tmp_path):
    """At the default pace (90 a minute) singles would take almost two hours."""
    db = tmp_path / "server.db"
    backlog = prefill(tmp_path / "state", 10_000)
    srv = ServerProcess(db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 1},
                                      server={"max_messages_per_minute": 90}))
    try:
        start = time.monotonic()
        wait_for(lambda: len(stored(db)) >= 10_000 and agent.status().get("queue_depth") == 0
                 or None, timeout=60, interval=0.5, what="the backlog at the server")
        took = time.monotonic() - start
        rows = stored(db)
        ids = [r["id"] for r in rows]
        assert set(backlog) <= set(ids) and len(ids) == len(set(ids))
        assert agent.status()["sent"] < 100  # batches, not 10,000 messages
        # live samples went out while the backlog drained: one arrived before its last item
        last_backlog = max(ids.index(i) for i in backlog)
        live = [i for i in ids if i not in set(backlog)]
        assert live and ids.index(live[0]) < last_backlog
        print(f"10,000 samples drained in {took:.1f} s")
    finally:
        agent.stop()
        srv.stop()


def test_server_that_stops_offering_batches_gets_singles_and_everything_once(tmp_path):
    db = tmp_path / "server.db"
    backlog = prefill(tmp_path / "state", 300)
    port = free_port()
    srv = ServerProcess(port, db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.1}))
    try:
        wait_for(lambda: set(backlog) <= {r["id"] for r in stored(db)}, what="the backlog")
        assert agent.status()["sent"] < 300 and "telemetry.batch offered" in agent.log()
        srv.kill()
        # the loss is a fact, in the file at once (with the queue's depth then); the depth
        # then grows at the counters' pace
        wait_for(lambda: agent.status().get("connected") is False, what="the loss")
        wait_for(lambda: agent.status().get("queue_depth", 0) >= 30, what="a new backlog")
        srv = ServerProcess(port, "--no-batches", db=str(db))  # same store, no offer
        offline = outbox_ids(agent.state_dir)
        wait_for(lambda: set(offline) <= {r["id"] for r in stored(db)}, timeout=30,
                 what="the new backlog, as singles")
        ids = [r["id"] for r in stored(db)]
        assert len(ids) == len(set(ids))
        connects = [line for line in agent.log().splitlines() if "connected as" in line]
        assert "batch" in connects[0] and "batch" not in connects[-1]
    finally:
        agent.stop()
        srv.stop()


def test_status_shows_the_drain(tmp_path):
    db = tmp_path / "server.db"
    prefill(tmp_path / "state", 3000)
    srv = ServerProcess(db=str(db))
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 1},
                                      server={"max_messages_per_minute": 30}))
    try:
        status = wait_for(lambda: (agent.status().get("drain_per_min") or 0) > 0 and
                          agent.status(), timeout=20, what="a drain rate")
        assert status["drain_per_min"] > 100  # items a minute, far above 30 messages
        from agent.status import render

        assert "messages a minute acked" in render(dict(status, state="healthy"), time.time())
    finally:
        agent.stop()
        srv.stop()


def test_check_config_warns_when_singles_cannot_keep_up(tmp_path):
    import subprocess
    import sys

    from helpers import REPO, child_env

    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws", telemetry={"interval_s": 1},
                          server={"max_messages_per_minute": 90})
    out = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config",
                          str(config)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert "warning" in out.stderr and "60 messages a minute" in out.stderr
    assert "48 hours" in out.stderr
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws", telemetry={"interval_s": 5},
                          server={"max_messages_per_minute": 90})
    out = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config",
                          str(config)], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "warning" not in out.stderr


# ---------------------------------------------------------------- application samples


def test_source_and_tags_are_validated_stored_and_broadcast_singly_and_in_batches(server):
    operator = connected(server.url, "ops", "operator")
    operator.request({"type": "subscribe", "id": "s", "payload": {"channel": "telemetry"}})
    device = connected(server.url)
    app = {"device_id": "device-001", "source": "line3", "metrics": {"count": 12},
           "tags": {"shift": "b"}}
    assert device.request({"type": "telemetry", "id": "a-1", "timestamp": TS,
                           "payload": app})["type"] == "ack"
    item = {"id": "a-2", "timestamp": TS, "source": "line3", "metrics": {"count": 13},
            "tags": {"shift": "c"}}
    bad = {"id": "a-3", "timestamp": TS, "source": "line3", "metrics": {"count": 14},
           "tags": {"shift": 3}}
    ack = device.request({"type": "telemetry.batch", "id": "b1", "timestamp": TS,
                          "payload": {"device_id": "device-001", "items": [item, bad]}})
    assert ack["payload"]["stored"] == 1
    assert ack["payload"]["rejected"][0]["field"] == "payload.items.1.tags.shift"
    updates = [operator.recv_type("telemetry.update")["payload"] for _ in range(2)]
    assert [(u["source"], u["tags"], u["metrics"], u["sample_time"]) for u in updates] == [
        ("line3", {"shift": "b"}, {"count": 12}, TS), ("line3", {"shift": "c"}, {"count": 13}, TS)]
    stored_payloads = [r["payload"] for r in server.hub.telemetry("device-001")]
    assert stored_payloads == [app, {"device_id": "device-001", "source": "line3",
                                     "metrics": {"count": 13}, "tags": {"shift": "c"}}]
    error = device.request({"type": "telemetry", "id": "a-4", "timestamp": TS,
                            "payload": dict(app, source="")})
    assert error["type"] == "error" and error["error"]["field"] == "payload.source"
    error = device.request({"type": "telemetry", "id": "a-5", "timestamp": TS,
                            "payload": dict(app, tags={f"k{i}": "v" for i in range(33)})})
    assert error["type"] == "error" and error["error"]["field"] == "payload.tags"


def test_a_stored_application_sample_becomes_a_batch_item_with_its_source_and_tags(tmp_path):
    from agent.sendplan import batch_item_text

    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        app = box.put("telemetry", {"device_id": "device-001", "source": "line3",
                                    "metrics": {"count": 12}, "tags": {"shift": "b"}}, TS)
        own = box.put("telemetry", {"device_id": "device-001", "metrics": {"cpu_usage": 1.0}},
                      TS)
        odd = box.put("telemetry", {"device_id": "device-001", "metrics": {"x": 1},
                                    "extra": 1}, TS)
        assert batch_item_text(app, "device-001") == (
            f'{{"id":"{app.id}","timestamp":"{TS}","source":"line3","metrics":{{"count":12}},'
            '"tags":{"shift":"b"}}')
        assert batch_item_text(own, "device-001") == (
            f'{{"id":"{own.id}","timestamp":"{TS}","metrics":{{"cpu_usage":1.0}}}}')
        assert batch_item_text(odd, "device-001") is None  # an unknown key: sent alone
    finally:
        box.close()

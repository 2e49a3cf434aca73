"""Two nexus-server nodes, Redis and nginx on loopback: one fleet across the nodes.

Skips (with the reason) where redis-server, nginx or redis-py is missing; .ci/run
installs the first two. Every process is this test's own (free ports, files in tmp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from clusterkit import (
    BALANCING_KEY,
    DEPLOY_CONF,
    NginxProcess,
    RedisProcess,
    holder,
    in_cluster,
    missing,
    node,
)
from helpers import (
    AgentProcess,
    Peer,
    connected,
    mint,
    outbox_ids,
    stored,
    wait_for,
    write_config,
)
from nodejs import INTEROP

pytestmark = pytest.mark.skipif(bool(missing()), reason=f"cluster tests need {missing()}")


def telemetry(msg_id: str, device: str, cpu: float = 12.5) -> dict:
    return {"type": "telemetry", "id": msg_id, "timestamp": "2025-11-03T01:53:54.518Z",
            "payload": {"device_id": device, "metrics": {"cpu_usage": cpu, "memory_usage": 40.1}}}


ECHO = {"allow": {"echo": {"argv": ["/bin/echo", "{text}"],
                           "args": {"text": {"pattern": "^[a-z]{1,16}$"}}}}}


def subscribe(peer, channel: str, **filters: str) -> None:
    reply = peer.request({"type": "subscribe", "id": f"s-{channel}",
                          "payload": {"channel": channel, "filters": filters}})
    assert reply["type"] == "subscribed", reply


def two_nodes(folder):
    """Redis, and nodes A and B in the cluster, each with its own --db (folder/A.db, B.db)."""
    redis = RedisProcess(folder / "redis")
    dbs = {name: folder / f"{name}.db" for name in "AB"}
    nodes = {name: node(redis.url, name, dbs[name]) for name in "AB"}
    for srv in nodes.values():
        in_cluster(srv)
    return redis, nodes, dbs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, nodes A and B (each its own --db), nginx over both; shared by this module."""
    folder = tmp_path_factory.mktemp("cluster")
    redis, nodes, _ = two_nodes(folder)
    nginx = NginxProcess(folder / "nginx", [srv.port for srv in nodes.values()])
    yield redis, nodes, nginx
    nginx.stop()
    for srv in nodes.values():
        srv.stop()
    redis.kill()


def device_through_nginx(nginx, redis, device_id: str):
    """A device connected through nginx and subscribed to commands; and the node it is on."""
    dev = connected(nginx.url, device_id)
    subscribe(dev, "commands")
    r = redis.client()
    name = wait_for(lambda: holder(r, device_id), 5, what="the registry to name the node")
    return dev, name


def test_operator_on_one_node_sees_telemetry_and_runs_command_on_device_behind_nginx(cluster):
    redis, nodes, nginx = cluster
    dev, there = device_through_nginx(nginx, redis, "dev-nginx-1")
    here = "A" if there == "B" else "B"
    op = connected(nodes[here].url, "alice", "operator")
    subscribe(op, "telemetry")
    assert dev.request(telemetry("t-1", "dev-nginx-1"))["type"] == "ack"
    update = op.recv_type("telemetry.update")
    assert (update["payload"]["device_id"], update["payload"]["message_id"]) == \
        ("dev-nginx-1", "t-1")
    op.send({"type": "command", "id": "cmd-x1", "payload": {
        "device_id": "dev-nginx-1", "name": "reboot", "args": {}}})
    delivered = dev.recv_type("commands.update")["payload"]
    assert delivered["command_id"] == "cmd-x1"
    result = {"command_id": "cmd-x1", "device_id": "dev-nginx-1", "status": "succeeded",
              "exit_code": 0, "stdout": "ok\n", "stderr": "", "duration_ms": 3}
    assert dev.request({"type": "command.result", "id": "r-1", "payload": result})["type"] == "ack"
    relayed = op.recv_type("command.result")
    assert relayed["id"] == "cmd-x1" and relayed["payload"]["stdout"] == "ok\n"


def test_resend_to_the_other_node_is_acked_and_not_stored_twice(cluster, tmp_path):
    redis, nodes, _ = cluster
    first, second = connected(nodes["A"].url, "dev-twice"), connected(nodes["B"].url, "dev-twice")
    op = connected(nodes["B"].url, "bob", "operator")
    subscribe(op, "telemetry", device_id="dev-twice")
    assert first.request(telemetry("twice-1", "dev-twice"))["type"] == "ack"
    assert op.recv_type("telemetry.update")["payload"]["message_id"] == "twice-1"
    batch = {"type": "telemetry.batch", "id": "b-1", "payload": {"device_id": "dev-twice",
             "items": [{"id": "twice-1", "timestamp": "2025-11-03T01:53:54.518Z",
                        "metrics": {"cpu_usage": 1.0}},
                       {"id": "twice-2", "timestamp": "2025-11-03T01:53:55.518Z",
                        "metrics": {"cpu_usage": 2.0}}]}}
    assert second.request(telemetry("twice-1", "dev-twice"))["type"] == "ack"  # acked, dropped
    ack = second.request(batch)
    assert ack["payload"]["stored"] == 1, ack  # only twice-2 is new
    assert op.recv_type("telemetry.update")["payload"]["message_id"] == "twice-2"
    union = [r["id"] for name in "AB"
             for r in stored(_db(nodes, name), "dev-twice")]
    assert sorted(union) == ["twice-1", "twice-2"]
    r = redis.client()
    assert r.get("nexus:seen:dev-twice:twice-1") == "stored:A"
    assert 0 < r.ttl("nexus:seen:dev-twice:twice-1") <= 600  # the dedupe window's retention


def test_two_devices_with_the_same_message_id_on_two_nodes_are_both_stored(cluster):
    """Ids are unique per device only: the cluster-wide dedupe is on (device_id, id)."""
    redis, nodes, _ = cluster
    on_a, on_b = connected(nodes["A"].url, "dev-pair-a"), connected(nodes["B"].url, "dev-pair-b")
    op = connected(nodes["B"].url, "erin", "operator")
    subscribe(op, "telemetry")
    assert on_a.request(telemetry("same-1", "dev-pair-a"))["type"] == "ack"
    assert on_b.request(telemetry("same-1", "dev-pair-b"))["type"] == "ack"
    seen = {(u["payload"]["device_id"], u["payload"]["message_id"])
            for u in (op.recv_type("telemetry.update") for _ in range(2))}
    assert seen == {("dev-pair-a", "same-1"), ("dev-pair-b", "same-1")}
    assert [r["id"] for r in stored(_db(nodes, "A"), "dev-pair-a")] == ["same-1"]
    assert [r["id"] for r in stored(_db(nodes, "B"), "dev-pair-b")] == ["same-1"]
    r = redis.client()
    assert wait_for(lambda: r.get("nexus:seen:dev-pair-b:same-1"), 5) == "stored:B"
    assert r.get("nexus:seen:dev-pair-a:same-1") == "stored:A"


def _db(nodes, name):
    args = nodes[name].proc.args
    return args[args.index("--db") + 1]


def test_a_cluster_node_keeps_64_kib_for_operators_and_the_batch_size_for_devices(cluster):
    """A cluster node reads through the library's queue (not DirectConnection): the limits
    by role hold there too."""
    _, nodes, _ = cluster
    items = [{"id": f"big-{i}", "timestamp": "2025-11-03T01:53:54.518Z",
              "metrics": {"cpu_usage": 1.0, "x" * 200: 2.0}} for i in range(400)]
    batch = {"type": "telemetry.batch", "id": "big", "payload": {"device_id": "dev-big",
                                                                 "items": items}}
    assert 64 * 1024 < len(json.dumps(batch)) < 768 * 1024
    operator = Peer(nodes["A"].url, mint("hank", "operator"))
    assert operator.recv()["type"] == "connected"
    operator.send(batch)
    assert operator.close_code() == 1009
    device = connected(nodes["A"].url, "dev-big")
    assert device.request(batch)["payload"]["stored"] == 400


def test_commands_reach_devices_anywhere_or_say_device_offline(cluster):
    redis, nodes, _ = cluster
    op = connected(nodes["A"].url, "carol", "operator")
    offline = op.request({"type": "command", "id": "cmd-off", "payload": {
        "device_id": "dev-nowhere", "name": "reboot", "args": {}}})
    assert offline["error"]["code"] == "DEVICE_OFFLINE"
    # ttl_s: waits in Redis and is delivered by the node the device reaches first (B)
    op.send({"type": "command", "id": "cmd-wait", "payload": {
        "device_id": "dev-late", "name": "reboot", "args": {}, "ttl_s": 30}})
    op.send({"type": "command", "id": "cmd-short", "payload": {
        "device_id": "dev-never", "name": "reboot", "args": {}, "ttl_s": 1}})
    time.sleep(0.3)
    late = connected(nodes["B"].url, "dev-late")
    subscribe(late, "commands")
    assert late.recv_type("commands.update")["payload"]["command_id"] == "cmd-wait"
    expired = op.recv_type("error")
    assert (expired["id"], expired["error"]["code"]) == ("cmd-short", "DEVICE_OFFLINE")
    # and a second device connection on A later gets nothing more: taken once
    again = connected(nodes["A"].url, "dev-late")
    subscribe(again, "commands")
    assert again.request({"type": "ping", "id": "p"})["type"] == "pong"


def test_two_operators_parking_one_command_id_for_two_devices_each_hear_back(cluster):
    """Command ids are the operators' own. The node tracked parked commands by id alone:
    the second replaced the first, whose operator never heard DEVICE_OFFLINE."""
    redis, nodes, _ = cluster
    operators = {name: connected(nodes["A"].url, name, "operator") for name in ("ivy", "jon")}
    for name, op in operators.items():
        op.send({"type": "command", "id": "same-id", "payload": {
            "device_id": f"dev-absent-{name}", "name": "reboot", "args": {}, "ttl_s": 1}})
    for name, op in operators.items():
        expired = op.recv_type("error")
        assert (expired["id"], expired["error"]["code"]) == ("same-id", "DEVICE_OFFLINE")
        assert f"dev-absent-{name}" in expired["error"]["message"]


def test_guide_client_as_operator_through_nginx_sees_both_nodes_devices(cluster, node_path):
    redis, nodes, nginx = cluster
    devices = {"A": connected(nodes["A"].url, "dev-on-a"), "B": connected(nodes["B"].url,
                                                                         "dev-on-b")}
    env = dict(os.environ, NODE_PATH=node_path)
    proc = subprocess.Popen(["node", str(INTEROP / "run-guide-operator.js"), nginx.url,
                             mint("guide-op", "operator"), "dev-on-a", "dev-on-b"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        seq = 0
        while proc.poll() is None and time.monotonic() < deadline:
            seq += 1
            for name, dev in devices.items():
                dev.request(telemetry(f"g-{name}-{seq}", f"dev-on-{name.lower()}"))
            time.sleep(0.2)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("EVENT ")]
    assert proc.returncode == 0, (events, err[-2000:])
    seen = {e["payload"]["device_id"] for e in events if e["event"] == "telemetry.update"}
    assert seen == {"dev-on-a", "dev-on-b"}


def test_deploy_config_balances_on_the_token_not_the_address():
    text = DEPLOY_CONF.read_text()
    assert BALANCING_KEY in text
    assert "ip_hash" not in text.split("#")[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_read_timeout 90s;" in text  # above the 30 s ping and 60 s silence


def test_node_sigkilled_its_agent_lands_on_the_other_and_every_id_is_stored_once(tmp_path):
    redis, nodes, dbs = two_nodes(tmp_path)
    nginx = NginxProcess(tmp_path / "nginx", [srv.port for srv in nodes.values()])
    agent = AgentProcess(write_config(tmp_path, nginx.url, telemetry={"interval_s": 0.05},
                                      commands=ECHO))  # an allow-list: it subscribes
    r = redis.client()
    first = wait_for(lambda: holder(r, "device-001"), 15, what="the agent to register")
    other = "A" if first == "B" else "B"
    wait_for(lambda: len(stored(dbs[first])) >= 20, 15, what="samples on the first node")
    nodes[first].kill()  # SIGKILL: acks in flight are lost, the agent resends them
    wait_for(lambda: len(stored(dbs[other])) >= 20, 20, what="samples on the other node")
    assert holder(r, "device-001") == other
    assert agent.stop() == 0
    leftover = set(outbox_ids(agent.state_dir))
    ids = [row["id"] for name in "AB" for row in stored(dbs[name])]
    assert len(ids) == len(set(ids)), "a sample was stored twice across the cluster"
    seqs = sorted(int(i.rsplit("-", 1)[1]) for i in set(ids) | leftover)
    assert seqs == list(range(1, len(seqs) + 1)), "a sample went missing"
    assert nodes[other].proc.poll() is None
    nginx.stop()
    nodes[other].stop()
    redis.kill()


def test_redis_restart_under_load_no_node_crashes_and_each_serves_its_own(tmp_path):
    redis, nodes, dbs = two_nodes(tmp_path)
    agents = {}
    for name in "AB":
        folder = tmp_path / f"agent-{name}"
        folder.mkdir()
        agents[name] = AgentProcess(write_config(folder, nodes[name].url, f"dev-{name}",
                                                 telemetry={"interval_s": 0.05}))
    wait_for(lambda: all(len(stored(dbs[n], f"dev-{n}")) >= 10 for n in "AB"), 15,
             what="both agents streaming")
    redis.kill()
    for srv in nodes.values():
        wait_for(lambda s=srv: "redis unreachable" in s.log(), 10, what="the outage logged")
    during = {n: len(stored(dbs[n], f"dev-{n}")) for n in "AB"}
    wait_for(lambda: all(len(stored(dbs[n], f"dev-{n}")) >= during[n] + 10 for n in "AB"),
             10, what="each node still storing its own clients' telemetry")
    redis.start()
    for srv in nodes.values():
        wait_for(lambda s=srv: "redis back" in s.log(), 15, what="the node to say redis is back")
    op = connected(nodes["A"].url, "dave", "operator")
    subscribe(op, "telemetry", device_id="dev-B")
    assert op.recv_type("telemetry.update")["payload"]["device_id"] == "dev-B"
    for name in "AB":
        assert nodes[name].proc.poll() is None, nodes[name].log()[-2000:]
        assert nodes[name].log().count("redis unreachable") == 1, nodes[name].log()[-3000:]
        assert agents[name].stop() == 0
        nodes[name].stop()
    redis.kill()


def healthz(port: int):
    """(status, body) of GET /healthz on a node."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_messages_on_redis_that_cannot_be_handled_are_skipped_and_the_node_keeps_serving(
        tmp_path):
    """Deep JSON, a broadcast too big to relay, not JSON, not an object: each is logged,
    counted and skipped; cross-node telemetry still reaches the node's operators."""
    redis, nodes, _ = two_nodes(tmp_path)
    op = connected(nodes["B"].url, "frank", "operator")
    subscribe(op, "telemetry")
    r = redis.client()
    big = {"device_id": "x", "metrics": {f"k{i}-" + "x" * 400: 1.0 for i in range(200)}}
    for bad in ("[" * 100_000 + "]" * 100_000, json.dumps(
            {"from": "A", "kind": "broadcast", "channel": "telemetry", "payload": big}),
            "not json", "[1, 2]", json.dumps({"from": "A", "kind": "result", "payload": 3})):
        assert r.publish("nexus:bc", bad) >= 1
    dev = connected(nodes["A"].url, "dev-after-bad")
    assert dev.request(telemetry("after-1", "dev-after-bad"))["type"] == "ack"
    assert op.recv_type("telemetry.update")["payload"]["message_id"] == "after-1"
    log = wait_for(lambda: nodes["B"].log() if nodes["B"].log().count(
        "skipped a cluster message") >= 4 else "", 5, what="the bad messages logged")
    assert "RecursionError" in log and "LocalProtocolError" in log, log[-3000:]
    assert "Task exception was never retrieved" not in log
    assert healthz(nodes["B"].port)[0] == 200
    for srv in nodes.values():
        srv.stop()
    redis.kill()


def test_healthz_says_when_a_node_is_cut_off_from_redis_and_it_comes_back_by_itself(tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    srv = node(redis.url, "H")
    in_cluster(srv)
    status, body = healthz(srv.port)
    assert (status, body) == (200, "ok: in the cluster as H\n")
    redis.kill()
    status, body = wait_for(lambda: (lambda a: a if a[0] == 503 else None)(healthz(srv.port)),
                            15, what="/healthz to say 503")
    assert "redis unreachable" in body
    dev = connected(srv.url, "dev-alone")  # still serving its own clients meanwhile
    assert dev.request(telemetry("alone-1", "dev-alone"))["type"] == "ack"
    redis.start()
    wait_for(lambda: healthz(srv.port)[0] == 200, 20, what="/healthz back to 200")
    assert "redis back" in srv.log()
    srv.stop()
    redis.kill()


def test_the_shipped_nginx_config_logs_no_token(tmp_path):
    """deploy/nginx/nexus.conf in front of a node that is down (nginx logs an error with
    the request line) and one that is up: no log file holds the ?token= the page sends."""
    from helpers import free_port

    live = node(RedisProcess(tmp_path / "redis").url, "L")
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    conf = DEPLOY_CONF.read_text()
    for line in conf.splitlines():  # TLS and the example nodes: this machine's instead
        if line.strip().startswith(("ssl_certificate", "server 10.0.0.")):
            conf = conf.replace(line + "\n", "")
    conf = conf.replace("listen 443 ssl;", f"listen 127.0.0.1:{port};").replace(
        "upstream nexus_nodes {", f"upstream nexus_nodes {{\n    server 127.0.0.1:{free_port()}"
        f" max_fails=1 fail_timeout=10s;\n    server 127.0.0.1:{live.port};").replace(
        "/var/log/nginx/", f"{folder}/")
    (folder / "nginx.conf").write_text(
        f"worker_processes 1;\nerror_log {folder}/main-error.log info;\npid {folder}/pid;\n"
        "events { worker_connections 64; }\nhttp {\n"
        + "".join(f"    {kind}_temp_path {folder}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + conf + "\n}\n")
    proc = subprocess.Popen(["nginx" if shutil.which("nginx") else "/usr/sbin/nginx", "-p",
                             str(folder), "-e", str(folder / "main-error.log"), "-c",
                             str(folder / "nginx.conf"), "-g", "daemon off; master_process off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        wait_for(lambda: _answers(port), 10, what="nginx listening")
        # Eight tokens: the balancing hash sends some to the dead node first (nginx logs
        # that refusal with the request line, then tries the live one).
        issued = [mint(f"dev-logged-{i}") for i in range(8)]
        for token in issued:
            peer = Peer(url, token, header=False)
            assert peer.recv()["type"] == "connected"
            peer.close()
        # Each connection's line, once it has ended (or, with a config that leaks it,
        # the token in nginx's own error log).
        wait_for(lambda: _read(folder / "nexus-access.log").count("/v1/ws") >= len(issued)
                 or "token=" in _read(folder / "main-error.log"), 10, what="the log lines")
    finally:
        proc.terminate()
        proc.wait(10)
        live.stop()
    logs = {f.name: f.read_text() for f in folder.glob("*.log")}
    for name, text in logs.items():
        assert "token=" not in text and not any(t in text for t in issued), (name, text[-2000:])
    assert "GET /v1/ws HTTP/1.1" in logs["nexus-access.log"], logs


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_cluster_reader_survives_a_failure_of_its_own_and_starts_again(tmp_path, caplog):
    """Not a bad message this time but a bug in the reader's own round (here: the registry
    refresh raising once): logged, the reader starts again, the node is back in the
    cluster and relays what other nodes publish."""
    import logging

    from helpers import SECRET

    from agent.server.app import CompanionServer, ServerSettings

    caplog.set_level(logging.INFO, logger="nexus.server.cluster")
    redis = RedisProcess(tmp_path / "redis")
    srv = CompanionServer(ServerSettings(port=0, redis_url=redis.url, node_id="S",
                                         close_timeout_s=0.2), SECRET.encode())
    listeners, calls = srv.hub.command_listeners, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the registry refresh")
        return listeners()

    srv.hub.command_listeners = failing_once  # type: ignore[method-assign]
    srv.start()
    try:
        wait_for(lambda: len(calls) >= 2 and srv.health()[0], 15,
                 what="the reader to start again and the node to be healthy")
        assert "the cluster reader failed" in caplog.text
        assert "a bug in the registry refresh" in caplog.text
        op = connected(srv.url, "gina", "operator")
        subscribe(op, "telemetry")
        update = {"device_id": "dev-far", "metrics": {"cpu_usage": 1.0},
                  "message_id": "far-1", "sample_time": "2025-11-03T01:53:54.518Z"}
        assert redis.client().publish("nexus:bc", json.dumps(
            {"from": "other", "kind": "broadcast", "channel": "telemetry",
             "payload": update})) == 1
        assert op.recv_type("telemetry.update")["payload"]["message_id"] == "far-1"
    finally:
        srv.stop()
        redis.kill()

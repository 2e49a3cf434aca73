"""The companion server over real loopback sockets: every error path, roles, store, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
from typing import List, Tuple

import pytest
import websocket
from helpers import REPO, SECRET, Peer, ServerProcess, child_env, connected, mint, wait_for

from agent import protocol as p


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_choice(request) -> str:
    """Every test here on both event loops (uvloop is optional: skipped without it)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


def telemetry(msg_id: str, device: str = "device-001", cpu: float = 12.5) -> dict:
    return {"type": "telemetry", "id": msg_id, "timestamp": "2025-11-03T01:53:54.518Z",
            "payload": {"device_id": device, "metrics": {"cpu_usage": cpu, "memory_usage": 40.1}}}


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("token", [None, "not-a-jwt", "__wrong_secret__", "__expired__",
                                   "__no_role__"])
def test_bad_token_gets_auth_failed_then_4000(server, token):
    import jwt

    if token == "__wrong_secret__":
        token = jwt.encode({"sub": "d", "role": "device", "exp": 2**40}, "x" * 32)
    elif token == "__expired__":
        token = mint("device-001", ttl=-10)
    elif token == "__no_role__":
        token = jwt.encode({"sub": "d", "exp": 2**40}, SECRET)
    peer = Peer(server.url, token)
    error = peer.recv()
    assert error["type"] == "error" and error["error"]["code"] == "AUTH_FAILED"
    assert peer.close_code() == 4000


def test_alg_none_token_is_refused(server):
    import jwt

    token = jwt.encode({"sub": "device-001", "role": "device", "exp": 2**40}, None,
                       algorithm="none")
    peer = Peer(server.url, token)
    assert peer.recv()["error"]["code"] == "AUTH_FAILED"
    assert peer.close_code() == 4000


@pytest.mark.parametrize("header", [True, False])
def test_welcome_over_header_or_query_auth(server, header):
    peer = Peer(server.url, mint("device-001"), header=header)
    msg = peer.recv()
    assert msg["type"] == "connected"
    assert msg["payload"]["client_id"].startswith("client-")
    p.parse_timestamp(msg["payload"]["server_time"])
    assert msg["timestamp"].endswith("Z") and len(msg["timestamp"]) == 24


def test_wrong_path_is_404(server):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        Peer(server.url.replace("/v1/ws", "/nope"), mint("device-001"))
    assert info.value.status_code == 404


# ---------------------------------------------------------------- messages


def test_ping_pong_keeps_id(server):
    peer = connected(server.url)
    pong = peer.request({"type": "ping", "id": "p1"})
    assert (pong["type"], pong["id"]) == ("pong", "p1")
    p.parse_timestamp(pong["timestamp"])


@pytest.mark.parametrize("frame, code, field", [
    ("{not json", "INVALID_MESSAGE", None),
    ("[1, 2]", "INVALID_MESSAGE", None),
    ({"id": "x1"}, "INVALID_MESSAGE", "type"),
    ({"type": "telemetry"}, "INVALID_MESSAGE", "id"),
    ({"type": "dance", "id": "x2"}, "UNKNOWN_MESSAGE_TYPE", "type"),
    ({"type": "telemetry", "id": "x3"}, "INVALID_MESSAGE", "payload"),
    ({"type": "telemetry", "id": "x4", "payload": {"device_id": "device-001"}},
     "INVALID_MESSAGE", "payload.metrics"),
    ({"type": "telemetry", "id": "x5", "payload": {"device_id": "device-001",
                                                   "metrics": {"cpu_usage": "high"}}},
     "INVALID_MESSAGE", "payload.metrics.cpu_usage"),
    ({"type": "telemetry", "id": "x6", "timestamp": "yesterday", "payload": {}},
     "INVALID_MESSAGE", "timestamp"),
    ({"type": "subscribe", "id": "x7", "payload": {"channel": "gossip"}},
     "INVALID_CHANNEL", "payload.channel"),
    ({"type": "subscribe", "id": "x8", "payload": {"channel": "telemetry", "filters": []}},
     "INVALID_MESSAGE", "payload.filters"),
    ({"type": "telemetry", "id": 7}, "INVALID_MESSAGE", "id"),
])
def test_client_errors_name_code_and_field(server, frame, code, field):
    peer = connected(server.url)
    peer.send(frame)
    error = peer.recv_type("error")
    assert error["error"]["code"] == code
    assert error["error"].get("field") == field
    # the connection survives every one of them
    assert peer.request({"type": "ping", "id": "alive"})["type"] == "pong"


def test_binary_frame_is_an_error_not_a_crash(server):
    peer = connected(server.url)
    peer.ws.send_binary(b"\x00\x01")
    assert peer.recv_type("error")["error"]["code"] == "INVALID_MESSAGE"


def test_telemetry_acked_stored_and_broadcast_once_per_id(server):
    device = connected(server.url)
    op = connected(server.url, "alice", "operator")
    assert op.request({"type": "subscribe", "id": "s1",
                       "payload": {"channel": "telemetry"}})["type"] == "subscribed"
    assert device.request(telemetry("t-1"))["type"] == "ack"
    assert device.request(telemetry("t-1"))["type"] == "ack"  # a resend: acked again
    assert device.request(telemetry("t-2", cpu=3.0))["type"] == "ack"
    first = op.recv_type("telemetry.update")
    second = op.recv_type("telemetry.update")
    assert first["payload"]["message_id"] == "t-1"
    assert first["payload"]["sample_time"] == "2025-11-03T01:53:54.518Z"
    assert second["payload"]["message_id"] == "t-2"  # no second copy of t-1 in between
    assert [r["id"] for r in server.hub.telemetry("device-001")] == ["t-1", "t-2"]


def test_device_cannot_send_for_another_device(server):
    device = connected(server.url)
    reply = device.request(telemetry("t-9", device="device-002"))
    assert reply["error"] == {"code": "FORBIDDEN", "field": "payload.device_id",
                              "message": reply["error"]["message"]}
    assert server.hub.telemetry() == []


def test_operator_cannot_send_telemetry_and_device_cannot_command(server):
    op = connected(server.url, "alice", "operator")
    assert op.request(telemetry("t-3"))["error"]["code"] == "FORBIDDEN"
    device = connected(server.url)
    cmd = {"type": "command", "id": "c1",
           "payload": {"device_id": "device-001", "name": "reboot"}}
    assert device.request(cmd)["error"]["code"] == "FORBIDDEN"


def test_device_subscription_is_narrowed_to_itself(server):
    device = connected(server.url)
    reply = device.request({"type": "subscribe", "id": "s2",
                            "payload": {"channel": "commands", "filters": {}}})
    assert reply["payload"] == {"channel": "commands", "filters": {"device_id": "device-001"}}
    other = device.request({"type": "subscribe", "id": "s3", "payload": {
        "channel": "telemetry", "filters": {"device_id": "device-002"}}})
    assert other["error"]["code"] == "FORBIDDEN"


def test_filters_select_broadcasts(server):
    op = connected(server.url, "alice", "operator")
    op.request({"type": "subscribe", "id": "s4",
                "payload": {"channel": "telemetry", "filters": {"device_id": "device-002"}}})
    connected(server.url, "device-001").request(telemetry("a-1"))
    connected(server.url, "device-002").request(telemetry("b-1", device="device-002"))
    update = op.recv_type("telemetry.update")
    assert update["payload"]["device_id"] == "device-002"
    assert op.request({"type": "unsubscribe", "id": "u1", "payload": {
        "channel": "telemetry"}})["payload"] == {"channel": "telemetry"}


def test_offline_device_command_is_device_offline(server):
    op = connected(server.url, "alice", "operator")
    reply = op.request({"type": "command", "id": "c2",
                        "payload": {"device_id": "device-404", "name": "reboot"}})
    assert reply["error"]["code"] == "DEVICE_OFFLINE"


def test_over_size_limit_closes_1009(server):
    peer = connected(server.url)
    peer.send("x" * (p.MAX_MESSAGE_BYTES + 1))
    assert peer.close_code() == 1009


def test_rate_limit_then_policy_close():
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=5, close_timeout_s=0.2),
                          SECRET.encode()).start()
    try:
        peer = connected(srv.url)
        replies = [peer.request({"type": "ping", "id": f"r{i}"}) for i in range(7)]
        assert [r["type"] for r in replies] == ["pong"] * 5 + ["error"] * 2
        assert replies[5]["error"]["code"] == "RATE_LIMITED"
        # a client that ignores RATE_LIMITED is closed at twice the limit
        for i in range(4):
            peer.send({"type": "ping", "id": f"z{i}"})
        assert peer.close_code() == 1008
        # and others are still served
        assert connected(srv.url, "device-002").request(
            {"type": "ping", "id": "ok"})["type"] == "pong"
    finally:
        srv.stop()


def test_silent_client_is_terminated_by_heartbeat(server):
    """A client that never answers pings (raw socket, never reads) is dropped."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall((f"GET /v1/ws?token={mint('device-001')} HTTP/1.1\r\nHost: x\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert b"101" in sock.recv(200)
    wait_for(lambda: server.hub.peers(), what="registration")
    wait_for(lambda: not server.hub.peers(), timeout=10, what="heartbeat to drop the client")
    sock.close()


# ---------------------------------------------------------------- process level


def test_sigterm_closes_clients_with_1000_and_exits_0(tmp_path):
    db = tmp_path / "store.db"
    srv = ServerProcess(db=str(db))
    peer = connected(srv.url)
    assert peer.request(telemetry("k-1"))["type"] == "ack"
    srv.proc.send_signal(signal.SIGTERM)
    assert peer.close_code() == 1000
    assert srv.stop() == 0
    rows = sqlite3.connect(db).execute("SELECT id, device_id FROM telemetry").fetchall()
    assert rows == [("k-1", "device-001")]


def test_missing_secret_is_a_clear_error():
    env = child_env()
    del env["NEXUS_JWT_SECRET"]
    out = subprocess.run([sys.executable, "-m", "agent.server", "--port", "0"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "NEXUS_JWT_SECRET" in out.stderr


def test_token_command_mints_a_verifiable_token():
    from agent.server import tokens

    out = subprocess.run([sys.executable, "-m", "agent.server", "token", "--operator", "alice",
                          "--ttl", "60"], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True)
    identity = tokens.verify(out.stdout.strip(), SECRET.encode())
    assert (identity.subject, identity.role) == ("alice", "operator")


def test_command_waits_for_its_device_within_ttl_then_result_is_relayed(server):
    op = connected(server.url, "alice", "operator")
    op.send({"type": "command", "id": "cmd-wait", "payload": {
        "device_id": "device-009", "name": "reboot", "args": {}, "ttl_s": 30}})
    device = connected(server.url, "device-009")
    device.request({"type": "subscribe", "id": "s", "payload": {"channel": "commands"}})
    delivery = device.recv_type("commands.update")
    assert delivery["payload"] == {"command_id": "cmd-wait", "device_id": "device-009",
                                   "name": "reboot", "args": {}}
    result = {"command_id": "cmd-wait", "device_id": "device-009", "status": "succeeded",
              "exit_code": 0, "stdout": "ok\n", "stderr": "", "duration_ms": 5}
    ack = device.request({"type": "command.result", "id": "r-1", "payload": result})
    assert ack["type"] == "ack"
    relayed = op.recv_type("command.result")
    assert relayed["id"] == "cmd-wait" and relayed["payload"] == result


def test_a_device_cannot_answer_a_command_sent_to_another(server):
    """cmd-42 goes to device B; device A's forged result (with A's own device_id) is
    FORBIDDEN, never reaches the operator, and B's real result is relayed."""
    op = connected(server.url, "alice", "operator")
    forger, target = connected(server.url, "device-a"), connected(server.url, "device-b")
    for device in (forger, target):
        device.request({"type": "subscribe", "id": "s", "payload": {"channel": "commands"}})
    op.send({"type": "command", "id": "cmd-42", "payload": {
        "device_id": "device-b", "name": "reboot", "args": {}}})
    assert target.recv_type("commands.update")["payload"]["command_id"] == "cmd-42"

    def result(device: str, status: str) -> dict:
        return {"command_id": "cmd-42", "device_id": device, "status": status,
                "exit_code": 0, "stdout": device, "stderr": "", "duration_ms": 1}

    forged = forger.request({"type": "command.result", "id": "f-1",
                             "payload": result("device-a", "succeeded")})
    assert forged["error"] == {"code": "FORBIDDEN", "field": "payload.command_id",
                               "message": "command cmd-42 was not sent to this device"}
    real = target.request({"type": "command.result", "id": "r-1",
                           "payload": result("device-b", "failed")})
    assert real["type"] == "ack"
    relayed = op.recv_type("command.result")  # the first and only one: B's
    assert relayed["id"] == "cmd-42" and relayed["payload"]["stdout"] == "device-b"
    assert relayed["payload"]["status"] == "failed"
    assert op.request({"type": "ping", "id": "p"})["type"] == "pong"  # nothing else came


def test_command_ttl_expiry_is_device_offline(server):
    op = connected(server.url, "alice", "operator")
    op.send({"type": "command", "id": "cmd-exp", "payload": {
        "device_id": "device-010", "name": "reboot", "ttl_s": 0.5}})
    error = op.recv_type("error")
    assert error["id"] == "cmd-exp" and error["error"]["code"] == "DEVICE_OFFLINE"
    assert "ttl_s" in error["error"]["message"]


def test_stop_with_many_unresponsive_clients_costs_one_close_timeout():
    """Clients that never answer the close: closed in parallel, not one timeout each."""
    import time

    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, close_timeout_s=0.5), SECRET.encode()).start()
    peers = [connected(srv.url, f"device-{i}") for i in range(20)]
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 5.0  # serially it would be 20 x 0.5 s = 10 s
    assert all(peer.close_code() == 1000 for peer in peers)


# ---------------------------------------------------------------- event loop


def test_server_runs_on_the_loop_asked_for(server, loop_choice):
    assert server.loop_name.split()[0] == loop_choice
    assert type(server._loop).__module__.split(".")[0] == loop_choice


def test_without_uvloop_auto_falls_back_to_asyncio_and_says_so(monkeypatch, caplog):
    import asyncio
    import logging

    from agent.server.app import new_loop

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    caplog.set_level(logging.INFO, logger="nexus.server")
    loop, name = new_loop("auto")
    try:
        assert name == "asyncio" and type(loop) is type(asyncio.new_event_loop())
    finally:
        loop.close()
    assert any("uvloop is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ImportError):
        new_loop("uvloop")


def test_command_line_names_its_loop_and_refuses_a_missing_uvloop():
    srv = ServerProcess(0, "--loop", "asyncio")
    try:
        assert srv.proc.stdout is not None
        assert srv.proc.stdout.readline().startswith("page: ")
        assert srv.proc.stdout.readline().strip() == "event loop: asyncio"
    finally:
        assert srv.stop() == 0
    blocked = ("import sys; sys.modules['uvloop'] = None; from agent.server.__main__ import main;"
               " sys.exit(main(['--port', '0', '--loop', 'uvloop']))")
    out = subprocess.run([sys.executable, "-c", blocked], env=child_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "uvloop is missing" in out.stderr and "'server' extra" in out.stderr


# ---------------------------------------------------------------- how messages are read


def _client_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    mask = b"\x11\x22\x33\x44"
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | size]) if size < 126 else bytes([0xFE]) + size.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ping(msg_id: str) -> bytes:
    return json.dumps({"type": "ping", "id": msg_id}).encode()


class _RawClient:
    """A client on a bare socket: sends bytes exactly as given, reads the server's frames."""

    def __init__(self, port: int, *then: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = (f"GET /v1/ws?token={mint('device-001')} HTTP/1.1\r\nHost: x\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.sock.sendall(request + b"".join(then))  # frames in the same write as the upgrade
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")

    def _more(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        return data

    def frame(self) -> Tuple[int, bytes]:
        while True:
            size, at = (self.buf[1] & 0x7F, 2) if len(self.buf) >= 2 else (0, 99)
            if size == 126:  # the server sends nothing over 65,535 bytes here
                size, at = (int.from_bytes(self.buf[2:4], "big"), 4) if len(self.buf) >= 4 \
                    else (0, 99)
            if len(self.buf) >= at + size:
                opcode, data = self.buf[0] & 0x0F, self.buf[at:at + size]
                self.buf = self.buf[at + size:]
                return opcode, data
            self.buf += self._more()

    def messages(self, count: int) -> List[dict]:
        out = []
        while len(out) < count:
            opcode, data = self.frame()
            assert opcode == 1, (opcode, data)
            out.append(json.loads(data))
        return out

    def close(self) -> None:
        self.sock.close()


def test_frames_sent_with_the_upgrade_are_all_answered_in_order(server):
    """A client that does not wait for the welcome: what arrives while it is being
    authenticated is kept (and reading paused past a few frames), then answered in order."""
    client = _RawClient(server.port, *(_client_frame(_ping(f"p{i}")) for i in range(40)))
    try:
        replies = client.messages(41)
        assert replies[0]["type"] == "connected"
        assert [(r["type"], r["id"]) for r in replies[1:]] == [("pong", f"p{i}")
                                                               for i in range(40)]
    finally:
        client.close()


def test_a_fragmented_message_is_answered_in_order_with_whole_ones(server):
    whole_b = _ping("b")
    client = _RawClient(server.port, _client_frame(_ping("a")),
                        _client_frame(whole_b[:10], fin=False),
                        _client_frame(whole_b[10:], opcode=0),
                        _client_frame(_ping("c")))
    try:
        replies = client.messages(4)
        assert [r.get("id") for r in replies[1:]] == ["a", "b", "c"]
        client.sock.sendall(_client_frame(_ping("d")))  # and on from there
        assert client.messages(1)[0]["id"] == "d"
        # That connection now reads through the library's queue; the others do not.
        plain = connected(server.url, "device-002")
        assert plain.request({"type": "ping", "id": "e"})["type"] == "pong"
        direct = {c.request.path.startswith("/v1/ws?"): c.direct
                  for c in server._server.connections}
        assert direct == {True: False, False: True}
    finally:
        client.close()


def test_text_that_is_not_utf8_closes_1007_after_what_came_before(server):
    client = _RawClient(server.port, _client_frame(_ping("a")), _client_frame(b'"\xff\xfe"'))
    try:
        assert [r["type"] for r in client.messages(2)] == ["connected", "pong"]
        opcode, data = client.frame()
        assert opcode == 8 and int.from_bytes(data[:2], "big") == 1007
    finally:
        client.close()


def test_a_binary_frame_is_answered_in_line(server):
    client = _RawClient(server.port, _client_frame(b"\x00\x01", opcode=2),
                        _client_frame(_ping("after")))
    try:
        replies = client.messages(3)
        assert replies[1]["error"]["code"] == "INVALID_MESSAGE" and replies[2]["id"] == "after"
    finally:
        client.close()


def test_with_db_an_ack_means_the_row_is_committed(tmp_path):
    """Group commit: whatever a loop step read shares one commit, and its acks go out
    after it. Many devices at once, each checking its row from another connection."""
    from agent.server.app import CompanionServer, ServerSettings

    db = str(tmp_path / "store.db")
    srv = CompanionServer(ServerSettings(port=0, db=db, rate_limit_per_minute=10**6),
                          SECRET.encode()).start()
    try:
        devices = [connected(srv.url, f"device-{i}") for i in range(20)]
        reader = sqlite3.connect(db)
        for round_ in range(5):
            for i, device in enumerate(devices):  # all in flight together
                device.send(telemetry(f"r{round_}-{i}", f"device-{i}"))
            for i, device in enumerate(devices):
                assert device.recv_type("ack")["id"] == f"r{round_}-{i}"
                assert reader.execute("SELECT 1 FROM telemetry WHERE id = ?",
                                      (f"r{round_}-{i}",)).fetchone() == (1,)
    finally:
        srv.stop()

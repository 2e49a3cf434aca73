"""Tokens that renew themselves, the agent's side (issue 27): a server that offers
``token.renew`` in its welcome sends ``token.renewed``; the agent keeps the fresh token in
its token file (atomically, 0600) and uses it from the next connection on.

Real parts: the agent as a subprocess, a WebSocket server in this process whose
behaviour the test writes (``FakeServer``), real files; the full disk is a private tmpfs
(``unshare -m``, root only; skipped with the reason elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
from faultproxy import FaultProxy
from helpers import (
    REPO,
    SECRET,
    AgentProcess,
    FakeServer,
    Peer,
    ServerProcess,
    child_env,
    free_port,
    mint,
    stored,
    wait_for,
    write_config,
)

from agent import auth
from agent import protocol as p


def renewing_server(tokens_seen, fresh, offer=True):
    """Offers token.renew; on the first connection sends ``fresh`` and closes."""
    def handler(conn):
        tokens_seen.append(conn.request.headers.get("Authorization", "").removeprefix(
            "Bearer "))
        now = p.format_timestamp(time.time())
        welcome = p.welcome_payload("fake", time.time(), None, 0.8 if offer else None)
        conn.send(json.dumps({"type": "connected", "id": "w", "timestamp": now,
                              "payload": welcome}))
        if len(tokens_seen) == 1:
            conn.send(json.dumps({"type": p.TOKEN_RENEWED, "id": "r1", "timestamp": now,
                                  "payload": {"token": fresh}}))
            conn.close(1001, "going away")
            return
        for text in conn:  # later connections: ack what comes
            msg = json.loads(text)
            conn.send(json.dumps({"type": "ack" if msg["type"] != "ping" else "pong",
                                  "id": msg["id"], "timestamp": now}))
    return handler


def test_a_renewed_token_is_kept_and_used_from_the_next_connection(tmp_path):
    seen = []
    fresh = mint("device-001", ttl=7200)
    fake = FakeServer(renewing_server(seen, fresh))
    old = mint("device-001", ttl=600)
    config = write_config(tmp_path, fake.url, token=old)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: len(seen) >= 2, timeout=15, what="a second connection")
    finally:
        assert agent.stop() == 0
        fake.close()
    assert seen[:2] == [old, fresh]
    kept = tmp_path / "state" / auth.RENEWED_TOKEN
    assert kept.read_text().strip() == fresh
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert (tmp_path / "token").read_text().strip() == old  # provisioned: never written
    assert not [f for f in os.listdir(kept.parent) if ".new-" in f]
    assert fresh not in agent.log() and "renewed the token" in agent.log()


@pytest.mark.parametrize("why", ["not offered", "another device", "expired"])
def test_a_renewal_not_offered_or_not_for_this_device_is_ignored(tmp_path, why):
    seen = []
    fresh = {"not offered": mint("device-001"), "another device": mint("device-002"),
             "expired": mint("device-001", ttl=-10)}[why]
    fake = FakeServer(renewing_server(seen, fresh, offer=why != "not offered"))
    old = mint("device-001", ttl=600)
    config = write_config(tmp_path, fake.url, token=old)
    agent = AgentProcess(config)
    try:
        wait_for(lambda: len(seen) >= 2, timeout=15, what="a second connection")
    finally:
        agent.stop()
        fake.close()
    assert seen[:2] == [old, old]
    assert not (tmp_path / "state" / auth.RENEWED_TOKEN).exists()


def test_a_failed_write_keeps_the_old_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("old\n")
    path.chmod(0o600)
    (tmp_path / f".token.new-{os.getpid()}").mkdir()  # the new file cannot be made there
    with pytest.raises(OSError):
        auth.store_token(str(path), "new")
    assert path.read_text() == "old\n"


def test_a_full_disk_keeps_the_old_token(tmp_path):
    """The token's directory on a full tmpfs: the write fails, the old file stays whole."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private tmpfs")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not allowed here")
    script = (
        "import os, sys\n"
        "from agent import auth\n"
        "d = sys.argv[1]\n"
        "open(os.path.join(d, 'token'), 'w').write('old-token\\n')\n"
        "os.chmod(os.path.join(d, 'token'), 0o600)\n"
        "with open(os.path.join(d, 'fill'), 'wb', buffering=0) as f:\n"
        "    try:\n"
        "        while True: f.write(b'x' * 4096)\n"
        "    except OSError: pass\n"
        "try:\n"
        "    auth.store_token(os.path.join(d, 'token'), 'n' * 6000)\n"
        "    print('stored')\n"
        "except OSError as exc:\n"
        "    print('failed', exc.errno)\n"
        "print(open(os.path.join(d, 'token')).read().strip())\n"
        "print(sorted(os.listdir(d)))\n")
    folder = tmp_path / "small"
    folder.mkdir()
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs "{folder}" && '
         f'exec "{sys.executable}" -c "$0" "{folder}"', script],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("failed") and lines[1] == "old-token"
    assert lines[2] == "['fill', 'token']"  # no half-written file left behind


def test_status_warns_well_before_the_token_expires():
    from agent.status import render

    now = 1_800_000_000.0
    base = {"state": "running", "device_id": "d", "server": "ws://x", "queue_depth": 0,
            "queue_bytes": 0, "dropped": 0, "reconnects": 0}
    lines = {exp: [line for line in render({**base, "token_expires": exp}, now).splitlines()
                   if line.startswith("token expires")][0]
             for exp in (now + 30 * 86400, now + 2 * 86400, now - 1)}
    assert "WARNING" not in lines[now + 30 * 86400]
    assert "WARNING: expires in 2.0 days" in lines[now + 2 * 86400]
    assert "EXPIRED" in lines[now - 1]


# ------------------------------------------------------------ nexus-server's side


def test_nexus_server_renews_a_device_token_and_the_agent_lives_past_the_old_one(tmp_path):
    """An 8 s token, renewed at half its life: the token file gets a fresh token with the
    same lifetime; the old one expires under the connection (4000) and the agent goes on
    with the new one, never refused."""
    db = tmp_path / "server.db"
    server = ServerProcess(0, "-v", "--renew-at", "0.5", db=str(db))
    old = mint("device-001", ttl=8)
    agent = AgentProcess(write_config(tmp_path, server.url, token=old))
    try:
        wait_for(lambda: renewed(tmp_path), timeout=15, what="the renewed token kept")
        fresh = jwt_claims(renewed(tmp_path))
        first = jwt_claims(old)
        assert (fresh["sub"], fresh["role"]) == ("device-001", "device")
        assert fresh["exp"] - fresh["iat"] == 8  # the same lifetime
        assert fresh["iat"] >= first["iat"] + 3  # at about half of the old one's life
        wait_for(lambda: "its token expired" in server.log(), timeout=15,
                 what="the old token's expiry under the connection")
        count = len(stored(db))
        wait_for(lambda: len(stored(db)) >= count + 3, timeout=15,
                 what="telemetry after the old token expired")
    finally:
        assert agent.stop() == 0
        server.stop()
    assert "token renewed" in server.log() and "auth failed" not in server.log()


def renewed(folder):
    path = folder / "state" / auth.RENEWED_TOKEN
    return path.read_text().strip() if path.exists() else ""


def jwt_claims(token):
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def test_a_renewal_lost_with_its_server_costs_nothing(tmp_path):
    """The connection dies in the middle of the token.renewed frame, and the server with
    it (SIGKILL): the agent keeps its old token, which still works with the next server,
    and that server renews it."""
    port = free_port()
    db = tmp_path / "server.db"
    server = ServerProcess(port, "-v", "--renew-at", "0.5", "--ping-interval", "60",
                           db=str(db))
    proxy = FaultProxy(port)
    proxy.cut_marker = p.TOKEN_RENEWED.encode()
    proxy.mode = "cut_on"
    old = mint("device-001", ttl=8)
    agent = AgentProcess(write_config(tmp_path, proxy.url, token=old,
                                      server={"ping_interval_s": 30},
                                      telemetry={"interval_s": 1}))
    second = None
    try:
        wait_for(lambda: proxy.cuts == 1, timeout=15, what="the renewal cut mid-frame")
        server.kill()
        assert renewed(tmp_path) == ""  # half a frame: nothing kept
        second = ServerProcess(port, "-v", "--renew-at", "0.5", db=str(db))
        wait_for(lambda: renewed(tmp_path), timeout=15, what="a renewal from the next server")
        assert "auth failed" not in second.log()  # the old token was taken
        assert jwt_claims(renewed(tmp_path))["exp"] > jwt_claims(old)["exp"]
    finally:
        assert agent.stop() == 0
        proxy.close()
        if second is not None:
            second.stop()
    assert agent.log().count("renewed the token") == 1


def test_renewal_is_offered_only_by_a_node_that_can_mint(tmp_path):
    """A --signing-key node renews with its own algorithm (EdDSA) at once when a token is
    past its share; a --public-key node holds nothing that mints and offers nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    from pki import make_keypair

    from agent.server import tokens

    private, public = make_keypair(tmp_path, "signing")
    keys = tokens.load_private_key(str(private))
    # Issued 90 s ago for 100 s: past 0.8 of its life when it connects.
    token = keys.mint("device-001", "device", 100, now=time.time() - 90)
    for flag, path, renews in (("--signing-key", private, True),
                               ("--public-key", public, False)):
        server = ServerProcess(0, flag, str(path))
        try:
            peer = Peer(server.url, token)
            welcome = peer.recv_type("connected")
            offered = welcome["payload"].get("capabilities", {}).get(p.TOKEN_RENEW)
            if renews:
                assert offered == {"at": 0.8}
                fresh = peer.recv_type(p.TOKEN_RENEWED)["payload"]["token"]
                identity = tokens.load_public_key(str(public)).verify(fresh)
                assert identity.expires - identity.issued == 100
                assert identity.expires > time.time() + 90
            else:
                assert offered is None
            peer.close()
        finally:
            server.stop()


def test_the_fresher_of_the_provisioned_and_the_renewed_token_is_presented(tmp_path):
    """The renewal is used while it is a usable token for this device issued later than the
    provisioned one; a token that provisioning writes later wins again; and --check-config
    accepts a device whose provisioned token expired long ago but whose renewal is good."""
    from agent.server import tokens

    def token(subject="device-001", at=0.0, ttl=600):
        return tokens.mint(SECRET.encode(), subject, "device", ttl, now=time.time() + at)

    token_file, state = tmp_path / "token", tmp_path / "state"
    state.mkdir()
    provisioned = token(at=-100)
    token_file.write_text(provisioned + "\n")
    token_file.chmod(0o600)

    def current():
        return auth.current_token(str(token_file), None, str(state), "device-001", time.time())

    assert current() == provisioned  # no renewal yet
    for bad in (token(at=-50, ttl=10), token("device-002", at=-50), "not a jwt"):
        auth.store_token(str(state / auth.RENEWED_TOKEN), bad)
        assert current() == provisioned
    fresh = token(at=-50)
    auth.store_token(str(state / auth.RENEWED_TOKEN), fresh)
    assert current() == fresh
    rotated = token(at=-10)  # provisioning writes a newer token: it wins
    token_file.write_text(rotated + "\n")
    assert current() == rotated

    expired = token(at=-7200, ttl=600)
    token_file.write_text(expired + "\n")
    config = write_config(tmp_path, "ws://127.0.0.1:9/v1/ws", token=expired)
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(config),
                          "--check-config"], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr  # the renewal in state/ stands in
    (state / auth.RENEWED_TOKEN).unlink()
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(config),
                          "--check-config"], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 78 and "expired" in out.stderr


@pytest.mark.parametrize("why", ["another key", "issued in the future"])
def test_a_renewal_the_server_refuses_gives_way_to_the_provisioned_token(tmp_path, why):
    """A renewal kept from a server that signs with another key (a staging or lying server,
    or a key changed since: its renewals may be newer than the token provisioned for the
    new key) or one issued in the future: the real server refuses it, and the agent must
    fall back to its provisioned token, which works, not present the refused one forever."""
    from agent.server import tokens

    now = time.time()
    provisioned = tokens.mint(SECRET.encode(), "device-001", "device", 3600, now - 60)
    renewal = {
        "another key": tokens.mint(b"another-secret-0123456789abcdef-012345", "device-001",
                                   "device", 3600, now),
        "issued in the future": tokens.mint(SECRET.encode(), "device-001", "device", 3600,
                                            now + 86400),
    }[why]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    auth.store_token(str(state / auth.RENEWED_TOKEN), renewal)
    db = tmp_path / "server.db"
    server = ServerProcess(0, "-v", db=str(db))
    agent = AgentProcess(write_config(tmp_path, server.url, token=provisioned))
    try:
        wait_for(lambda: stored(db), timeout=15, what="telemetry under the provisioned token")
    finally:
        agent.stop()
        server.stop()
    assert "auth failed" in server.log()  # the renewal was tried, and refused


def test_a_refused_renewal_is_kept_when_the_provisioned_token_has_expired(tmp_path):
    """Nothing better to fall back to: the renewal stays (a refusal may pass, e.g. a node
    whose clock is behind the one that minted it)."""
    from agent.server import tokens

    now = time.time()
    provisioned = tokens.mint(SECRET.encode(), "device-001", "device", 60, now - 3600)
    renewal = tokens.mint(SECRET.encode(), "device-001", "device", 3600, now + 86400)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    auth.store_token(str(state / auth.RENEWED_TOKEN), renewal)
    server = ServerProcess(0, "-v")
    agent = AgentProcess(write_config(tmp_path, server.url, token=provisioned))
    try:
        wait_for(lambda: server.log().count("auth failed") >= 3, timeout=15,
                 what="the renewal refused a few times")
    finally:
        agent.stop()
        server.stop()
    assert renewed(tmp_path) == renewal


def test_a_lying_server_flooding_renewals_gets_one_kept_per_connection(tmp_path):
    """The server sends one token.renewed per connection (docs/protocol.md section 9); a
    server that sends hundreds would make the agent write and fsync its token file (and
    its directory) for each: flash wear a hostile server asks for. One is kept; the
    rest of that connection's are ignored."""
    count = 300
    fresh = [mint("device-001", ttl=7200 + i) for i in range(count)]

    def handler(conn):
        now = p.format_timestamp(time.time())
        welcome = p.welcome_payload("fake", time.time(), None, 0.8)
        conn.send(json.dumps({"type": "connected", "id": "w", "timestamp": now,
                              "payload": welcome}))
        if fake.connections > 1:
            for text in conn:  # later connections: ack what comes
                msg = json.loads(text)
                conn.send(json.dumps({"type": "ack" if msg["type"] != "ping" else "pong",
                                      "id": msg["id"], "timestamp": now}))
            return
        for i, token in enumerate(fresh):
            conn.send(json.dumps({"type": p.TOKEN_RENEWED, "id": f"r{i}", "timestamp": now,
                                  "payload": {"token": token}}))
        conn.close(1001, "going away")  # read after every renewal: frames keep their order

    fake = FakeServer(handler)
    agent = AgentProcess(write_config(tmp_path, fake.url, token=mint("device-001", ttl=600)))
    try:
        wait_for(lambda: fake.connections >= 2, timeout=20, what="a second connection")
    finally:
        agent.stop()
        fake.close()
    assert agent.log().count("the server renewed the token") == 1
    assert renewed(tmp_path) == fresh[0]

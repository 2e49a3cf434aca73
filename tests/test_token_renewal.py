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
from helpers import REPO, AgentProcess, FakeServer, mint, wait_for, write_config

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
    token_file = tmp_path / "token"
    assert token_file.read_text().strip() == fresh
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".token.new")]
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
    assert (tmp_path / "token").read_text().strip() == old


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

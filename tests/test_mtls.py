"""Client certificates (mTLS), the agent's side (issue 27): the agent presents
``server.client_cert``/``client_key`` (optionally an encrypted key with a passphrase
file) and, with no token file, no token at all. A TLS WebSocket server in this process
requires a client certificate from the test CA and records what it was shown.
Real keys and certificates (tests/pki.py, the openssl command), real TLS on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
import time

import pytest
import yaml
from helpers import REPO, AgentProcess, child_env, wait_for, write_config
from pki import make_cert, shared_pki

from agent import protocol as p

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    out = shared_pki(folder, other=("device-002", None),
                     uri=("a readable name", "URI:urn:nexus:device:device-001"))
    out["locked"] = make_cert(folder, out["ca"], "locked", "device-001",
                              passphrase="s3cret pass")
    out["expired"] = make_cert(folder, out["ca"], "expired", "device-001", expired=True)
    return out


class TlsServer:
    """Requires a client certificate of ``ca``; records (CN, Authorization) per connection,
    welcomes and acks everything."""

    def __init__(self, pki):
        from websockets.sync.server import serve

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*pki["server"])
        ctx.load_verify_locations(pki["ca"][0])
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.seen = []
        self.server = serve(self.handler, "127.0.0.1", 0, ssl=ctx, compression=None)
        self.url = f"wss://127.0.0.1:{self.server.socket.getsockname()[1]}/v1/ws"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handler(self, conn):
        cert = conn.socket.getpeercert()
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        self.seen.append((cn, conn.request.headers.get("Authorization")))
        now = p.format_timestamp(time.time())
        conn.send(json.dumps({"type": "connected", "id": "w", "timestamp": now,
                              "payload": {"client_id": "tls", "server_time": now}}))
        for text in conn:
            msg = json.loads(text)
            conn.send(json.dumps({"type": "ack" if msg["type"] != "ping" else "pong",
                                  "id": msg["id"], "timestamp": now}))

    def close(self):
        self.server.shutdown()


def cert_config(tmp_path, url, pki, which="device", token=False, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path, url, server={"ca_file": str(pki["ca"][0])})
    cfg = yaml.safe_load(path.read_text())
    if not token:
        del cfg["server"]["token_file"]
    cfg["server"].update(client_cert=str(pki[which][0]), client_key=str(pki[which][1]),
                         **extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_config(path):
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(path),
                           "--check-config"], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=30)


def test_a_device_with_a_certificate_needs_no_token(tmp_path, pki):
    srv = TlsServer(pki)
    config = cert_config(tmp_path, srv.url, pki)
    assert check_config(config).returncode == 0
    agent = AgentProcess(config)
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 2, what="samples acked over mTLS")
    finally:
        assert agent.stop() == 0
        srv.close()
    assert srv.seen[0] == ("device-001", None)  # the certificate, and no token
    ends = agent.status()["certificate_expires"]  # status shows the certificate's notAfter
    assert 0 < ends - time.time() <= 86400


def test_an_encrypted_key_with_its_passphrase_file(tmp_path, pki):
    srv = TlsServer(pki)
    secret = tmp_path / "passphrase"
    secret.write_text("s3cret pass\n")
    secret.chmod(0o600)
    agent = AgentProcess(cert_config(tmp_path, srv.url, pki, "locked",
                                     client_key_passphrase_file=str(secret)))
    try:
        wait_for(lambda: agent.status().get("acked", 0) >= 1, what="acked with a locked key")
    finally:
        assert agent.stop() == 0
        srv.close()
    assert "s3cret" not in agent.log()


def test_a_certificate_of_another_ca_is_refused_and_retried(tmp_path, pki):
    srv = TlsServer(pki)
    agent = AgentProcess(cert_config(tmp_path, srv.url, pki, "stranger"))
    try:
        wait_for(lambda: agent.status().get("reconnects", 0) >= 2, what="refused attempts")
        assert agent.proc.poll() is None and srv.seen == []
    finally:
        agent.stop()
        srv.close()


def test_config_checks_of_a_client_certificate(tmp_path, pki):
    srv_url = "wss://127.0.0.1:9/v1/ws"
    config = cert_config(tmp_path, srv_url, pki)
    cfg = yaml.safe_load(config.read_text())
    key_copy = tmp_path / "open.key"
    key_copy.write_bytes(pki["device"][1].read_bytes())
    key_copy.chmod(0o644)
    cases = [
        ({"client_key": str(key_copy)}, "client key"),  # readable by others
        ({"url": "ws://127.0.0.1:9/v1/ws", "ca_file": None}, "server.client_cert: only"),
    ]
    for change, words in cases:
        server = {k: v for k, v in {**cfg["server"], **change}.items() if v is not None}
        config.write_text(yaml.safe_dump({**cfg, "server": server}))
        out = check_config(config)
        assert out.returncode == 78 and words in out.stderr, out.stderr
    server = {k: v for k, v in cfg["server"].items() if k not in ("ca_file", "client_key")}
    config.write_text(yaml.safe_dump({**cfg, "server": server}))
    out = check_config(config)
    assert out.returncode == 78 and "server.client_key: is required" in out.stderr


def test_check_config_reads_the_certificate_as_the_server_will(tmp_path, pki):
    """The device the certificate names (SAN URI, else CN) must be device_id, and it must
    not have expired: caught before the agent runs, not as FORBIDDEN for ever after."""
    url = "wss://127.0.0.1:9/v1/ws"
    for which, words in (("other", "names device 'device-002', not device_id 'device-001'"),
                         ("expired", "has expired")):
        out = check_config(cert_config(tmp_path / which, url, pki, which))
        assert out.returncode == 78 and words in out.stderr, (which, out.stderr)
    for which in ("device", "uri"):
        out = check_config(cert_config(tmp_path / which, url, pki, which))
        assert out.returncode == 0, (which, out.stderr)


def test_status_warns_before_the_certificate_ends():
    from agent.status import render

    now = 1_800_000_000.0
    base = {"state": "running", "device_id": "d", "server": "wss://x", "queue_depth": 0,
            "queue_bytes": 0, "dropped": 0, "reconnects": 0}
    text = render({**base, "certificate_expires": now + 2 * 86400}, now)
    assert "certificate ends:" in text and "WARNING: expires in 2.0 days" in text
    assert "renew it where it was issued" in text
    assert "certificate ends" not in render(base, now)  # a token device: no such line

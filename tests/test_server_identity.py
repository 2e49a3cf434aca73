"""Device identity, the companion server's side (issue 27): tokens verified with a public
key only (EdDSA, RS256) and minted with the private key; client certificates verified in
the TLS handshake (``--client-ca``) that name the device, with no token; the header of a
trusted TLS terminator; ``--require-client-cert``.

Real parts: keys and certificates made by the ``openssl`` command (tests/pki.py),
``nexus-server`` and ``nexus-agent`` as subprocesses, TLS on 127.0.0.1, the server's
SQLite store read afterwards.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
from urllib.parse import quote

import jwt
import pytest
import websocket
import yaml
from helpers import (
    REPO,
    SECRET,
    AgentProcess,
    ServerProcess,
    child_env,
    close_code,
    mint,
    stored,
    wait_for,
    write_config,
)
from pki import make_cert, make_keypair, shared_pki

from agent import protocol as p
from agent.errors import AuthError
from agent.server import certs, tokens

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    out = shared_pki(
        folder, other_device=("device-002", None),
        # The SAN URI names the device, whatever the CN says.
        uri=("gateway 7 (hall B)", "URI:urn:nexus:device:device-007"),
        two=("x", "URI:urn:nexus:device:a,URI:urn:nexus:device:b"))
    ca = out["ca"]
    return {
        **out,
        "other-device": out["other_device"],
        "expired": make_cert(folder, ca, "expired", "device-001", expired=True),
        "locked": make_cert(folder, ca, "locked", "device-001", passphrase="pass phrase"),
        "ed25519": make_keypair(folder, "ed"),
        "ed-other": make_keypair(folder, "ed-other"),
        "rsa": make_keypair(folder, "rsa", "rsa2048"),
        "rsa-small": make_keypair(folder, "rsa-small", "rsa1024"),
        "p256": make_keypair(folder, "p256", "p256"),
    }


def token_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.server", "token", *args],
                          env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=30)


# ---------------------------------------------------------------- asymmetric tokens


@pytest.mark.parametrize("kind,alg", [("ed25519", "EdDSA"), ("rsa", "RS256")])
def test_a_token_minted_with_the_private_key_verifies_with_the_public_key(pki, kind, alg):
    private, public = pki[kind]
    out = token_cli("--private-key", str(private), "--device", "device-001", "--ttl", "600")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == alg
    keys = tokens.load_public_key(str(public))
    assert not keys.can_mint
    identity = keys.verify(token)
    assert (identity.subject, identity.role) == ("device-001", "device")
    assert identity.expires - identity.issued == 600
    with pytest.raises(AuthError, match="public key only"):
        keys.mint("device-001", "device", 60)


def test_the_algorithm_is_pinned_by_the_key_never_taken_from_the_token(pki):
    private, public = pki["ed25519"]
    keys = tokens.load_public_key(str(public))
    now = int(time.time())
    claims = {"sub": "device-001", "role": "device", "iat": now, "exp": now + 600}
    forged = [
        tokens.mint(SECRET.encode(), "device-001", "device", 600),  # HS256, the fleet secret
        # HS256 keyed with the public key's PEM bytes: the classic confusion attack
        _hs256_by_hand(claims, public.read_bytes()),
        jwt.encode(claims, None, algorithm="none"),
        # EdDSA, but another key
        tokens.load_private_key(str(pki["ed-other"][0])).mint("device-001", "device", 600),
    ]
    for token in forged:
        with pytest.raises(AuthError, match="Invalid token"):
            keys.verify(token)
    assert keys.verify(tokens.load_private_key(str(private)).mint("device-001", "device", 60))


def _hs256_by_hand(claims, key: bytes) -> str:
    """An HS256 token keyed with ``key``: PyJWT refuses a PEM as an HMAC key, an
    attacker's own code does not."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


@pytest.mark.parametrize("which,words", [
    ("rsa-small", "at least 2048"), ("p256", "not supported"), ("server", "not a PEM public")])
def test_a_key_that_is_weak_or_of_another_kind_is_refused_at_start(pki, which, words):
    path = pki[which][1] if which != "server" else pki["server"][0]
    out = subprocess.run([sys.executable, "-m", "agent.server", "--port", "0",
                          "--public-key", str(path)], env=child_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_a_public_key_node_serves_eddsa_devices_and_refuses_hs256(tmp_path, pki):
    private, public = pki["ed25519"]
    db = tmp_path / "server.db"
    server = ServerProcess(0, "--public-key", str(public), db=str(db))
    try:
        token = token_cli("--private-key", str(private), "--device", "device-001").stdout
        agent = AgentProcess(write_config(tmp_path, server.url, token=token.strip()))
        wait_for(lambda: len(stored(db)) >= 2, timeout=15, what="EdDSA device's telemetry")
        assert agent.stop() == 0
        ws = websocket.create_connection(server.url, timeout=5, header=[
            f"Authorization: Bearer {mint('device-002')}"])  # HS256 from the fleet secret
        error = json.loads(ws.recv())
        assert error["error"]["code"] == p.AUTH_FAILED
        assert close_code(ws.recv_data(control_frame=True)[1]) == p.CLOSE_AUTH_FAILED
        ws.close()
    finally:
        server.stop()
    assert stored(db, "device-002") == []


# ---------------------------------------------------------------- client certificates


def tls_server(pki, tmp_path, *extra):
    return ServerProcess(0, "--tls-cert", str(pki["server"][0]), "--tls-key",
                         str(pki["server"][1]), "--client-ca", str(pki["ca"][0]), *extra,
                         db=str(tmp_path / "server.db"))


def cert_agent(tmp_path, url, pki, which, device_id="device-001", token=None):
    folder = tmp_path / which
    folder.mkdir()
    path = write_config(folder, url, device_id=device_id, token=token,
                        server={"ca_file": str(pki["ca"][0])})
    cfg = yaml.safe_load(path.read_text())
    if token is None:
        del cfg["server"]["token_file"]
    cfg["server"].update(client_cert=str(pki[which][0]), client_key=str(pki[which][1]))
    path.write_text(yaml.safe_dump(cfg))
    return AgentProcess(path)


def dial(url, pki, cert=None, token=None):
    """A raw TLS WebSocket client; returns (socket, first message)."""
    sslopt = {"ca_certs": str(pki["ca"][0]), "cert_reqs": ssl.CERT_REQUIRED}
    if cert:
        sslopt.update(certfile=str(pki[cert][0]), keyfile=str(pki[cert][1]))
    header = [f"Authorization: Bearer {token}"] if token else []
    ws = websocket.create_connection(url, sslopt=sslopt, header=header, timeout=5)
    return ws, json.loads(ws.recv())


def test_a_device_certificate_names_the_device_and_needs_no_token(tmp_path, pki):
    server = tls_server(pki, tmp_path)
    db = tmp_path / "server.db"
    try:
        by_cn = cert_agent(tmp_path, server.url, pki, "device")
        by_uri = cert_agent(tmp_path, server.url, pki, "uri", device_id="device-007")
        wait_for(lambda: len(stored(db, "device-001")) >= 2
                 and len(stored(db, "device-007")) >= 2, timeout=20,
                 what="telemetry from both certificate devices")
        assert by_cn.stop() == 0 and by_uri.stop() == 0
        # An operator (the page) has no certificate and keeps its token.
        ws, welcome = dial(server.url, pki, token=mint("ops", "operator"))
        assert welcome["type"] == "connected"
        ws.close()
    finally:
        server.stop()


def test_an_agent_with_another_devices_certificate_delivers_nothing_and_loses_nothing(
        tmp_path, pki):
    """A provisioning mix-up: device-001's config with device-002's certificate. The server
    takes the certificate's word (device-002) and refuses device-001's telemetry
    (FORBIDDEN); the agent keeps every sample queued for when the right one is in place."""
    server = tls_server(pki, tmp_path)
    agent = cert_agent(tmp_path, server.url, pki, "other-device")  # device_id device-001
    try:
        wait_for(lambda: agent.log().count("FORBIDDEN") >= 3, timeout=15,
                 what="refused telemetry")
        wait_for(lambda: agent.status().get("queue_depth", 0) >= 3, timeout=15,
                 what="samples kept queued")
        assert agent.status().get("acked", 0) == 0
    finally:
        assert agent.stop() == 0
        server.stop()
    assert stored(tmp_path / "server.db", "device-001") == []
    assert stored(tmp_path / "server.db", "device-002") == []


def test_a_certificate_cannot_speak_for_another_device(tmp_path, pki):
    server = tls_server(pki, tmp_path)
    try:
        ws, welcome = dial(server.url, pki, cert="device")
        assert welcome["type"] == "connected"
        now = p.format_timestamp(time.time())
        ws.send(json.dumps({"type": "telemetry", "id": "t1", "timestamp": now, "payload": {
            "device_id": "device-002", "metrics": {"cpu_usage": 1, "memory_usage": 2}}}))
        answer = json.loads(ws.recv())
        assert answer["type"] == "error" and answer["error"]["code"] == p.FORBIDDEN
        ws.close()
        # A token beside the certificate must name the same device.
        ws, error = dial(server.url, pki, cert="device", token=mint("device-002"))
        assert error["error"]["code"] == p.AUTH_FAILED
        assert "different identities" in error["error"]["message"]
        ws.close()
        ws, error = dial(server.url, pki, cert="two")
        assert error["error"]["code"] == p.AUTH_FAILED and "2 devices" in error["error"]["message"]
        ws.close()
    finally:
        server.stop()
    assert stored(tmp_path / "server.db", "device-002") == []


@pytest.mark.parametrize("which", ["expired", "stranger"])
def test_an_expired_or_foreign_certificate_fails_the_tls_handshake(tmp_path, pki, which):
    server = tls_server(pki, tmp_path)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, websocket.WebSocketException)):
            ws, _ = dial(server.url, pki, cert=which, token=None)
            ws.recv()  # TLS 1.3: the server's alert may come with the first read
        agent = cert_agent(tmp_path, server.url, pki, which)
        wait_for(lambda: agent.status().get("reconnects", 0) >= 2, timeout=15,
                 what="refused attempts")
        assert agent.proc.poll() is None  # it retries; it does not crash
        agent.stop()
    finally:
        server.stop()
    assert stored(tmp_path / "server.db") == []


def test_require_client_cert_refuses_devices_on_tokens_only(tmp_path, pki):
    server = tls_server(pki, tmp_path, "--require-client-cert")
    try:
        ws, error = dial(server.url, pki, token=mint("device-001"))
        assert error["error"]["code"] == p.AUTH_FAILED
        assert "client certificate" in error["error"]["message"]
        ws.close()
        ws, welcome = dial(server.url, pki, token=mint("ops", "operator"))
        assert welcome["type"] == "connected"
        ws.close()
        ws, welcome = dial(server.url, pki, cert="device")
        assert welcome["type"] == "connected"
        assert "capabilities" not in welcome["payload"] or \
            p.TOKEN_RENEW not in welcome["payload"]["capabilities"]  # nothing to renew
        ws.close()
    finally:
        server.stop()


def test_bad_identity_flags_are_named():
    cases = [(["--client-ca", "ca.pem"], "--client-ca needs --tls-cert"),
             (["--require-client-cert"], "--require-client-cert needs"),
             (["--renew-at", "1.5"], "--renew-at must be between 0 and 1"),
             (["--client-cert-header", "X-C", "--trusted-proxy", "nowhere"],
              "--trusted-proxy 'nowhere'"),
             (["--claim-ca-cert", "ca.pem"], "--claim-ca-cert and --claim-ca-key go together"),
             (["--claim-ca-cert", "ca.pem", "--claim-ca-key", "ca.key"],
              "--claim-ca-cert needs --db FILE"),
             (["--claim-ca-cert", "ca.pem", "--claim-ca-key", "ca.key", "--db", "x.db",
               "--redis", "redis://127.0.0.1:9/0"], "outside the cluster")]
    for args, words in cases:
        out = subprocess.run([sys.executable, "-m", "agent.server", "--port", "0", *args],
                             env=child_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2 and words in out.stderr, (args, out.stderr)


# ---------------------------------------------------------------- certs.py, directly


def test_the_certificate_header_is_read_and_bounded(pki):
    pem = pki["uri"][0].read_text()
    assert certs.identity_from_header(quote(pem)).subject == "device-007"
    identity = certs.identity_from_header(quote(pki["device"][0].read_text()))
    assert identity.subject == "device-001" and identity.certificate and identity.is_device
    assert identity.renew_time(0.8) is None
    for bad, words in [("garbage", "cannot be read"), ("x" * 20000, "too long"),
                       (quote(pki["two"][0].read_text()), "2 devices")]:
        with pytest.raises(AuthError, match=words):
            certs.identity_from_header(bad)


def test_trusted_proxy_addresses():
    nets = certs.parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert certs.trusted(("127.0.0.1", 5000), nets)
    assert certs.trusted(("10.2.3.4", 5000), nets)
    assert certs.trusted(("::ffff:10.2.3.4", 5000, 0, 0), nets)  # IPv4-mapped
    assert certs.trusted(("::1", 5000, 0, 0), nets)
    assert not certs.trusted(("127.0.0.2", 5000), nets)
    assert not certs.trusted(None, nets) and not certs.trusted("/run/sock", nets)
    with pytest.raises(ValueError, match="not an address"):
        certs.parse_networks(["10.0.0.0/33"])


def test_a_certificate_header_past_its_not_after_is_refused_at_connect(tmp_path, pki):
    """A terminator should never pass an expired certificate; if one comes from a trusted
    address anyway, it is refused at connect like an expired token, not welcomed (with
    the telemetry it pipelined stored) until the expiry timer closes it."""
    server = ServerProcess(0, "--client-cert-header", "X-Client-Cert",
                           db=str(tmp_path / "server.db"))
    try:
        ws = websocket.create_connection(server.url, timeout=5, header=[
            f"X-Client-Cert: {quote(pki['expired'][0].read_text())}"])
        first = json.loads(ws.recv())
        ws.close()
    finally:
        server.stop()
    assert first["type"] == "error", first
    assert first["error"]["code"] == p.AUTH_FAILED and "expired" in first["error"]["message"]


# ---------------------------------------------------------------- provisioning


def provision_cert(tmp_path, url, pki, which="device", *extra):
    return subprocess.run(
        [sys.executable, "-m", "agent", "provision", "--device-id", "device-001",
         "--server", url, "--client-cert", str(pki[which][0]),
         "--client-key", str(pki[which][1]), "--ca-file", str(pki["ca"][0]),
         "--config", str(tmp_path / "etc" / "agent.yaml"),
         "--state-dir", str(tmp_path / "state"), *extra],
        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)


def test_provision_a_device_with_a_certificate_and_no_token(tmp_path, pki):
    server = tls_server(pki, tmp_path)
    try:
        out = provision_cert(tmp_path, server.url, pki)
        assert out.returncode == 0, out.stderr
        etc = tmp_path / "etc"
        assert {f.name for f in etc.iterdir()} == {"agent.yaml", "device.pem", "device.key"}
        assert all(f.stat().st_mode & 0o077 == 0 for f in etc.glob("device.*"))
        cfg = yaml.safe_load((etc / "agent.yaml").read_text())
        assert "token_file" not in cfg["server"]
        assert cfg["server"]["client_key"] == str(etc / "device.key")
        agent = AgentProcess(etc / "agent.yaml")
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= 2, timeout=15,
                 what="telemetry from the provisioned certificate device")
        assert agent.stop() == 0
        # The check presents the certificate: one of another CA is refused (no files).
        other = tmp_path / "other"
        out = provision_cert(other, server.url, pki, "stranger")
        assert out.returncode == 4 and not (other / "etc" / "agent.yaml").exists()
    finally:
        server.stop()


def test_provision_names_a_bad_certificate_input(tmp_path, pki):
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki["device"][1].read_bytes())
    loose.chmod(0o644)
    cases = [
        (["--client-cert", str(pki["device"][0])], "go together"),
        ([], "--token-file, or --client-cert"),
    ]
    for args, words in cases:
        out = subprocess.run(
            [sys.executable, "-m", "agent", "provision", "--device-id", "device-001",
             "--server", "wss://127.0.0.1:9/v1/ws", "--no-check", *args,
             "--config", str(tmp_path / "etc" / "agent.yaml")],
            env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and words in out.stderr, out.stderr
    bad = {"device": (pki["device"][0], loose), "locked": pki["locked"],
           "swapped": (pki["device"][1], pki["device"][0])}
    words = {"device": "mode 0644", "locked": "encrypted", "swapped": "not a PEM certificate"}
    for name, (cert, key) in bad.items():
        pki_copy = {**pki, name: (cert, key)}
        out = provision_cert(tmp_path, "wss://127.0.0.1:9/v1/ws", pki_copy, name, "--no-check")
        assert out.returncode == 2 and words[name] in out.stderr, (name, out.stderr)
    assert not (tmp_path / "etc").exists()


# ---------------------------------------------------------------- review hardening


def test_token_clock_skew_and_subjects():
    """iat up to a minute ahead is taken (nodes' clocks differ; a renewal minted by a node
    a second ahead was refused); further ahead is not; a subject with a control character
    is refused (it goes into logs)."""
    keys = tokens.TokenKeys.from_secret(SECRET.encode())
    now = time.time()
    assert keys.verify(keys.mint("device-001", "device", 600, now=now + 30)).subject == \
        "device-001"
    with pytest.raises(AuthError, match="in the future"):
        keys.verify(keys.mint("device-001", "device", 600, now=now + 300))
    with pytest.raises(AuthError, match="printable"):
        keys.verify(keys.mint("device-001\nFAKE LOG LINE", "device", 600))


def test_a_renewal_keeps_its_lifetime_only_up_to_the_cap(tmp_path):
    """A token minted with a careless iat (ten years back) is renewed for the cap, not for
    another ten years."""
    keys = tokens.TokenKeys.from_secret(SECRET.encode())
    decade = 10 * 365 * 86400
    token = keys.mint("device-001", "device", decade + 3600, now=time.time() - decade)
    server = ServerProcess(0, "--max-token-lifetime", "1")
    try:
        from helpers import Peer

        peer = Peer(server.url, token)
        fresh = keys.verify(peer.recv_type(p.TOKEN_RENEWED)["payload"]["token"])
        assert fresh.expires - fresh.issued == 86400
        peer.close()
    finally:
        server.stop()


def test_with_a_client_ca_the_header_certificate_must_be_issued_by_it(tmp_path, pki):
    """Certificates are public, so the trusted address stays the rule; the CA check stops a
    process at that address from making one up."""
    server = ServerProcess(0, "--client-cert-header", "X-Client-Cert", "--client-ca",
                           str(pki["ca"][0]), db=str(tmp_path / "server.db"))
    try:
        for which, expect in (("device", "connected"), ("stranger", "error")):
            ws = websocket.create_connection(server.url, timeout=5, header=[
                f"X-Client-Cert: {quote(pki[which][0].read_text())}"])
            first = json.loads(ws.recv())
            assert first["type"] == expect, (which, first)
            if expect == "error":
                assert "not issued by the client CA" in first["error"]["message"]
            ws.close()
    finally:
        server.stop()

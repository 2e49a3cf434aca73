"""Provisioning by claim (issue 27): a factory image carries one claim token and no device
secret; ``nexus-agent provision --claim-file`` makes a key on the device, asks the server
for a certificate for its id (``device.claim``), and writes what comes back; the agent
then connects with that certificate and no token.

Real parts: ``nexus-server`` with a device CA (made by the ``openssl`` command,
tests/pki.py) over TLS on 127.0.0.1, ``nexus-agent provision`` and the agent as
subprocesses, the server's SQLite store read afterwards.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time

import pytest
import websocket
import yaml
from helpers import (
    REPO,
    SECRET,
    AgentProcess,
    ServerProcess,
    child_env,
    mint,
    stored,
    wait_for,
)
from pki import make_ca, make_cert

from agent import protocol as p
from agent.server import tokens

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "device-ca")
    return {"ca": ca, "server": make_cert(folder, ca, "server", "127.0.0.1",
                                          san="IP:127.0.0.1")}


def claim_server(pki, tmp_path, *extra):
    return ServerProcess(0, "-v", "--tls-cert", str(pki["server"][0]), "--tls-key",
                         str(pki["server"][1]), "--client-ca", str(pki["ca"][0]),
                         "--claim-ca-cert", str(pki["ca"][0]), "--claim-ca-key",
                         str(pki["ca"][1]), *extra, db=str(tmp_path / "server.db"))


def claim_token(tmp_path, name="factory-7", prefix="gw-", most=2, ttl=3600):
    out = subprocess.run([sys.executable, "-m", "agent.server", "token", "--claim", name,
                          "--prefix", prefix, "--max-devices", str(most), "--ttl", str(ttl)],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    path = tmp_path / f"{name}.claim"
    path.write_text(out.stdout)
    path.chmod(0o600)
    return path


def provision(folder, url, pki, device_id, claim_file):
    return subprocess.run(
        [sys.executable, "-m", "agent", "provision", "--device-id", device_id,
         "--server", url, "--claim-file", str(claim_file), "--ca-file", str(pki["ca"][0]),
         "--config", str(folder / "etc" / "agent.yaml"),
         "--state-dir", str(folder / "state")],
        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)


def written(folder):
    """What provision wrote beside the config but the claim key it keeps for a retry."""
    etc = folder / "etc"
    return sorted(f.name for f in etc.iterdir() if f.name != ".claim.key") \
        if etc.exists() else []


def claims(db):
    import sqlite3

    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT device_id FROM claims ORDER BY 1")]


def test_a_factory_image_claims_its_identity_once_and_runs_on_it(tmp_path, pki):
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path)
    device = tmp_path / "gw-0001"
    try:
        out = provision(device, server.url, pki, "gw-0001", token)
        assert out.returncode == 0, out.stderr
        etc = device / "etc"
        assert {f.name for f in etc.iterdir()} == {"agent.yaml", "device.pem", "device.key"}
        assert all(f.stat().st_mode & 0o077 == 0 for f in etc.glob("device.*"))
        pem = (etc / "device.pem").read_text()
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(pem.encode())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            "urn:nexus:device:gw-0001"]
        assert "token_file" not in yaml.safe_load((etc / "agent.yaml").read_text())["server"]
        files = {f.name: f.read_bytes() for f in etc.iterdir()}
        # Again on the provisioned device: nothing changes, nothing is claimed again.
        again = provision(device, server.url, pki, "gw-0001", token)
        assert again.returncode == 0, again.stderr
        assert {f.name: f.read_bytes() for f in etc.iterdir()} == files
        agent = AgentProcess(etc / "agent.yaml")
        wait_for(lambda: len(stored(tmp_path / "server.db", "gw-0001")) >= 2, timeout=15,
                 what="telemetry from the claimed device")
        assert agent.stop() == 0
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == ["gw-0001"]
    assert "device gw-0001 claimed" in server.log()


def test_a_claim_is_refused_for_a_taken_id_another_prefix_or_past_its_count(tmp_path, pki):
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path)
    expired = tmp_path / "old.claim"  # a batch whose claim token ran out an hour ago
    expired.write_text(tokens.TokenKeys.from_secret(SECRET.encode()).mint(
        "old-batch", "claim", 60, now=time.time() - 3600, prefix="gw-", max=2))
    expired.chmod(0o600)
    try:
        assert provision(tmp_path / "a", server.url, pki, "gw-0001", token).returncode == 0
        cases = [
            ("thief", "gw-0001", token, "was claimed before"),  # a copy of the image
            ("other", "plant-0001", token, "starting with 'gw-'"),
            ("old", "gw-0009", expired, "Token expired"),
        ]
        for folder, device_id, claim_file, words in cases:
            out = provision(tmp_path / folder, server.url, pki, device_id, claim_file)
            assert out.returncode == 5 and words in out.stderr, (folder, out.stderr)
            assert written(tmp_path / folder) == []
        assert provision(tmp_path / "b", server.url, pki, "gw-0002", token).returncode == 0
        out = provision(tmp_path / "c", server.url, pki, "gw-0003", token)
        assert out.returncode == 5 and "claimed its 2 devices" in out.stderr
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == ["gw-0001", "gw-0002"]


def dial(url, pki, token):
    ws = websocket.create_connection(url, timeout=5, header=[f"Authorization: Bearer {token}"],
                                     sslopt={"ca_certs": str(pki["ca"][0]),
                                             "cert_reqs": ssl.CERT_REQUIRED})
    return ws, json.loads(ws.recv())


def test_a_claim_token_opens_nothing_but_one_claim(tmp_path, pki):
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path).read_text().strip()
    try:
        ws, welcome = dial(server.url, pki, token)
        assert welcome["payload"]["capabilities"] == {p.DEVICE_CLAIM: {"days": 365}}
        now = p.format_timestamp(time.time())
        ws.send(json.dumps({"type": "command", "id": "c1", "timestamp": now, "payload": {
            "device_id": "gw-0001", "command": "reboot"}}))  # as if it were an operator
        error = json.loads(ws.recv())
        assert error["error"]["code"] == p.INVALID_MESSAGE and error["error"]["field"] == "type"
        ws.close()
        ws, _ = dial(server.url, pki, token)
        ws.send(json.dumps({"type": p.DEVICE_CLAIM, "id": "k1", "timestamp": now, "payload": {
            "device_id": "gw-0005", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}}))
        error = json.loads(ws.recv())
        assert error["error"]["field"] == "payload.csr"
        ws.close()
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == []
    # A server without a claim CA takes no claims.
    plain = ServerProcess(0, "--tls-cert", str(pki["server"][0]), "--tls-key",
                          str(pki["server"][1]))
    try:
        ws, error = dial(plain.url, pki, token)
        assert error["error"]["code"] == p.AUTH_FAILED
        assert "takes no claims" in error["error"]["message"]
        ws.close()
    finally:
        plain.stop()


def request_for(key=None):
    """A PEM certificate request signed by ``key`` (a new P-256 key by default)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nexus-claim")]))
           .sign(key, digest))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def claim_once(url, pki, token, device_id, csr):
    """The server's answer to one device.claim on a new connection."""
    ws, welcome = dial(url, pki, token)
    assert welcome["type"] == "connected", welcome
    try:
        ws.send(json.dumps({"type": p.DEVICE_CLAIM, "id": "k1",
                            "timestamp": p.format_timestamp(time.time()),
                            "payload": {"device_id": device_id, "csr": csr}}))
        return json.loads(ws.recv())
    finally:
        ws.close()


def test_an_id_of_up_to_128_characters_can_be_claimed(tmp_path, pki):
    # The rule allows 128; a certificate's CN holds at most 64 (the SAN URI names the device).
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path)
    device_id = "gw-" + "7" * 125
    try:  # the claim, then a connection with the new certificate (TLS, --client-ca)
        out = provision(tmp_path / "long", server.url, pki, device_id, token)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    from agent.server import certs

    pem = (tmp_path / "long" / "etc" / "device.pem").read_text()
    assert certs.identity_from_der(ssl.PEM_cert_to_DER_cert(pem)).subject == device_id
    assert claims(tmp_path / "server.db") == [device_id]


def test_an_id_with_a_trailing_newline_is_refused_and_not_recorded(tmp_path, pki):
    # "$" in the id rule also matches before a final newline: such an id got a certificate
    # whose name the server itself then refuses (not printable), and used up a claim.
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path).read_text().strip()
    try:
        answer = claim_once(server.url, pki, token, "gw-0001\n", request_for())
    finally:
        server.stop()
    assert answer["type"] == "error", answer
    assert answer["error"]["field"] == "payload.device_id"
    assert claims(tmp_path / "server.db") == []


def test_only_the_documented_keys_are_signed(tmp_path, pki):
    # P-256, P-384, Ed25519 or RSA of at least 2048 bits (docs/protocol.md section 10): not
    # a weak curve (P-192), nor one TLS 1.3 cannot use (secp256k1).
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path, most=10).read_text().strip()
    keys = {"gw-p192": ec.SECP192R1(), "gw-k1": ec.SECP256K1(), "gw-p384": ec.SECP384R1()}
    try:
        answers = {device_id: claim_once(server.url, pki, token, device_id,
                                         request_for(ec.generate_private_key(curve)))
                   for device_id, curve in keys.items()}
        answers["gw-ed"] = claim_once(server.url, pki, token, "gw-ed",
                                      request_for(ed25519.Ed25519PrivateKey.generate()))
    finally:
        server.stop()
    for device_id in ("gw-p192", "gw-k1"):
        assert answers[device_id]["type"] == "error", answers[device_id]
        assert answers[device_id]["error"]["field"] == "payload.csr"
    assert claims(tmp_path / "server.db") == ["gw-ed", "gw-p384"]


def test_a_claim_over_plain_ws_is_refused_before_the_token_is_sent(tmp_path, pki):
    # A certificate works only on a wss:// server (the agent's config says so): a claim over
    # ws:// sent the claim token in clear text and spent the id on files the agent refuses.
    server = ServerProcess(0, "--claim-ca-cert", str(pki["ca"][0]), "--claim-ca-key",
                           str(pki["ca"][1]), db=str(tmp_path / "server.db"))
    token = claim_token(tmp_path)
    runs = []
    try:
        for device_id, extra in (("gw-0001", []), ("gw-0002", ["--no-check"])):
            runs.append(subprocess.run(
                [sys.executable, "-m", "agent", "provision", "--device-id", device_id,
                 "--server", server.url, "--claim-file", str(token), *extra,
                 "--config", str(tmp_path / device_id / "agent.yaml"),
                 "--state-dir", str(tmp_path / "state")],
                env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60))
    finally:
        server.stop()
    for run in runs:
        assert run.returncode == 2 and "wss://" in run.stderr, run.stderr
    assert not (tmp_path / "gw-0001").exists() and not (tmp_path / "gw-0002").exists()
    assert claims(tmp_path / "server.db") == []


class LyingServer:
    """A wss:// server that welcomes a claim and answers it with ``certificate``."""

    def __init__(self, pki, certificate):
        import threading

        from websockets.sync.server import serve

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pki["server"][0]), str(pki["server"][1]))
        self.certificate = certificate
        self.server = serve(self.handle, "127.0.0.1", 0, ssl=context, compression=None)
        self.url = f"wss://127.0.0.1:{self.server.socket.getsockname()[1]}/v1/ws"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, conn):
        from helpers import welcome

        welcome(conn)
        msg = json.loads(conn.recv())
        conn.send(json.dumps({"type": p.DEVICE_CLAIMED, "id": msg["id"],
                              "timestamp": p.format_timestamp(time.time()),
                              "payload": {"device_id": "gw-0001",
                                          "certificate": self.certificate}}))

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize("answer", ["garbage", "another device", "another key"])
def test_a_certificate_that_is_not_the_devices_is_never_written(tmp_path, pki, answer):
    # Written with --no-check, a wrong certificate locked the device: run again, provision
    # saw its files and said "claimed before" (exit 0), and the id was spent at the server.
    other = make_cert(tmp_path, pki["ca"], "other", "gw-0002",
                      san="URI:urn:nexus:device:gw-0002")
    stolen = make_cert(tmp_path, pki["ca"], "stolen", "gw-0001",
                       san="URI:urn:nexus:device:gw-0001")  # the right name, not its key
    pem = {"garbage": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
           "another device": other[0].read_text(), "another key": stolen[0].read_text()}
    liar = LyingServer(pki, pem[answer])
    token = claim_token(tmp_path)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "agent", "provision", "--device-id", "gw-0001", "--server",
             liar.url, "--claim-file", str(token), "--ca-file", str(pki["ca"][0]),
             "--no-check", "--config", str(tmp_path / "etc" / "agent.yaml"),
             "--state-dir", str(tmp_path / "state")],
            env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        liar.close()
    assert out.returncode == 4, out.stderr
    assert "certificate" in out.stderr
    assert written(tmp_path) == []


@pytest.mark.parametrize("prefix, most", [("gw-", 1_000_001), ("g" * 65, 5), ("", 5)])
def test_a_claim_token_the_server_would_refuse_is_not_minted(prefix, most):
    # Minted, it went into a factory image and every device's claim was refused.
    out = subprocess.run([sys.executable, "-m", "agent.server", "token", "--claim", "f",
                          "--prefix", prefix, "--max-devices", str(most)],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == "", out.stdout


def test_a_claim_whose_answer_was_lost_is_repeated_with_the_same_key(tmp_path, pki):
    """The answer never reached the device (here: a client that drops it). The device kept
    its claim key, so provision repeats the claim with it, and the server, which recorded
    the id with that key for that token, answers again; another key is still refused."""
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path)
    etc = tmp_path / "gw-0007" / "etc"
    etc.mkdir(parents=True)
    key = etc / ".claim.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   capture_output=True)
    key.chmod(0o600)
    csr = subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=x"],
                         check=True, capture_output=True, text=True).stdout
    try:
        ws, _ = dial(server.url, pki, token.read_text().strip())
        ws.send(json.dumps({"type": p.DEVICE_CLAIM, "id": "k1", "timestamp":
                            p.format_timestamp(time.time()),
                            "payload": {"device_id": "gw-0007", "csr": csr}}))
        assert json.loads(ws.recv())["type"] == p.DEVICE_CLAIMED  # ... and lost
        ws.close()
        out = provision(tmp_path / "gw-0007", server.url, pki, "gw-0007", token)
        assert out.returncode == 0, out.stderr
        assert not key.exists()  # now device.key
        assert subprocess.run(["openssl", "pkey", "-in", str(etc / "device.key"), "-pubout"],
                              capture_output=True, text=True).stdout
        # A copy of the image (another key) still cannot claim it.
        thief = provision(tmp_path / "thief", server.url, pki, "gw-0007", token)
        assert thief.returncode == 5 and "claimed before" in thief.stderr
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == ["gw-0007"]  # counted once


def test_an_id_the_server_has_served_by_token_cannot_be_claimed(tmp_path, pki):
    server = claim_server(pki, tmp_path)
    token = claim_token(tmp_path)
    try:
        ws, welcome = dial(server.url, pki, mint("gw-0100"))
        assert welcome["type"] == "connected"
        out = provision(tmp_path / "x", server.url, pki, "gw-0100", token)
        assert out.returncode == 5 and "is in use" in out.stderr, out.stderr
        ws.close()
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == []


def test_a_claim_token_revoked_while_its_connection_waits_gets_no_certificate(tmp_path, pki):
    # The deny file names it after its welcome and before its device.claim: the open claim
    # connection (outside the hub: nothing closes it) must not be signed a certificate.
    deny = tmp_path / "deny"
    deny.write_text("# nobody yet\n")
    server = claim_server(pki, tmp_path, "--deny-file", str(deny))
    token = claim_token(tmp_path).read_text().strip()
    try:
        ws, welcome = dial(server.url, pki, token)
        assert welcome["type"] == "connected", welcome
        deny.write_text("claim factory-7\n")

        def revoked():
            other, first = dial(server.url, pki, token)
            other.close()
            return first.get("error", {}).get("message") == "Revoked"

        wait_for(revoked, timeout=8, what="the claim token revoked")
        try:
            ws.send(json.dumps({"type": p.DEVICE_CLAIM, "id": "k1",
                                "timestamp": p.format_timestamp(time.time()),
                                "payload": {"device_id": "gw-0001", "csr": request_for()}}))
            answer = json.loads(ws.recv())
        except (websocket.WebSocketException, OSError):
            answer = {"type": "closed"}
        finally:
            ws.close()
        assert answer["type"] != p.DEVICE_CLAIMED, answer
    finally:
        server.stop()
    assert claims(tmp_path / "server.db") == []

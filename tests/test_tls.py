"""wss:// end to end with a throw-away CA: verified with server.ca_file, refused without."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from helpers import AgentProcess, ServerProcess, stored, wait_for, write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return folder / "cert.pem", folder / "key.pem"


def test_wss_with_private_ca(tmp_path, cert):
    srv = ServerProcess(0, "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]),
                        db=str(tmp_path / "server.db"))
    assert srv.url.startswith("wss://")
    agent = AgentProcess(write_config(tmp_path, srv.url, server={"ca_file": str(cert[0])}))
    try:
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= 2, what="telemetry over TLS")
    finally:
        assert agent.stop() == 0
        srv.stop()


def test_wss_with_an_unknown_certificate_is_refused_and_retried(tmp_path, cert):
    srv = ServerProcess(0, "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]),
                        db=str(tmp_path / "server.db"))
    agent = AgentProcess(write_config(tmp_path, srv.url))  # no ca_file: the system store
    try:
        status = wait_for(lambda: agent.status().get("reconnects", 0) >= 2 and agent.status(),
                          what="failed attempts")
        assert "CERTIFICATE_VERIFY_FAILED" in status["last_error"]
        assert stored(tmp_path / "server.db") == []
        assert agent.proc.poll() is None  # retrying, not crashing
    finally:
        agent.stop()
        srv.stop()


def test_provision_against_a_wss_server_with_private_ca(tmp_path, cert):
    import sys

    from helpers import REPO, child_env, mint

    from agent import config

    srv = ServerProcess(0, "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]))
    token = tmp_path / "in.token"
    token.write_text(mint("gw-7") + "\n")
    token.chmod(0o600)
    try:
        out = subprocess.run([sys.executable, "-m", "agent", "provision", "--device-id", "gw-7",
                              "--server", srv.url, "--token-file", str(token), "--ca-file",
                              str(cert[0]), "--config", str(tmp_path / "etc" / "agent.yaml")],
                             env=child_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        cfg = config.load(str(tmp_path / "etc" / "agent.yaml"))
        assert cfg.server.ca_file == str(cert[0])
    finally:
        srv.stop()

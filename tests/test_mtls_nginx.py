"""Client certificates behind nginx (issue 27): the shipped deploy/nginx/nexus-mtls.conf
terminates TLS in front of a real ``nexus-server --client-cert-header X-Nexus-Client-Cert``
and passes the certificate it verified, and nothing a client sends, to the node.

The nginx config is the shipped file with this machine's paths, port and node put in
(``mtls_conf``: each replaced line must be in the file, so the test runs what ships), plus
``proxy_bind 127.0.0.2``: nginx reaches the node from 127.0.0.2, the node trusts only that
address (``--trusted-proxy 127.0.0.2``), and a client that goes straight to the node comes
from 127.0.0.1. Real keys and certificates (tests/pki.py), real TLS, real processes.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import pytest
import websocket
import yaml
from helpers import (
    CHILDREN,
    OPEN_PEERS,
    REPO,
    AgentProcess,
    Peer,
    ServerProcess,
    free_port,
    mint,
    stored,
    wait_for,
    write_config,
)
from pki import shared_pki

from agent import protocol as p

SHIPPED = REPO / "deploy" / "nginx" / "nexus-mtls.conf"
HEADER = "X-Nexus-Client-Cert"
NGINX_ADDR = "127.0.0.2"  # nginx's side of its connections to the node (proxy_bind)
# The lines this test relies on, verbatim in the shipped file.
CERT_MAP = ("map $ssl_client_verify $nexus_client_cert {\n"
            "    SUCCESS $ssl_client_escaped_cert;\n"
            '    default "";\n'
            "}")
SET_HEADER = f"proxy_set_header {HEADER} $nexus_client_cert;"


def _nginx() -> Optional[str]:
    return shutil.which("nginx") or next(
        (b for b in ("/usr/sbin/nginx",) if Path(b).exists()), None)


pytestmark = pytest.mark.skipif(
    _nginx() is None or shutil.which("openssl") is None,
    reason="needs nginx and the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Dict[str, Tuple[Path, Path]]:
    # The SAN URI names the device; the CN is a decoy that must not be used. The stranger
    # (another CA) says device-001.
    return shared_pki(tmp_path_factory.mktemp("pki"),
                      san=("decoy-cn", "URI:urn:nexus:device:sensor-san"),
                      cn=("sensor-cn", None))


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is no longer in {SHIPPED.name}: update this test"
    return text.replace(old, new)


def mtls_conf(folder: Path, pki, port: int, node_port: int) -> str:
    """The shipped file, with this machine's certificates, port, node and log folder."""
    conf = SHIPPED.read_text()
    for line in conf.splitlines():  # the example nodes: this machine's one instead
        if line.strip().startswith("server 10.0.0."):
            conf = conf.replace(line + "\n", "")
    for old, new in (
            ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
            ("/etc/ssl/nexus/fullchain.pem", str(pki["server"][0])),
            ("/etc/ssl/nexus/privkey.pem", str(pki["server"][1])),
            ("/etc/ssl/nexus/device-ca.pem", str(pki["ca"][0])),
            ("/var/log/nginx/", f"{folder}/"),
            ("upstream nexus_nodes {",
             f"upstream nexus_nodes {{\n    server 127.0.0.1:{node_port};"),
            ("proxy_pass http://nexus_nodes;",
             f"proxy_pass http://nexus_nodes;\n        proxy_bind {NGINX_ADDR};")):
        conf = _replace(conf, old, new)
    return (f"worker_processes 1;\nerror_log {folder}/main-error.log info;\n"
            f"pid {folder}/nginx.pid;\nevents {{ worker_connections 64; }}\nhttp {{\n"
            + "".join(f"    {kind}_temp_path {folder}/{kind};\n"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + conf + "\n}\n")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Stack:
    """A node (plain ws, trusting only 127.0.0.2's header) behind the shipped nginx."""

    def __init__(self, folder: Path, pki) -> None:
        self.db = folder / "server.db"
        self.node = ServerProcess(0, "--client-cert-header", HEADER,
                                  "--trusted-proxy", NGINX_ADDR, "-v", db=str(self.db))
        self.folder = folder / "nginx"
        self.folder.mkdir()
        self.port = free_port()
        (self.folder / "nginx.conf").write_text(
            mtls_conf(self.folder, pki, self.port, self.node.port))
        self.nginx = subprocess.Popen(
            [_nginx(), "-p", str(self.folder), "-e", str(self.folder / "main-error.log"),
             "-c", str(self.folder / "nginx.conf"),
             # One process (no master): a test that fails and SIGKILLs it leaves no worker.
             "-g", "daemon off; master_process off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        CHILDREN.append(self.nginx)
        wait_for(lambda: _listening(self.port) or self.nginx.poll() is not None, 10,
                 what="nginx listening")
        assert self.nginx.poll() is None, (self.folder / "main-error.log").read_text()
        self.url = f"wss://127.0.0.1:{self.port}{p.PATH}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pki):
    s = Stack(tmp_path_factory.mktemp("stack"), pki)
    yield s
    for proc in (s.nginx, s.node.proc):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


class TlsPeer(Peer):
    """helpers.Peer over wss, with a client certificate or none; closed after each test."""

    def __init__(self, url: str, pki, cert: Optional[str] = None,
                 header: Sequence[str] = ()) -> None:
        sslopt = {"ca_certs": str(pki["ca"][0])}
        if cert:
            sslopt.update(certfile=str(pki[cert][0]), keyfile=str(pki[cert][1]))
        self.ws = websocket.create_connection(url, sslopt=sslopt, header=list(header),
                                              timeout=5)
        OPEN_PEERS.append(self)


class PlainPeer(Peer):
    """helpers.Peer to the node itself (ws), from ``source``, the address it connects from."""

    def __init__(self, port: int, source: str, header: List[str]) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                        source_address=(source, 0))
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{p.PATH}",
                                              socket=sock, header=header, timeout=5)
        OPEN_PEERS.append(self)


def forged(pki, which: str) -> str:
    """The header nginx would send for ``which``'s certificate (URL-escaped PEM, as
    $ssl_client_escaped_cert): anyone can build it, certificates are public."""
    return f"{HEADER}: {quote(pki[which][0].read_text(), safe='')}"


def refused(peer: Peer) -> str:
    """The AUTH_FAILED message of a refused connection, after checking its close code."""
    msg = peer.recv()
    assert msg["type"] == "error" and msg["error"]["code"] == p.AUTH_FAILED, msg
    assert peer.close_code() == p.CLOSE_AUTH_FAILED
    return msg["error"]["message"]


def cert_agent(folder: Path, url: str, pki, which: str, device_id: str) -> AgentProcess:
    """A nexus-agent with ``which``'s certificate and key, the test CA, and no token."""
    folder.mkdir()
    path = write_config(folder, url, device_id, server={"ca_file": str(pki["ca"][0])})
    cfg = yaml.safe_load(path.read_text())
    del cfg["server"]["token_file"]
    cfg["server"].update(client_cert=str(pki[which][0]), client_key=str(pki[which][1]))
    path.write_text(yaml.safe_dump(cfg))
    return AgentProcess(path)


def test_the_shipped_file_passes_only_a_verified_certificate():
    text = SHIPPED.read_text()
    assert CERT_MAP in text and SET_HEADER in text
    assert "ssl_verify_client optional;" in text and "ssl_verify_depth" in text
    assert f"--client-cert-header {HEADER}" in text and "--trusted-proxy" in text
    # nexus.conf's token-free log stays (tests/test_cluster.py checks it on the other file).
    assert "log_format nexus_no_token" in text and "$args" not in text.split("log_format")[1]


def test_agents_with_certificates_are_stored_under_their_devices(stack, pki, tmp_path):
    """One device named by its SAN URI (its CN is a decoy), one by its CN; neither has a
    token, so without the header the node would refuse both."""
    agents = [cert_agent(tmp_path / "san", stack.url, pki, "san", "sensor-san"),
              cert_agent(tmp_path / "cn", stack.url, pki, "cn", "sensor-cn")]
    try:
        for device in ("sensor-san", "sensor-cn"):
            wait_for(lambda: len(stored(stack.db, device)) >= 3, 20,  # noqa: B023
                     what=f"telemetry of {device} stored")
    finally:
        for agent in agents:
            assert agent.stop() == 0
    assert stored(stack.db, "decoy-cn") == []


def test_a_forged_header_through_nginx_is_replaced(stack, pki):
    """No certificate, the device's certificate in the header: nginx drops the client's
    header (and sends none, nothing verified), so the node sees no credential at all."""
    peer = TlsPeer(stack.url, pki, header=[forged(pki, "san")])
    assert refused(peer) == "Missing authentication token"
    # With a certificate of its own, the forged header does not change who it is.
    peer = TlsPeer(stack.url, pki, cert="cn", header=[forged(pki, "san")])
    assert peer.recv()["type"] == "connected"
    msg = peer.request({"type": "telemetry", "id": "forged-1",
                        "timestamp": p.format_timestamp(1_750_000_000),
                        "payload": {"device_id": "sensor-san", "metrics": {"cpu_usage": 1}}})
    # It is sensor-cn (its certificate), and may not speak for sensor-san.
    assert msg["type"] == "error" and msg["error"]["code"] == p.FORBIDDEN, msg
    assert not any(r["id"] == "forged-1" for r in stored(stack.db, "sensor-san"))


def test_the_header_straight_to_the_node_is_taken_only_from_the_trusted_proxy(stack, pki):
    # The control: from nginx's address the header is the identity (what nginx relies on).
    peer = PlainPeer(stack.node.port, NGINX_ADDR, [forged(pki, "san")])
    assert peer.recv()["type"] == "connected"
    peer.close()
    # From anywhere else it is refused, even beside a valid token of that very device.
    peer = PlainPeer(stack.node.port, "127.0.0.1",
                     [forged(pki, "san"), f"Authorization: Bearer {mint('sensor-san')}"])
    assert refused(peer) == f"{HEADER} is taken only from a trusted proxy"
    wait_for(lambda: f"sent {HEADER} but is not a trusted proxy" in stack.node.log(), 5,
             what="the refusal in the node's log")
    assert "('127.0.0.1'," in stack.node.log()


def test_another_ca_is_refused_by_nginx_and_tokens_still_work(stack, pki, tmp_path):
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        TlsPeer(stack.url, pki, cert="stranger")
    assert bad.value.status_code == 400  # nginx: "The SSL certificate error"
    agent = cert_agent(tmp_path / "stranger", stack.url, pki, "stranger", "device-001")
    try:
        wait_for(lambda: agent.status().get("reconnects", 0) >= 2, 20,
                 what="the stranger's refused attempts")
        assert agent.proc.poll() is None
    finally:
        agent.stop()
    assert stored(stack.db, "device-001") == []
    # An operator (or the fleet page) with a token and no certificate: verify "optional".
    peer = TlsPeer(stack.url, pki, header=[f"Authorization: Bearer {mint('ops', 'operator')}"])
    assert peer.recv()["type"] == "connected"


def test_no_token_in_the_logs_of_the_shipped_file(stack, pki):
    """The page's ?token= through the mTLS file: logged by path only, as with nexus.conf."""
    access = stack.folder / "nexus-access.log"
    before = _lines(access)
    token = mint("ops-logged", "operator")
    ssl_ctx = {"ca_certs": str(pki["ca"][0]), "cert_reqs": ssl.CERT_REQUIRED}
    ws = websocket.create_connection(f"{stack.url}?token={token}", sslopt=ssl_ctx, timeout=5)
    try:
        assert p.decode(ws.recv()).type == "connected"
    finally:
        ws.close()
    # Written when the connection ends (earlier tests' lines are there already).
    wait_for(lambda: _lines(access) > before, 10, what="this connection's access log line")
    for log in stack.folder.glob("*.log"):
        assert token not in log.read_text() and "token=" not in log.read_text(), log.name


def _lines(path: Path) -> int:
    return path.read_text().count("GET /v1/ws ") if path.exists() else 0

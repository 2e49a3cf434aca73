"""The agent through an HTTP CONNECT proxy (``server.proxy``, or ``http_proxy`` from the
environment): a real agent, a real server, and the small proxy below on 127.0.0.1.

``ConnectProxy`` reads one CONNECT request, answers it as ``mode`` says, and for
``pass`` opens the tunnel and pumps bytes both ways (two threads per tunnel):

* ``pass``: ``200 Connection established`` (``407`` when ``credentials`` are set
  and the request's ``Proxy-Authorization`` does not carry them);
* ``refuse``: ``403 Forbidden``, then closed.

``die()`` closes the listener and resets every tunnel (the proxy process gone
mid-connection); ``revive()`` listens on the same port again.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import subprocess
import threading
from typing import List, Optional, Tuple

import pytest
from helpers import (
    AgentProcess,
    ServerProcess,
    child_env,
    outbox_ids,
    stored,
    wait_for,
    write_config,
)

from agent import transport
from agent.transport import proxy_options


class ConnectProxy:
    def __init__(self, credentials: Optional[Tuple[str, str]] = None) -> None:
        self.credentials = credentials
        self.mode = "pass"
        self.requests: List[str] = []  # request line and Proxy-Authorization of each CONNECT
        self.tunnels = 0
        self.upstream_bytes = bytearray()  # the first 64 KiB the agent sent through tunnels
        self._socks: List[socket.socket] = []
        self._lock = threading.Lock()
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: died
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = client.recv(1024)
            if not chunk:
                client.close()
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        auth = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("proxy-authorization:")), "")
        with self._lock:
            self.requests.append(f"{lines[0]} | {auth}")
        method, target = lines[0].split(" ")[:2]
        if self.mode == "refuse" or method != "CONNECT":
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        if self.credentials and auth != "Basic " + base64.b64encode(
                ":".join(self.credentials).encode()).decode():
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                           b"Proxy-Authenticate: Basic realm=\"test\"\r\n\r\n")
            client.close()
            return
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=5)
        upstream.settimeout(None)
        with self._lock:
            self._socks += [client, upstream]
            self.tunnels += 1
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b, seen in ((client, upstream, self.upstream_bytes), (upstream, client, None)):
            threading.Thread(target=_pump, args=(a, b, seen), daemon=True).start()

    def die(self) -> None:
        """The proxy is gone: no listener, every tunnel reset in the middle of whatever."""
        try:  # close() alone leaves a blocked accept() listening on Linux; shutdown wakes it
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _reset(sock)

    def revive(self) -> None:
        self._listen()


def _pump(src: socket.socket, dst: socket.socket, seen: Optional[bytearray]) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if seen is not None and len(seen) < 65536:
                seen += data
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


def _no_env_proxy():
    env = child_env()
    for key in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "NO_PROXY"):
        env.pop(key, None)
    return env


def _lost(agent, db) -> int:
    """Samples taken but neither stored by the server nor still queued (ids end in -seq)."""
    ids = [r["id"] for r in stored(db)]
    assert len(ids) == len(set(ids)), "a sample was stored twice"
    seqs = sorted(int(i.rsplit("-", 1)[1]) for i in set(ids) | set(outbox_ids(agent.state_dir)))
    return len(set(range(1, seqs[-1] + 1)) - set(seqs))


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "server.db"
    srv = ServerProcess(db=str(db))
    yield srv, db
    srv.stop()


def test_delivery_through_the_proxy_with_credentials_from_a_file(tmp_path, server):
    srv, db = server
    proxy = ConnectProxy(credentials=("edge", "pr0xy-s3cret"))
    auth = tmp_path / "proxy-auth"
    auth.write_text("edge:pr0xy-s3cret\n")
    auth.chmod(0o600)
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.2},
                                      server={"proxy": proxy.url,
                                              "proxy_auth_file": str(auth)}),
                         env=_no_env_proxy())
    try:
        wait_for(lambda: len(stored(db)) >= 5, timeout=20, what="samples through the proxy")
        assert proxy.tunnels >= 1
        server_hostport = srv.url.split("//")[1].split("/")[0]
        # HTTP/1.1 (websocket-client 0.57, Debian 11's, says 1.0: proxies take both)
        assert re.match(rf"CONNECT {re.escape(server_hostport)} HTTP/1\.[01] \| Basic ",
                        proxy.requests[0]), proxy.requests[0]
        assert agent.stop() == 0
        assert "pr0xy-s3cret" not in agent.log()  # debug level: nothing logs the credentials
        assert b"Authorization: Bearer " in proxy.upstream_bytes  # ws://: the proxy sees it
        assert _lost(agent, db) == 0
    finally:
        agent.kill()
        proxy.die()


def test_a_refusing_proxy_is_a_clear_error_with_backoff(tmp_path, server):
    srv, db = server
    proxy = ConnectProxy()
    proxy.mode = "refuse"
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.2},
                                      server={"proxy": proxy.url}), env=_no_env_proxy())
    try:
        wait_for(lambda: len(proxy.requests) >= 3, timeout=20, what="three refused attempts")
        status = agent.status()
        assert not status["connected"]
        assert f"through the proxy 127.0.0.1:{proxy.port}" in status["last_error"]
        assert "403" in status["last_error"], status["last_error"]
        assert agent.log().count("reconnecting in") >= 2  # the usual backoff, not a tight loop
        assert stored(db) == []
        proxy.mode = "pass"  # the proxy lets it through: the queued samples arrive
        wait_for(lambda: len(stored(db)) >= 5, timeout=20, what="delivery after the refusal")
        assert agent.stop() == 0
        assert _lost(agent, db) == 0
    finally:
        agent.kill()
        proxy.die()


def test_a_proxy_that_dies_mid_connection_loses_nothing(tmp_path, server):
    srv, db = server
    proxy = ConnectProxy()
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.1},
                                      server={"proxy": proxy.url, "ping_interval_s": 1,
                                              "ping_timeout_s": 1}), env=_no_env_proxy())
    try:
        wait_for(lambda: len(stored(db)) >= 5, timeout=20, what="samples through the proxy")
        proxy.die()
        wait_for(lambda: not agent.status().get("connected", True), timeout=10,
                 what="the agent to notice the proxy is gone")
        tunnels = proxy.tunnels
        wait_for(lambda: agent.status().get("queue_depth", 0) >= 10, timeout=20,
                 what="samples queued while the proxy is down")
        wait_for(lambda: "through the proxy" in agent.status()["last_error"], timeout=10,
                 what="a reconnect that names the proxy it cannot reach")
        proxy.revive()
        wait_for(lambda: agent.status().get("connected") and
                 agent.status().get("queue_depth", 99) <= 2, timeout=30,
                 what="the backlog to drain through the revived proxy")
        assert proxy.tunnels > tunnels  # it came back through the proxy, not around it
        assert agent.stop() == 0
        assert _lost(agent, db) == 0
    finally:
        agent.kill()
        proxy.die()


def test_the_proxy_from_the_environment_and_no_proxy(tmp_path, monkeypatch):
    """No server.proxy: https_proxy for wss://, http_proxy for ws://, unless no_proxy."""
    for key in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    ws = transport.import_websocket("ws://x")
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, None) == {}
    monkeypatch.setenv("http_proxy", "http://user:pw@proxy.example:3128")
    monkeypatch.setenv("https_proxy", "http://tls-proxy.example:8080")
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, None) == {
        "http_proxy_host": "proxy.example", "http_proxy_port": 3128,
        "http_proxy_auth": ("user", "pw"), "proxy_type": "http", "http_no_proxy": [""]}
    assert proxy_options(ws, "wss://nexus.example/v1/ws", None, None)["http_proxy_host"] == \
        "tls-proxy.example"
    auth = tmp_path / "auth"
    auth.write_text("file-user:file-pw\n")
    auth.chmod(0o600)
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, str(auth))[
        "http_proxy_auth"] == ("file-user", "file-pw")
    monkeypatch.setenv("no_proxy", "localhost,.example")
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, None) == {}
    monkeypatch.setenv("no_proxy", "example, 10.0.0.0/8")  # a name covers its subdomains
    assert proxy_options(ws, "ws://ws.nexus.example/v1/ws", None, None) == {}
    assert proxy_options(ws, "ws://10.1.2.3/v1/ws", None, None) == {}
    assert proxy_options(ws, "ws://127.0.0.1/v1/ws", None, None)["http_proxy_host"] == \
        "proxy.example"  # not exempt unless no_proxy says so (websocket-client 0.57 did)
    # curl's reading: "*" only alone; brackets, ports and trailing dots do not hide a match
    monkeypatch.setenv("no_proxy", "foo,*")
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, None) != {}
    monkeypatch.setenv("no_proxy", "*")
    assert proxy_options(ws, "ws://nexus.example/v1/ws", None, None) == {}
    monkeypatch.setenv("no_proxy", "[::1], nexus.example:443")
    assert proxy_options(ws, "ws://[::1]:8765/v1/ws", None, None) == {}
    assert proxy_options(ws, "ws://nexus.example./v1/ws", None, None) == {}
    assert proxy_options(ws, "ws://other.example/v1/ws", None, None) != {}
    # server.proxy wins over the environment's proxy
    assert proxy_options(ws, "ws://other.test/v1/ws", "http://cfg-proxy:3129", None)[
        "http_proxy_host"] == "cfg-proxy"


def test_the_agent_uses_http_proxy_from_its_environment(tmp_path, server):
    srv, db = server
    proxy = ConnectProxy()
    env = _no_env_proxy()
    env["http_proxy"] = proxy.url
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.2}),
                         env=env)
    try:
        wait_for(lambda: len(stored(db)) >= 3, timeout=20, what="samples through the proxy")
        assert proxy.tunnels >= 1
        assert agent.stop() == 0
    finally:
        agent.kill()
        proxy.die()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_wss_through_the_proxy_is_tls_end_to_end(tmp_path):
    """The proxy carries a wss:// connection it cannot read: no token, no header in clear."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    srv = ServerProcess(0, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
                        str(tmp_path / "key.pem"), db=str(tmp_path / "server.db"))
    proxy = ConnectProxy()
    agent = AgentProcess(write_config(tmp_path, srv.url, telemetry={"interval_s": 0.2},
                                      server={"proxy": proxy.url,
                                              "ca_file": str(tmp_path / "cert.pem")}),
                         env=_no_env_proxy())
    try:
        assert srv.url.startswith("wss://")
        wait_for(lambda: len(stored(tmp_path / "server.db")) >= 3, timeout=20,
                 what="telemetry over TLS through the proxy")
        assert proxy.tunnels >= 1 and proxy.upstream_bytes
        assert b"Bearer" not in proxy.upstream_bytes and b"device-001" not in \
            proxy.upstream_bytes
        assert agent.stop() == 0
    finally:
        agent.kill()
        proxy.die()
        srv.stop()


def test_provision_checks_the_server_through_the_proxy_and_writes_it(tmp_path, server):
    import stat
    import sys

    from helpers import REPO, mint

    from agent import config

    srv, _ = server
    proxy = ConnectProxy(credentials=("edge", "pr0xy-s3cret"))
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "token").write_text(mint("gw-5") + "\n")
    (incoming / "proxy").write_text("edge:pr0xy-s3cret\n")
    for name in ("token", "proxy"):
        (incoming / name).chmod(0o600)

    def provision(*extra):
        return subprocess.run([sys.executable, "-m", "agent", "provision", "--device-id", "gw-5",
                               "--server", srv.url, "--token-file", str(incoming / "token"),
                               "--config", str(tmp_path / "etc" / "agent.yaml"),
                               "--proxy", proxy.url, *extra], env=_no_env_proxy(), cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    try:
        out = provision()  # no credentials: the proxy says 407
        assert out.returncode == 4 and "the proxy wants credentials (HTTP 407)" in out.stderr
        assert not (tmp_path / "etc").exists()
        out = provision("--proxy-auth-file", str(incoming / "proxy"))
        assert out.returncode == 0, out.stderr
        assert proxy.tunnels == 1  # the check went through the proxy
        cfg = config.load(str(tmp_path / "etc" / "agent.yaml"))
        copied = tmp_path / "etc" / "proxy-auth"
        assert (cfg.server.proxy, cfg.server.proxy_auth_file) == (proxy.url, str(copied))
        assert copied.read_text() == "edge:pr0xy-s3cret\n"
        assert stat.S_IMODE(copied.stat().st_mode) == 0o600
        assert "pr0xy-s3cret" not in out.stdout + out.stderr
        proxy.mode = "refuse"
        out = provision("--proxy-auth-file", str(incoming / "proxy"), "--force")
        assert out.returncode == 4 and f"through the proxy 127.0.0.1:{proxy.port}" in out.stderr
    finally:
        proxy.die()

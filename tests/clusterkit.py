"""A cluster on loopback for the tests and bench/cluster.py: redis-server, nginx, nodes.

Each piece is started here, on free ports, with its files in a given folder; never the
system's services. ``missing()`` says why a cluster cannot run (the test then skips).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import List, Optional

from helpers import CHILDREN, REPO, ServerProcess, free_port, wait_for

# The balancing key of deploy/nginx/nexus.conf (a test checks they stay the same).
BALANCING_KEY = "hash $http_authorization$arg_token consistent;"


def missing() -> str:
    """'' when redis-server, nginx and redis-py are all here, else what is missing."""
    gone = [b for b in ("redis-server", "nginx") if shutil.which(b) is None
            and not Path(f"/usr/sbin/{b}").exists()]
    try:
        import redis  # noqa: F401
    except ImportError:
        gone.append("redis-py (the 'cluster' extra)")
    return ", ".join(gone)


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisProcess:
    """redis-server on 127.0.0.1, no persistence (a restart starts empty, as after a crash)."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.folder, self.port = folder, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "a")
        self.proc = subprocess.Popen(
            [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        CHILDREN.append(self.proc)
        wait_for(lambda: _listening(self.port), 10, what="redis-server listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


NGINX_CONF = """
worker_processes 1;  # with master_process off (tests), the one process serves
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $nexus_connection {{ default upgrade; '' close; }}
    upstream nexus_nodes {{
        {key}
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location /v1/ws {{
            proxy_pass http://nexus_nodes;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $nexus_connection;
            proxy_set_header Host $host;
            proxy_read_timeout 90s;
            proxy_send_timeout 90s;
            proxy_connect_timeout 2s;
            proxy_buffering off;
        }}
    }}
}}
"""


class NginxProcess:
    """nginx in the foreground in ``folder``, balancing over the given node ports."""

    def __init__(self, folder: Path, node_ports: List[int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;"
                            for p in node_ports)
        conf = folder / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=folder, key=BALANCING_KEY, servers=servers,
                                          port=self.port))
        self._log = folder / "error.log"
        self.proc = subprocess.Popen(
            [_binary("nginx"), "-p", str(folder), "-e", str(self._log), "-c", str(conf),
             # One process (no master): a test that fails and SIGKILLs it leaves no worker.
             "-g", "daemon off; master_process off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        wait_for(lambda: _listening(self.port) or self.proc.poll() is not None, 10,
                 what="nginx listening")
        assert self.proc.poll() is None, f"nginx did not start: {self.log()}"
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def log(self) -> str:
        return self._log.read_text() if self._log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def node(redis_url: str, name: str, db: Optional[Path] = None, *extra: str) -> ServerProcess:
    """A nexus-server node of the cluster (verbose log; no rate limit to speak of)."""
    return ServerProcess(0, "--redis", redis_url, "--node-id", name, "--rate-limit", "100000",
                         "-v", *extra, db=str(db) if db else None)


def in_cluster(srv: ServerProcess, timeout: float = 10.0) -> None:
    wait_for(lambda: "joined the cluster" in srv.log() or "redis back" in srv.log(), timeout,
             what="the node to join the cluster")


def holder(r, device_id: str) -> Optional[str]:  # type: ignore[no-untyped-def]
    """The node the registry names for ``device_id``."""
    return r.get(f"nexus:device:{device_id}")


DEPLOY_CONF = REPO / "deploy" / "nginx" / "nexus.conf"

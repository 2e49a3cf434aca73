"""Small real-socket helpers shared by the tests: a websocket-client peer, waits with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import websocket

SECRET = "test-secret-0123456789abcdef-0123456789"
REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def mint(subject: str, role: str = "device", ttl: float = 3600, secret: str = SECRET) -> str:
    from agent.server import tokens

    return tokens.mint(secret.encode(), subject, role, ttl)


OPEN_PEERS: List[Peer] = []
CHILDREN: List[subprocess.Popen] = []  # every server and agent started; killed after each test


class Peer:
    """A test client over a real socket; frames are JSON objects. Closed after each test."""

    def __init__(self, url: str, token: Optional[str] = None, header: bool = True,
                 timeout: float = 5.0, sockopt: tuple = ()) -> None:
        headers: List[str] = []
        if token and header:
            headers.append(f"Authorization: Bearer {token}")
        elif token:
            url = f"{url}?token={token}"
        self.ws = websocket.create_connection(url, header=headers, timeout=timeout,
                                              sockopt=sockopt)
        OPEN_PEERS.append(self)

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    def recv(self) -> Dict[str, Any]:
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError(f"closed with {close_code(data)}")
        return json.loads(data)

    def recv_type(self, type_: str, limit: int = 50) -> Dict[str, Any]:
        """The next message of ``type_``, skipping others (broadcasts, pongs)."""
        for _ in range(limit):
            msg = self.recv()
            if msg["type"] == type_:
                return msg
        raise AssertionError(f"no {type_} in {limit} messages")

    def request(self, obj: Dict[str, Any]) -> Dict[str, Any]:
        """Send ``obj`` and return the first reply that carries its id."""
        self.send(obj)
        for _ in range(50):
            msg = self.recv()
            if msg.get("id") == obj.get("id"):
                return msg
        raise AssertionError("no reply with the request's id")

    def close_code(self) -> Optional[int]:
        """Read until the server closes; the close code it sent."""
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return close_code(data)

    def close(self) -> None:
        self.ws.close(timeout=0.5)


def close_code(data: bytes) -> Optional[int]:
    return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None


def connected(url: str, subject: str = "device-001", role: str = "device") -> Peer:
    peer = Peer(url, mint(subject, role))
    assert peer.recv()["type"] == "connected"
    return peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds; reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def unit_env() -> Dict[str, str]:
    """The ``Environment=`` of the shipped unit (systemd/nexus-agent.service): benchmarks
    run the agent the way systemd does."""
    import shlex

    out: Dict[str, str] = {}
    for line in (REPO / "systemd" / "nexus-agent.service").read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line[len("Environment="):]):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    # Children may write bytecode: with it off (as on some machines) every agent and
    # server a test starts compiles the package again, about 40 ms each, hundreds of times.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update({"NEXUS_JWT_SECRET": SECRET, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class ServerProcess:
    """``nexus-server`` as a real subprocess on a chosen port."""

    def __init__(self, port: int = 0, *extra: str, db: Optional[str] = None) -> None:
        self.port = port or free_port()
        args = [sys.executable, "-m", "agent.server", "--port", str(self.port), *extra]
        if db:
            args += ["--db", db]
        # stderr goes to a file: a pipe nobody reads would block a chatty server
        self._log = tempfile.NamedTemporaryFile("w+", prefix="nexus-server-", suffix=".log")
        self.proc = subprocess.Popen(args, env=child_env(), stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=REPO)
        CHILDREN.append(self.proc)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert "listening on" in line, f"server did not start: {line!r} {self.log()}"
        self.url = line.split("listening on ", 1)[1].strip()

    def log(self) -> str:
        with open(self._log.name) as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; log() stays readable afterwards."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def write_config(folder: Path, url: str, device_id: str = "device-001",
                 token: Optional[str] = None, **sections: Dict[str, Any]) -> Path:
    """An agent config in ``folder`` with a 0600 token file; ``sections`` override defaults."""
    import yaml

    token_file = folder / "token"
    token_file.write_text((token or mint(device_id)) + "\n")
    token_file.chmod(0o600)
    cfg: Dict[str, Any] = {
        "device_id": device_id,
        "state_dir": str(folder / "state"),
        "log_level": "debug",
        "server": {"url": url, "token_file": str(token_file), "connect_timeout_s": 2,
                   "ping_interval_s": 2, "ping_timeout_s": 2, "ack_timeout_s": 5,
                   "max_messages_per_minute": 6000},
        "telemetry": {"interval_s": 0.2},
        "reconnect": {"base_delay_s": 0.05, "max_delay_s": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class AgentProcess:
    """``nexus-agent`` as a real subprocess; its log goes to ``folder/agent-N.log``."""

    count = 0

    def __init__(self, config: Path, *extra: str, env: Optional[Dict[str, str]] = None) -> None:
        AgentProcess.count += 1
        self.config = config
        self.state_dir = config.parent / "state"
        self.log_path = config.parent / f"agent-{AgentProcess.count}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config),
                                      *extra], env=env or child_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO)
        CHILDREN.append(self.proc)

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> Dict[str, Any]:
        """status.json as last written; fails at once if the agent died."""
        if self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def outbox_snapshot(state_dir: Path) -> Iterator[Optional[sqlite3.Connection]]:
    """A read-only connection to a copy of an agent's outbox (None when there is none yet).

    The agent holds ``outbox.db`` with SQLite's EXCLUSIVE locking (the default
    ``queue.lock``), so no other process can open it while it runs; a copy of the file and
    its WAL can be read. The copy is consistent: SQLite's recovery of the copied WAL keeps
    only whole commits, and the copy is taken again when the WAL was restarted (a new
    salt in its header) while it was made.
    """
    import shutil

    src = state_dir / "outbox.db"
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "outbox.db"
        for _ in range(20):
            if not src.exists():
                yield None
                return
            salt = _wal_salt(src)
            try:
                shutil.copyfile(src, dst)
                if Path(f"{src}-wal").exists():
                    shutil.copyfile(f"{src}-wal", f"{dst}-wal")
            except FileNotFoundError:  # removed meanwhile (a corrupt file set aside)
                continue
            if _wal_salt(src) == salt:
                break
            for stale in (dst, Path(f"{dst}-wal")):
                stale.unlink(missing_ok=True)
        db = sqlite3.connect(str(dst))
        try:
            yield db
        finally:
            db.close()


def _wal_salt(db_path: Path) -> bytes:
    try:
        with open(f"{db_path}-wal", "rb") as f:
            return f.read(32)[16:24]
    except FileNotFoundError:
        return b""


def queued_backlog(state_dir: Path, n: int, damage: Tuple[str, ...] = ()) -> List[str]:
    """``n`` samples of device-001 stored in the outbox of ``state_dir`` as an agent offline
    for a while would have them (the agent not running); their ids, oldest first.
    ``damage``: SQL run on the file before it is closed (a flipped cell, say)."""
    from agent import protocol as p
    from agent.codec import CODEC
    from agent.outbox import Outbox

    box = Outbox(CODEC, str(state_dir), 10**8)
    box._db.execute("PRAGMA synchronous=OFF")  # test set-up only
    ids = [box.put("telemetry", {"device_id": "device-001", "metrics": {
        "cpu_usage": 12.5, "memory_usage": 40.1, "n": i}},
        p.format_timestamp(1_750_000_000 + i)).id for i in range(n)]
    for sql in damage:
        box._db.execute(sql)
    box.close()
    return ids


def outbox_ids(state_dir: Path) -> List[str]:
    """Ids stored in an agent's outbox, oldest first (while it runs or after)."""
    with outbox_snapshot(state_dir) as db:
        if db is None:
            return []
        try:
            return [r[0] for r in db.execute(
                "SELECT (SELECT epoch FROM epochs WHERE first_seq <= seq "
                "ORDER BY first_seq DESC LIMIT 1) || '-' || seq FROM messages ORDER BY seq")]
        except sqlite3.OperationalError:  # not created yet
            return []


def stored(db_path: Path, device_id: str = "device-001") -> List[Dict[str, Any]]:
    """Telemetry rows a nexus-server kept in its --db file, in arrival order."""
    import sqlite3

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, sample_time, payload FROM telemetry WHERE device_id = ? "
                          "ORDER BY rowid", (device_id,)).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [{"id": r[0], "sample_time": r[1], "payload": json.loads(r[2])} for r in rows]


class FakeServer:
    """A WebSocket server in this process whose behaviour the test writes: a peer that lies,
    stalls, floods or fragments. ``handler(conn)`` runs once per connection (websockets'
    sync API); ``connections`` counts them."""

    def __init__(self, handler: Callable[[Any], None]) -> None:
        import threading

        from websockets.sync.server import serve

        self.connections = 0

        def counted(conn: Any) -> None:
            self.connections += 1
            handler(conn)

        self.server = serve(counted, "127.0.0.1", 0, compression=None, max_size=2**21,
                            ping_interval=None)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/v1/ws"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        FAKE_SERVERS.append(self)

    def close(self) -> None:
        self.server.shutdown()


FAKE_SERVERS: List[FakeServer] = []


def welcome(conn: Any) -> None:
    """Send the guide's ``connected`` message on ``conn``."""
    now = time.time()
    from agent import protocol as p

    conn.send(json.dumps({"type": "connected", "id": "w", "timestamp": p.format_timestamp(now),
                          "payload": {"client_id": "fake",
                                      "server_time": p.format_timestamp(now)}}))


def ack(conn: Any, msg_id: str) -> None:
    conn.send(json.dumps({"type": "ack", "id": msg_id, "timestamp": "2025-01-01T00:00:00.000Z"}))

"""Small real-socket helpers shared by the tests: a websocket-client peer, waits with deadlines."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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


class Peer:
    """A test client over a real socket; frames are JSON objects. Closed after each test."""

    def __init__(self, url: str, token: Optional[str] = None, header: bool = True,
                 timeout: float = 5.0) -> None:
        headers: List[str] = []
        if token and header:
            headers.append(f"Authorization: Bearer {token}")
        elif token:
            url = f"{url}?token={token}"
        self.ws = websocket.create_connection(url, header=headers, timeout=timeout)
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


def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
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
        self.proc = subprocess.Popen(args, env=child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert "listening on" in line, f"server did not start: {line!r} " + (
            self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None
            else "")
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

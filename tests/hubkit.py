"""What the hub's tests share: a peer that records closes and a client joined to a hub."""

from __future__ import annotations

from typing import List, Tuple

from agent.server.hub import Hub
from agent.server.tokens import Identity

NOW = 1_800_000_000.0


class FakePeer:
    def __init__(self) -> None:
        self.closed: List[Tuple[int, str]] = []

    def send(self, text: str) -> None:  # the hub returns texts; it never calls send
        raise AssertionError("the hub must not send")

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


def join(hub: Hub, subject: str, role: str = "device"):
    client, _ = hub.connect(Identity(subject, role, NOW + 3600), FakePeer(), NOW)
    return client


def handle_all(hub: Hub, client, text: str, now: float = NOW):
    """``hub.handle``, then ``hub.resume`` until a big batch is all handled (what the server
    does over several turns of its event loop)."""
    out = hub.handle(client, text, now)
    while client.job is not None:
        out += hub.resume(client, now)
    return out

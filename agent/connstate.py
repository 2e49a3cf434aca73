"""The connection's counters and facts, shared between the transport and the readers.

Rules:

* One writer: only the transport thread changes a :class:`ConnectionStats`
  (connected, reconnects, sent, acked...). Every other thread (the main
  loop's status, the agent's own health metrics) reads a :meth:`snapshot`.
* Every change and every snapshot holds the one lock, so a reader never sees
  half of an update (``sent`` and ``sent_items`` move together).
* A change of a *fact* (``connected``, ``last_error``, or a message set aside)
  calls ``on_fact`` on the writer's thread, after the lock is released; the
  service uses it to wake its main loop. Counters wake nobody.

Imports nothing of the agent, so any module may use it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional


@dataclass
class ConnectionStats:
    """Connection facts other threads read (``status``, the agent's own health metrics).
    Writes: transport only."""

    connected: bool = False
    reconnects: int = 0
    last_ack_at: Optional[float] = None
    clock_offset_s: Optional[float] = None
    token_expires: Optional[float] = None
    certificate_expires: Optional[float] = None  # the client certificate's notAfter
    last_error: str = ""
    sent: int = 0  # messages (a batch is one)
    sent_items: int = 0  # stored messages sent, resends included (a batch counts its items)
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Called (on the writer's thread) when a fact changes: connected, last_error, or a
    # message set aside. The service uses it to rewrite the status file at once, while
    # counters (sent, acked...) wait for its slower pace.
    on_fact: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    FACTS = ("connected", "last_error")

    def update(self, **changes: Any) -> None:
        with self.lock:
            fact = any(getattr(self, key) != changes[key] for key in self.FACTS
                       if key in changes)
            for key, value in changes.items():
                setattr(self, key, value)
        if fact:
            self.fact_changed()

    def add(self, key: str, amount: int = 1, **more: int) -> None:
        """Add to counters: ``add("sent")``, or several under one lock:
        ``add("sent", sent_items=3)``."""
        with self.lock:
            setattr(self, key, getattr(self, key) + amount)
            for other, value in more.items():
                setattr(self, other, getattr(self, other) + value)

    def acked_now(self, count: int, at: float) -> None:
        with self.lock:
            self.acked += count
            self.last_ack_at = at

    def fact_changed(self) -> None:
        if self.on_fact is not None:
            self.on_fact()

    def snapshot(self) -> ConnectionStats:
        with self.lock:
            return replace(self, lock=threading.Lock())

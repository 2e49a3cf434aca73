"""The one way in for whatever the agent sends: store it in the outbox, then wake the transport.

Rules:

* Inputs (through :meth:`Mailbox.sample`) and the command runner (through
  :meth:`Mailbox.post`) reach the transport only here: ``Outbox.put``, which
  returns once the message is stored (see ``queue.durability``), then one
  :meth:`Transport.wake`, a byte on a pipe. Both run on the caller's thread and
  neither waits on the transport; the transport reads the message from the
  outbox on its own thread.
* A sample's wire payload is ``{"device_id", "metrics"}`` with the metrics in
  the order the input produced them, byte for byte what the system sampler
  always sent (the outbox's compression dictionary is built around it).
  The sample's source name is not on the wire; neither are tags yet, so a
  sample with tags is refused (``ValueError``), never sent without them.
* The outbox's own failures come out as :class:`~agent.errors.NotStored`,
  saying whether a lock is being waited out (a lock that never ends is a
  stuck agent, a full disk is not); anything else comes through as it is.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Mapping, Optional

from . import protocol as p
from . import store
from .errors import NotStored
from .inputs import Sample
from .outbox import Outbox


class Mailbox:
    def __init__(self, outbox: Outbox, wake: Callable[[], None], device_id: str) -> None:
        self.outbox = outbox
        self.wake = wake
        self.device_id = device_id

    def post(self, type_: str, payload: Mapping[str, Any], ts: str,
             created: Optional[float] = None) -> None:
        """Store one message, then wake the transport (any thread)."""
        try:
            self.outbox.put(type_, payload, ts, created)
        except sqlite3.OperationalError as exc:
            raise NotStored(str(exc), waiting=store.is_locked(exc)) from None
        self.wake()

    def sample(self, sample: Sample) -> None:
        """Store one sample as a ``telemetry`` message, time-stamped with its sample time."""
        self.post("telemetry", telemetry_payload(self.device_id, sample),
                  p.format_timestamp(sample.time), sample.time)


def telemetry_payload(device_id: str, sample: Sample) -> Mapping[str, Any]:
    """The guide's telemetry payload for ``sample`` (see the module docstring)."""
    if sample.tags:
        raise ValueError(f"input {sample.source!r} sent tags, which the telemetry payload "
                         "does not carry yet")
    return {"device_id": device_id, "metrics": dict(sample.metrics)}

"""The one way in for whatever the agent sends: store it in the outbox, then wake the transport.

Rules:

* Inputs (through :meth:`Mailbox.sample`) and the command runner (through
  :meth:`Mailbox.post`) reach the transport only here: ``Outbox.put``, which
  returns once the message is stored (see ``queue.durability``), then one
  :meth:`Transport.wake`, a byte on a pipe. Both run on the caller's thread and
  neither waits on the transport; the transport reads the message from the
  outbox on its own thread.
* A sample's wire payload: the system input's is ``{"device_id", "metrics"}``
  with the metrics in the order the input produced them, byte for byte what
  the system sampler always sent (the guide's payload; the outbox's first
  compression dictionary is built around it). Every other source's is
  ``{"device_id", "source", "metrics", "tags"}`` in that order, ``tags`` only
  when there are some (the outbox's second dictionary is built around it). The
  sample's own time is the envelope's ``timestamp``, as it always was.
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

SYSTEM_SOURCE = "system"  # its samples are the guide's payload, without source or tags


class Mailbox:
    def __init__(self, outbox: Outbox, wake: Callable[[], None], device_id: str) -> None:
        self.outbox = outbox
        self.wake = wake
        self.device_id = device_id

    def post(self, type_: str, payload: Mapping[str, Any], ts: str,
             created: Optional[float] = None) -> str:
        """Store one message, then wake the transport (any thread); its permanent id."""
        try:
            record = self.outbox.put(type_, payload, ts, created)
        except sqlite3.OperationalError as exc:
            raise NotStored(str(exc), waiting=store.is_locked(exc)) from None
        except store.StoreError as exc:  # a fresh file after a corrupt one cannot be had yet
            raise NotStored(str(exc), waiting=False) from None
        self.wake()
        return record.id

    def sample(self, sample: Sample) -> str:
        """Store one sample as a ``telemetry`` message, time-stamped with its sample time;
        its message id (the socket input answers ``ok <id>``)."""
        return self.post("telemetry", telemetry_payload(self.device_id, sample),
                         p.format_timestamp(sample.time), sample.time)


def telemetry_payload(device_id: str, sample: Sample) -> Mapping[str, Any]:
    """The telemetry payload for ``sample`` (see the module docstring)."""
    if sample.source == SYSTEM_SOURCE:
        if sample.tags:
            raise ValueError("the system input's samples carry no tags")
        return {"device_id": device_id, "metrics": dict(sample.metrics)}
    return p.telemetry_payload(device_id, dict(sample.metrics), sample.source,
                               dict(sample.tags))

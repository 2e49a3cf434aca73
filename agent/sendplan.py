"""Which stored messages go next on a connection: live first, then the backlog, as
batches when the server offers them.

Beside the queue (``outbox.py``) and over its cursors: the queue owns what a
position means (a replaced file restarts them); this module owns only the order
and the batching. Rules:

* Two cursors: ``backlog`` (seqs up to ``boundary``, what was waiting at
  connect) and ``live`` (above it). Both read a few rows at a time, never the
  whole backlog.
* Live goes first, so a sample taken now leaves within one interval however
  long the backlog; the backlog takes what the pace leaves. A lone live
  record goes alone; when several wait (an application writing to the ingest
  socket faster than the pace of single messages) and batches are offered,
  they go as a batch, in order: so a system sample waits behind at most one
  batch of application samples, never behind an ever-growing live queue.
* With a ``batch`` offer the backlog's telemetry goes out as lists of (id, item
  text) within both of the offer's limits and ``max_batch_bytes``; a record
  that is not telemetry of this device goes alone, after the batch.
"""

from __future__ import annotations

import collections
import json
from typing import Callable, Deque, List, Optional, Tuple, Union

from . import protocol as p
from .codec import Record
from .outbox import Outbox

# What we send in one telemetry.batch, whatever is offered: each batch is built, encoded
# and masked in memory (a few copies of it at once), and a Pi's RAM is not ours. 256 KiB
# still moves a day at 1 s (86,400 samples) in under 4 minutes at 30 spare messages a minute.
MAX_BATCH_BYTES = 256 * 1024
BATCH_ENVELOPE_BYTES = 512  # type, id, timestamp, device id and punctuation
BATCH_READ_ROWS = 100  # rows read from the outbox at a time while a batch is put together


class SendPlan:
    """Which stored messages go next on this connection (see the module docstring)."""

    def __init__(self, outbox: Outbox[Record], boundary: int, rows: int,
                 batch: Optional[p.BatchOffer] = None, device_id: str = "",
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self.rows = rows
        self.batch = batch
        self.device_id = device_id
        self.max_batch_bytes = max_batch_bytes
        # The outbox is read only when it may hold something unread: live rows after a
        # wake-up (every put is followed by one, see ``new_rows``), backlog rows until a
        # read comes back short (nothing is ever added at or below the boundary). An idle
        # or steady connection used to run two empty queries on every pass of the loop.
        self.live = outbox.cursor(after=boundary)
        self.backlog = outbox.cursor(after=0, upto=boundary)
        self._live: Deque[Record] = collections.deque()
        self._backlog: Deque[Record] = collections.deque()

    def new_rows(self) -> None:
        """Something may have been put since the last read (the transport was woken)."""
        self.live.more()

    def _refill_live(self, rows: int = 0) -> bool:
        if not self._live:
            self._live.extend(self.live.read(rows or self.rows))
        return bool(self._live)

    def _refill_backlog(self, rows: int) -> bool:
        if not self._backlog:
            self._backlog.extend(self.backlog.read(rows))
        return bool(self._backlog)

    def next(self, batch_allowed: bool = True
             ) -> Union[Record, List[Tuple[str, str]], None]:
        """A record to send alone, or a batch as (id, item text) pairs, or None.
        ``batch_allowed`` False (a batch is still in flight): live records only."""
        if self.live.replaced() | self.backlog.replaced():  # both see it (no short circuit)
            self._live.clear()  # records of the old file: their ids mean nothing now
            self._backlog.clear()
        if self._refill_live():
            if self.batch is not None and batch_allowed and len(self._live) > 1:
                items = self._next_batch(self.batch, self._live, self._refill_live)
                if items:
                    return items
            return self._live.popleft()
        if self.batch is not None:
            if not batch_allowed:
                return None
            items = self._next_batch(self.batch, self._backlog, self._refill_backlog)
            if items:
                return items
        return self._backlog.popleft() if self._refill_backlog(self.rows) else None

    def _next_batch(self, offer: p.BatchOffer, buf: Deque[Record],
                    refill: Callable[[int], bool]) -> List[Tuple[str, str]]:
        """Telemetry from the front of ``buf`` (the backlog's or live), up to both limits
        (may be []). Only ids and item texts are kept: the records go as soon as read."""
        room = min(offer.max_bytes, self.max_batch_bytes) - BATCH_ENVELOPE_BYTES
        items: List[Tuple[str, str]] = []
        while len(items) < offer.max_items and refill(BATCH_READ_ROWS):
            text = batch_item_text(buf[0], self.device_id)
            if text is None:
                break  # not telemetry of this device: it goes alone, after this batch
            size = len(text.encode("utf-8")) + 1
            if size > room:
                break
            room -= size
            items.append((buf.popleft().id, text))
        return items


def batch_item_text(record: Record, device_id: str) -> Optional[str]:
    """The batch item for a stored telemetry message of ``device_id``, else None."""
    if record.type != "telemetry":
        return None
    try:
        payload = json.loads(record.payload)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("device_id") != device_id or \
            "metrics" not in payload or not set(payload) <= _ITEM_KEYS:
        return None
    return p.batch_item_text(record.id, record.ts, payload["metrics"], payload.get("source"),
                             payload.get("tags"))


# What a stored telemetry payload may hold to go in a batch item (anything else: alone).
_ITEM_KEYS = frozenset(("device_id", "source", "metrics", "tags"))

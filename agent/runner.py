"""Command requests from the server -> allow-list -> executor -> result in the outbox.

Rules and guarantees:

* ``submit`` never blocks the transport thread: it checks, records and hands
  the work to a worker thread through a ``queue.SimpleQueue``.
* At most once: every command id is written to the ledger (``commands.db`` in
  ``state_dir``, SQLite WAL) *before* it runs. A redelivered id is never run
  again: its stored result is put in the outbox again; an id whose run was cut
  short by an agent restart is reported ``failed`` with that reason.
* Results (``succeeded``, ``failed``, ``rejected``, ``timed_out``) go through
  the outbox like telemetry, so a result produced offline arrives later. A
  result always fits in one message: when stdout and stderr together would
  take it over ``protocol.MAX_MESSAGE_BYTES`` they are cut (stderr keeps at
  least half the room if it needs it) and the cut is marked in the text.
* The ledger opens like the outbox (``store.open_db``): a lock is waited out,
  an unwritable disk is reported, and a corrupt ledger is moved aside (the ids
  it held could then run again; the log says so).
* At most ``max_concurrent`` commands run at once and ``max_queued`` wait;
  past that a request is ``rejected`` as busy.
* Every request, accepted or not, is one line on the ``nexus.audit`` logger
  with its id, name, arguments and outcome.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import commands, executor, store
from . import protocol as p
from .config import CommandsConfig
from .errors import CommandRejected
from .outbox import Outbox

log = logging.getLogger("nexus.commands")
audit = logging.getLogger("nexus.audit")

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    command_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,          -- accepted | done
    result TEXT,                  -- the command.result payload, once done
    updated REAL NOT NULL
);
"""
LEDGER_MAX_ROWS = 10_000
CUT_MARK = "\n[cut: {n} more characters, to fit the protocol's message size limit]"
ENVELOPE_ROOM = 512  # type, id, timestamp and JSON punctuation around the payload


@dataclass(frozen=True)
class Job:
    """An accepted command, handed from the transport thread to a worker."""

    request: p.CommandRequest
    argv: List[str]
    timeout_s: float
    user: Optional[str]


def fit_result(result: p.CommandResult, limit: int = p.MAX_MESSAGE_BYTES) -> p.CommandResult:
    """``result`` with stdout/stderr cut so that its whole message fits in ``limit`` bytes."""
    bare = len(p.dumps({**result.to_payload(), "stdout": "", "stderr": ""}).encode("utf-8"))
    room = limit - bare - ENVELOPE_ROOM - 2 * len(CUT_MARK.format(n=10**9))
    out_size, err_size = _json_size(result.stdout), _json_size(result.stderr)
    if out_size + err_size <= room + 2 * len(CUT_MARK.format(n=10**9)):
        return result
    err_room = min(err_size, max(room // 2, room - out_size))
    return p.CommandResult(result.command_id, result.device_id, result.status, result.exit_code,
                           _cut(result.stdout, room - err_room), _cut(result.stderr, err_room),
                           result.duration_ms)


def _json_size(text: str) -> int:
    """Bytes ``text`` takes inside a JSON string (escapes counted)."""
    return len(p.dumps(text).encode("utf-8")) - 2


def _cut(text: str, room: int) -> str:
    if _json_size(text) <= room:
        return text
    low, high = 0, len(text)  # the longest prefix that fits: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if _json_size(text[:mid]) <= room:
            low = mid
        else:
            high = mid - 1
    return text[:low] + CUT_MARK.format(n=len(text) - low)


class CommandRunner:
    def __init__(self, config: CommandsConfig, device_id: str, state_dir: str, outbox: Outbox,
                 wake: Callable[[], None]) -> None:
        self.config = config
        self.device_id = device_id
        self.outbox = outbox
        self.wake = wake
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = store.open_db(
            os.path.join(state_dir, "commands.db"), lambda db: db.executescript(LEDGER_SCHEMA),
            what="command ledger")
        self._work: queue.SimpleQueue[Optional[Job]] = queue.SimpleQueue()
        self._waiting = 0
        self._workers: List[threading.Thread] = []
        self._recover()

    def _recover(self) -> None:
        """Commands that were accepted but never finished: the agent stopped mid-run."""
        assert self._db is not None
        rows = self._db.execute("SELECT command_id, name FROM ledger WHERE state = 'accepted'"
                                ).fetchall()
        for command_id, name in rows:
            self._finish(command_id, name, {}, executor.Outcome(
                "failed", None, "", "the agent restarted before this command finished; "
                "it was not run again", 0))

    def start(self) -> None:
        for i in range(self.config.max_concurrent):
            worker = threading.Thread(target=self._work_loop, name=f"nexus-cmd-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def alive(self) -> bool:
        return all(w.is_alive() for w in self._workers)

    # ------------------------------------------------------------------ intake (transport thread)

    def submit(self, request: p.CommandRequest) -> None:
        seen = self._lookup(request.command_id)
        if seen is not None:
            state, result = seen
            audit.info("command %s %s args=%s: already %s, not run again", request.command_id,
                       request.name, json.dumps(dict(request.args)), state)
            if result is not None:
                self._put_result(json.loads(result))
            return
        try:
            spec, argv = commands.resolve(self.config.allow, request.name, request.args)
            with self._lock:
                if self._waiting >= self.config.max_concurrent + self.config.max_queued:
                    raise CommandRejected(f"busy: {self._waiting} commands running or queued")
                self._waiting += 1
        except CommandRejected as exc:
            self._finish(request.command_id, request.name, request.args,
                         executor.Outcome("rejected", None, "", exc.reason, 0))
            return
        self._record(request.command_id, request.name, "accepted", None)
        audit.info("command %s %s args=%s: accepted, runs %s", request.command_id, request.name,
                   json.dumps(dict(request.args)), executor.describe(argv))
        self._work.put(Job(request, argv, spec.timeout_s, spec.run_as))

    # ------------------------------------------------------------------ workers

    def _work_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            request = job.request
            try:
                outcome = executor.run(job.argv, job.timeout_s, self.config.max_output_bytes,
                                       job.user)
            except Exception as exc:  # noqa: BLE001 - a worker must survive any failure
                outcome = executor.Outcome("failed", None, "", f"agent error: {exc}", 0)
            finally:
                with self._lock:
                    self._waiting -= 1
            self._finish(request.command_id, request.name, request.args, outcome)

    def _finish(self, command_id: str, name: str, args: Any, outcome: executor.Outcome) -> None:
        if self._db is None:  # stopping: the ledger still says "accepted", reported on restart
            log.warning("command %s finished while the agent was stopping", command_id)
            return
        result = fit_result(p.CommandResult(command_id, self.device_id, outcome.status,
                                            outcome.exit_code, outcome.stdout, outcome.stderr,
                                            outcome.duration_ms))
        payload = result.to_payload()
        self._record(command_id, name, "done", json.dumps(payload))
        reason = f" ({outcome.stderr})" if outcome.status == "rejected" else ""
        audit.info("command %s %s args=%s: %s exit=%s in %d ms%s", command_id, name,
                   json.dumps(dict(args)), outcome.status, outcome.exit_code,
                   outcome.duration_ms, reason)
        self._put_result(payload)

    def _put_result(self, payload: Dict[str, Any]) -> None:
        self.outbox.put("command.result", payload, p.format_timestamp(time.time()))
        self.wake()

    # ------------------------------------------------------------------ ledger

    def _lookup(self, command_id: str) -> Optional[Tuple[str, Optional[str]]]:
        with self._lock:
            if self._db is None:
                return None
            return self._db.execute("SELECT state, result FROM ledger WHERE command_id = ?",
                                    (command_id,)).fetchone()

    def _record(self, command_id: str, name: str, state: str, result: Optional[str]) -> None:
        with self._lock:
            if self._db is None:
                return
            self._db.execute("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?, ?)",
                             (command_id, name, state, result, time.time()))
            self._db.execute("DELETE FROM ledger WHERE rowid <= (SELECT MAX(rowid) FROM ledger)"
                             " - ?", (LEDGER_MAX_ROWS,))

    def close(self) -> None:
        """Stop the workers (a running command is waited for up to its timeout)."""
        for _ in self._workers:
            self._work.put(None)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

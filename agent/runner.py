"""Command requests from the server -> allow-list -> executor -> result in the outbox.

Rules and guarantees:

* One way in, one way out. Requests come from the transport through
  ``requests``, a ``queue.SimpleQueue`` the service gives both; the transport
  only puts them there and never waits on this module. Results leave through
  the mailbox (``Mailbox.post``: the outbox, then a wake-up of the transport).
  Nothing here holds the transport, and the transport holds nothing of this.
* Threads: the intake (``nexus-cmd-intake``) takes each request, looks it up
  in the ledger, checks it against the allow-list, records it and hands it
  to a worker (``nexus-cmd-N``) through a second ``SimpleQueue``. The
  ledger's writes (``synchronous=FULL``) happen on these threads only. Each
  stops at a ``None`` put on its queue by :meth:`CommandRunner.close`.
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
from typing import Any, Dict, List, Optional, Tuple

from . import commands, executor, store
from . import protocol as p
from .config import CommandsConfig
from .errors import CommandRejected
from .mailbox import Mailbox

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
INTAKE_STOP_S = 1.0  # close() waits this long for the intake to take what was handed over


@dataclass(frozen=True)
class Job:
    """An accepted command, handed from the intake thread to a worker."""

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
    def __init__(self, config: CommandsConfig, device_id: str, state_dir: str,
                 requests: queue.SimpleQueue[Optional[p.CommandRequest]],
                 mailbox: Mailbox) -> None:
        self.config = config
        self.device_id = device_id
        self.requests = requests
        self.mailbox = mailbox
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = store.open_db(
            os.path.join(state_dir, "commands.db"), lambda db: db.executescript(LEDGER_SCHEMA),
            what="command ledger")
        self._work: queue.SimpleQueue[Optional[Job]] = queue.SimpleQueue()
        self._waiting = 0
        self._threads: List[threading.Thread] = []

    def _report_interrupted(self) -> None:
        """Commands that were accepted but never finished: the agent stopped mid-run."""
        with self._lock:
            if self._db is None:  # closed before the intake began
                return
            rows = self._db.execute("SELECT command_id, name FROM ledger WHERE state = "
                                    "'accepted'").fetchall()
        for command_id, name in rows:
            self._finish(command_id, name, {}, executor.Outcome(
                "failed", None, "", "the agent restarted before this command finished; "
                "it was not run again", 0))

    def start(self) -> None:
        """Start the intake (which first reports what a restart cut short) and the workers."""
        targets = [("nexus-cmd-intake", self._intake_loop)] + [
            (f"nexus-cmd-{i}", self._work_loop) for i in range(self.config.max_concurrent)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ intake (its own thread)

    def _intake_loop(self) -> None:
        try:
            self._report_interrupted()
        except Exception:  # noqa: BLE001 - the requests must still be taken
            log.exception("cannot report the commands a restart cut short")
        while True:
            request = self.requests.get()
            if request is None:
                return
            try:
                self.take(request)
            except Exception:  # noqa: BLE001 - one bad request must not stop the intake
                log.exception("command %s could not be taken", request.command_id)

    def take(self, request: p.CommandRequest) -> None:
        """Look ``request`` up, check it, record it and queue it for a worker (intake)."""
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
        self.mailbox.post("command.result", payload, p.format_timestamp(time.time()))

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
        """Stop the intake, then the workers, then close the ledger; safe to call twice.

        The transport must be stopped first. The intake takes every request put before
        its ``None`` (each recorded as accepted or rejected, waited for up to
        ``INTAKE_STOP_S``); a running command is not waited for: its result is not
        recorded, and the next start reports it as cut short.
        """
        self.requests.put(None)
        if self._threads:  # started: the intake is the first thread
            self._threads[0].join(INTAKE_STOP_S)
        for _ in range(self.config.max_concurrent):
            self._work.put(None)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

"""Command requests from the server -> allow-list -> executor -> result in the outbox.

Rules and guarantees:

* ``submit`` never blocks the transport thread: it checks, records and hands
  the work to a worker thread through a ``queue.SimpleQueue``.
* At most once: every command id is written to the ledger (``commands.db`` in
  ``state_dir``, SQLite WAL) *before* it runs. A redelivered id is never run
  again: its stored result is put in the outbox again; an id whose run was cut
  short by an agent restart is reported ``failed`` with that reason.
* Results (``succeeded``, ``failed``, ``rejected``, ``timed_out``) go through
  the outbox like telemetry, so a result produced offline arrives later.
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
from typing import Any, Callable, Dict, List, Optional

from . import commands, executor
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


class CommandRunner:
    def __init__(self, config: CommandsConfig, device_id: str, state_dir: str, outbox: Outbox,
                 wake: Callable[[], None]) -> None:
        self.config = config
        self.device_id = device_id
        self.outbox = outbox
        self.wake = wake
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(state_dir, "commands.db"),
                                   check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(LEDGER_SCHEMA)
        self._work: queue.SimpleQueue[Optional[Dict[str, Any]]] = queue.SimpleQueue()
        self._waiting = 0
        self._workers: List[threading.Thread] = []
        self._recover()

    def _recover(self) -> None:
        """Commands that were accepted but never finished: the agent stopped mid-run."""
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
        self._work.put({"request": request, "argv": argv, "timeout": spec.timeout_s,
                        "user": spec.run_as})

    # ------------------------------------------------------------------ workers

    def _work_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            request: p.CommandRequest = job["request"]
            try:
                outcome = executor.run(job["argv"], job["timeout"],
                                       self.config.max_output_bytes, job["user"])
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
        result = p.CommandResult(command_id, self.device_id, outcome.status, outcome.exit_code,
                                 outcome.stdout, outcome.stderr, outcome.duration_ms)
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

    def _lookup(self, command_id: str) -> Optional[tuple]:
        with self._lock:
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
                self._db = None  # type: ignore[assignment]

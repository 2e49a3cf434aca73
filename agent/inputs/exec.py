"""Script inputs: run a program every ``interval_s`` and store the samples it prints.

Section ``inputs.exec``, a list (:class:`ExecEntry`); one input per entry, each on
its own thread (``nexus-input-<name>``). Rules:

* The argv runs through ``executor.run``: never a shell, a clean environment,
  its own process group, SIGTERM then SIGKILL to the whole group at
  ``timeout_s``, stdout and stderr read as they come and capped at
  ``MAX_OUTPUT_BYTES`` each.
* Each stdout line is a sample as on the ingest socket (``inputs/_lines.py``:
  JSON or line protocol). The entry's ``name`` is the samples' source, whatever
  a line says (a JSON ``source`` or a measurement is required by the format and
  replaced); a line's own time is kept, else the time the run started.
* Its stderr lines are logged (at most ``STDERR_LINES`` a run, each cut at 300
  characters), as the script's own words.
* A run that fails (a non-zero exit, a timeout, a line that is not a sample,
  nothing printed) is counted (``refused``, ``timeouts``: a script's fault is
  not the agent's, so it never makes the agent unhealthy); the samples of its
  good lines are still stored. Its outcome is logged **once per change** (ok
  -> exit 2 -> timed out -> ok...), never once per run: a broken script at 10 s
  would otherwise write 8,640 lines a day.
* The next run starts ``interval_s`` after the previous one started (never two
  at once; a run longer than that delays the next, with no burst after).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from ..errors import ConfigError, ProtocolError
from . import STUCK_GRACE_S, InputEnv, InputHealth, PolledInput, Sample, Store
from . import _lines, _settings

SECTION = "inputs.exec"
MAX_OUTPUT_BYTES = 65536  # of stdout, and of stderr, per run
STDERR_LINES = 10
RESERVED = ("system", "socket", "modbus")  # the other inputs' names (threads are named by
# source)

KILL_GRACE_S = 1.0  # executor.KILL_GRACE_S: SIGTERM to SIGKILL

if TYPE_CHECKING:  # the executor (subprocess, selectors) is loaded only with a script input
    from .. import executor

log = logging.getLogger("nexus.inputs.exec")


@dataclass(frozen=True)
class ExecEntry:
    name: str
    argv: Tuple[str, ...]
    interval_s: float = 10.0
    timeout_s: float = 5.0


def check(raw: Any, key: str, base_dir: str) -> Tuple[ExecEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(key, "must be a list of {name, argv, interval_s, timeout_s}")
    entries: List[ExecEntry] = []
    for index, item in enumerate(raw):
        path = f"{key}[{index}]"
        values = _settings.mapping(item, path, ("name", "argv", "interval_s", "timeout_s"))
        for required in ("name", "argv"):
            if required not in values:
                raise ConfigError(f"{path}.{required}", "is required")
        try:
            name = _lines.check_source(values["name"])
        except _lines.LineError as exc:
            raise ConfigError(f"{path}.name", exc.reason) from None
        if name in RESERVED or name in [e.name for e in entries]:
            raise ConfigError(f"{path}.name", f"{name!r} is taken (names are unique, and "
                              f"not {' or '.join(RESERVED)})")
        argv = values["argv"]
        if not isinstance(argv, list) or not argv:
            raise ConfigError(f"{path}.argv", "must be a non-empty list of strings (no shell: "
                              "one string per argument)")
        for i, arg in enumerate(argv):
            _settings.text(arg, f"{path}.argv[{i}]")
        entries.append(ExecEntry(
            name, tuple(argv),
            _settings.number(values.get("interval_s", 10.0), f"{path}.interval_s", 0.1, 86400),
            _settings.number(values.get("timeout_s", 5.0), f"{path}.timeout_s", 0.1, 3600)))
    return tuple(entries)


def _outcome_kind(outcome: executor.Outcome, bad_lines: int, samples: int) -> str:
    """A run's outcome as logged once per change: ``ok`` or what went wrong."""
    if outcome.status == "timed_out":
        return "timed out"
    if outcome.status != "succeeded":
        return f"exit {outcome.exit_code}" if outcome.exit_code is not None else "cannot start"
    if bad_lines:
        return "printed lines that are not samples"
    if not samples:
        return "printed no sample"
    return "ok"


class ExecInput(PolledInput):
    def __init__(self, entry: ExecEntry, on_fact: Any) -> None:
        super().__init__(entry.name, SECTION, entry.interval_s, on_fact)
        self.entry = entry
        self.last_kind = "ok"  # what the last run came to (logged when it changes)
        self._running_since: Optional[float] = None  # monotonic start of the run under way

    def health(self) -> InputHealth:
        """Stuck only when a run outlives its timeout and the kill (the thread hangs): a
        script that fails or prints nothing is counted, never a reason to restart the
        agent."""
        since = self._running_since
        stuck = since is not None and time.monotonic() - since > \
            self.entry.timeout_s + KILL_GRACE_S + 5.0 + STUCK_GRACE_S
        return replace(self.counted(None), stuck=stuck)

    def once(self, store: Store) -> None:
        self._running_since = time.monotonic()
        try:
            self._run(store)
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the input
            self._failed(f"running input {self.source} failed: {exc!r}", traceback=True,
                         progress=False)
        finally:
            self._running_since = None

    def _run(self, store: Store) -> None:
        from .. import executor

        started = time.time()
        outcome = executor.run(self.entry.argv, self.entry.timeout_s, MAX_OUTPUT_BYTES)
        self._log_stderr(outcome.stderr)
        bad: List[str] = []
        stored = 0
        for number, line in enumerate(outcome.stdout.splitlines(), 1):
            if not line.strip() or line.startswith("[truncated: "):
                continue
            try:
                sample = _lines.parse(line, started)
                stored += self.store_one(store, Sample(self.source, sample.time,
                                                       sample.metrics, sample.tags)) is not None
            except _lines.LineError as exc:
                bad.append(f"line {number}: {exc.field}: {exc.reason}")
            except (ProtocolError, ValueError) as exc:  # over the wire's limits
                bad.append(f"line {number}: {exc}")
        kind = _outcome_kind(outcome, len(bad), stored)
        if kind != "ok":
            self._refuse(timed_out=outcome.status == "timed_out")
        self._log_change(kind, outcome, bad)

    def _log_stderr(self, stderr: str) -> None:
        lines = stderr.splitlines()
        for line in lines[:STDERR_LINES]:
            log.info("input %s says: %s", self.source, line[:300])
        if len(lines) > STDERR_LINES:
            log.info("input %s: %d more stderr lines not logged", self.source,
                     len(lines) - STDERR_LINES)

    def _log_change(self, kind: str, outcome: executor.Outcome, bad: List[str]) -> None:
        from ..executor import describe

        if kind == self.last_kind:
            return
        before, self.last_kind = self.last_kind, kind
        if kind == "ok":
            log.warning("input %s works again (%s before); failed runs in all: %d",
                        self.source, before, self.health().refused)
            return
        detail = f": {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") \
            if bad else ""
        if kind == "cannot start":
            detail = f": {outcome.stderr[:300]}"
        log.error("input %s (%s) %s%s; counted in status (refused, timeouts), logged again "
                  "when that changes", self.source, describe(list(self.entry.argv)),
                  kind, detail)

    def configure(self, section: Any) -> None:
        for entry in section:
            if entry.name == self.entry.name:
                if entry.argv != self.entry.argv or entry.timeout_s != self.entry.timeout_s:
                    break  # more than the interval: a restart (logged below)
                self.interval_s = entry.interval_s
                return
        super().configure(section)


def build(section: Tuple[ExecEntry, ...], env: InputEnv) -> List[ExecInput]:
    return [ExecInput(entry, env.on_fact) for entry in section]


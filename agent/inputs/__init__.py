"""What an input is, and the registry that builds inputs from their config sections.

Rules:

* An input produces :class:`Sample` values (a source name, the sample time,
  numeric metrics, string tags) and reports its own health
  (:class:`InputHealth`: samples stored, failures, the last success, stuck or
  not). It knows nothing of the outbox, the transport or the wire: it hands
  each sample to the ``store`` it is given (the service passes
  ``Mailbox.sample``), which raises :class:`~agent.errors.NotStored` when the
  outbox cannot take it.
* Each input runs on its own thread (``nexus-input-<source>``), started by the
  service, until the ``stop`` Event is set. Its health counters change on that
  thread only, under the input's lock; other threads read ``health()``.
* Whatever an input needs from the rest of the agent comes in through
  :class:`InputEnv` when it is built (the agent's own health figures, the wake-up
  for the status file), never by reading another module's state.
* The registry: every module of this package whose name does not start with
  ``_`` is an input kind. It declares ``SECTION``, the name of the config
  section it reads, on a line of its own (``SECTION = "inputs.socket"``: the
  registry reads that line, and imports only the modules of the sections a
  config has), and ``build(section, env)``, which returns an :class:`Input`
  (or a list of them); a kind under the config's ``inputs`` mapping
  (``inputs.<kind>``) also declares ``check(raw, key, base_dir)``. Adding an
  input is one module here and one config section (docs/design.md, "Adding an
  input"). A module is imported only when its section is in the config, and
  even then it imports heavy libraries where it uses them, not at the top.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from ..errors import ConfigError, NotStored

log = logging.getLogger("nexus.inputs")

STUCK_INTERVALS = 3  # a polled input with no progress for 3 intervals + STUCK_GRACE_S is stuck
STUCK_GRACE_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One reading of one source. ``metrics`` keeps its order: it is the order on the wire."""

    source: str
    time: float  # wall clock, seconds since the epoch: the message's timestamp
    metrics: Mapping[str, float]
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InputHealth:
    """What an input says of itself (for ``status.json`` and the watchdog)."""

    source: str
    samples: int  # stored
    failures: int  # samples that could not be taken or stored, in all
    failing: int  # of those, how many in a row until now (0: it works)
    last_success: Optional[float]  # wall clock of the last stored sample
    stuck: bool  # no progress for too long: the watchdog should get the agent restarted
    # What the source itself got wrong (not the agent's failures, so neither "storing" nor
    # the watchdog looks at them): lines or runs refused (malformed, over a limit, a script
    # that failed), and of those the runs that timed out.
    refused: int = 0
    timeouts: int = 0


Store = Callable[[Sample], Optional[str]]  # stores one sample: its message id; NotStored
# when the outbox cannot


@dataclass(frozen=True)
class InputEnv:
    """What the agent hands every input it builds."""

    state_dir: str
    own_metrics: Callable[[float], Mapping[str, float]]  # the agent's health figures at `now`
    on_fact: Callable[[], None]  # an input started or stopped failing: the status file looks
    # How full the outbox is (queued payload bytes / queue.max_bytes): inputs of
    # applications keep to their share of the queue (inputs/socket.py, "Fairness").
    queue_fill: Callable[[], float] = lambda: 0.0


class Input(ABC):
    """One source of samples, run on its own thread by the service."""

    source: str  # the name of what it reads (``system``)
    section: str  # the config section it was built from (``telemetry``)

    @abstractmethod
    def run(self, stop: threading.Event, store: Store) -> None:
        """Produce samples into ``store`` until ``stop`` is set (the input's own thread)."""

    @abstractmethod
    def health(self) -> InputHealth:
        """The input's health now (any thread)."""

    def report(self) -> Optional[Mapping[str, Any]]:
        """More than ``health()`` for ``nexus-agent status`` (JSON values; ``devices``:
        name -> facts, shown one line each), or None (any thread)."""
        return None

    def configure(self, section: Any) -> None:
        """Its config section, changed by a reload (main thread); by default that takes
        effect only after a restart."""
        log.warning("reload: input %s does not take a new %s section before a restart",
                    self.source, self.section)

    def wake(self) -> None:
        """``stop`` was set (main thread, at shutdown): an input blocked in a ``select``
        looks at it now. Polled inputs wait on the Event itself and need nothing."""
        return None


class CountingInput(Input):
    """An input that keeps its health counters itself (on its own thread, under its lock).

    A sample that cannot be stored is counted; the first of a run is logged (a full disk
    at 1 s would otherwise write a line a second to the journal), and so is the recovery,
    each with a wake-up of the status file (``storing`` is a fact). What the source got
    wrong is counted apart (``refused``, ``timeouts``): it is not the agent failing.
    """

    def __init__(self, source: str, section: str, on_fact: Callable[[], None]) -> None:
        self.source = source
        self.section = section
        self._on_fact = on_fact
        self._lock = threading.Lock()
        self._samples = 0
        self._failures = 0
        self._failing = 0
        self._refused = 0
        self._timeouts = 0
        self._last_success: Optional[float] = None
        self._progress = time.monotonic()  # the last stored sample, or a disk that failed

    def store_one(self, store: Store, sample: Sample) -> Optional[str]:
        """Store one sample and count it; its id, or None when the outbox could not store
        it (NotStored). Anything else (a sample the wire cannot carry) goes through."""
        try:
            msg_id = store(sample)
        except NotStored as exc:
            # A full or failing disk: a restart would not help, so this is not a stuck
            # thread for the watchdog (a lock that never ends is).
            self._failed(f"cannot store samples (input {self.source}): {exc.reason}",
                         traceback=False, progress=not exc.waiting)
            return None
        self._stored()
        return msg_id

    def _refuse(self, timed_out: bool = False) -> None:
        with self._lock:
            self._refused += 1
            self._timeouts += timed_out

    def _failed(self, what: str, traceback: bool, progress: bool) -> None:
        with self._lock:
            self._failures += 1
            self._failing += 1
            first = self._failing == 1
            if progress:
                self._progress = time.monotonic()
        if first:
            self._on_fact()  # storing: false, at once
            log.error("%s; samples not stored are counted (status: unstored) and this is "
                      "logged again when it works", what, exc_info=traceback)

    def _stored(self) -> None:
        with self._lock:
            self._samples += 1
            self._last_success = time.time()
            self._progress = time.monotonic()  # a stored sample is progress
            failing, self._failing, failures = self._failing, 0, self._failures
        if failing:
            log.warning("storing samples again (input %s); %d in a row could not be stored "
                        "(%d in all)", self.source, failing, failures)
            self._on_fact()

    def counted(self, stuck_after: Optional[float]) -> InputHealth:
        """The counters now; stuck when nothing progressed for ``stuck_after`` seconds
        (None: never)."""
        with self._lock:
            stuck = stuck_after is not None and time.monotonic() - self._progress >= stuck_after
            return InputHealth(self.source, self._samples, self._failures, self._failing,
                               self._last_success, stuck, self._refused, self._timeouts)

    def health(self) -> InputHealth:
        return self.counted(None)


class PolledInput(CountingInput):
    """An input read every ``interval_s`` on a fixed schedule: subclasses write ``gather``
    (or ``once``, to store several samples a round)."""

    def __init__(self, source: str, section: str, interval_s: float,
                 on_fact: Callable[[], None]) -> None:
        super().__init__(source, section, on_fact)
        self.interval_s = interval_s  # set by configure (main thread): one float, read whole

    def gather(self, now: float) -> Sample:
        """One sample taken at wall-clock ``now``."""
        raise NotImplementedError

    def run(self, stop: threading.Event, store: Store) -> None:
        next_at = time.monotonic()
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            self.once(store)
            interval = self.interval_s
            next_at += interval
            if next_at < time.monotonic():  # fell behind (suspend, slow disk): skip, no burst
                next_at = time.monotonic() + interval

    def once(self, store: Store) -> None:
        """Take one sample and store it, or count it as not stored."""
        try:
            self.store_one(store, self.gather(time.time()))
        except Exception as exc:  # noqa: BLE001 - one failed sample must not stop sampling
            self._failed(f"sampling failed (input {self.source}): {exc!r}", traceback=True,
                         progress=False)

    def health(self) -> InputHealth:
        return self.counted(STUCK_INTERVALS * self.interval_s + STUCK_GRACE_S)


# --------------------------------------------------------------------------- the registry

Builder = Callable[[Any, InputEnv], Union[Input, List[Input]]]
KINDS_PREFIX = "inputs."  # sections of the top-level ``inputs`` mapping: inputs.<kind>


_SECTION_LINE = re.compile(r'^SECTION = "([^"]+)"$', re.MULTILINE)


def _sections() -> Dict[str, str]:
    """Config section name -> the name of the module that reads it, one per module of
    this package, read from each module's ``SECTION = "..."`` line without importing it:
    the daemon imports only the inputs its config names (a module is code and memory
    the agent carries for its whole run)."""
    found: Dict[str, str] = {}
    folder = os.path.dirname(__file__)
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext != ".py" or stem.startswith("_"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            match = _SECTION_LINE.search(f.read())
        if match is None:
            raise RuntimeError(f"input module {stem} declares no SECTION = \"...\" line")
        if match.group(1) in found:
            raise RuntimeError(f"two inputs read config section {match.group(1)!r}")
        found[match.group(1)] = stem
    return found


def _module(section: str, stem: str) -> ModuleType:
    module = importlib.import_module(f"{__name__}.{stem}")
    if section != module.SECTION:  # the line read is not the value the module has
        raise RuntimeError(f"input module {stem}: SECTION is {module.SECTION!r}, its "
                           f"SECTION line says {section!r}")
    return module


def registry() -> Dict[str, Builder]:
    """Config section name -> the builder of its input, one per module of this package
    (every module imported: for tests and messages; the daemon uses :func:`build`)."""
    return {section: _module(section, stem).build for section, stem in _sections().items()}


def check_sections(raw: Any, base_dir: str) -> Dict[str, Any]:
    """The config's top-level ``inputs`` mapping, checked: ``inputs.<kind>`` -> its checked
    section. Each kind is the module whose ``SECTION`` is ``inputs.<kind>``; it checks its
    own section with ``check(raw, key, base_dir)`` (ConfigError naming the full key path,
    ``inputs.exec[0].argv``; relative paths against ``base_dir``, the config file's
    folder). config.py passes the mapping here as it is and keeps the result in
    ``Config.inputs``."""
    if raw is None:
        return {}
    stems = {name: stem for name, stem in _sections().items() if name.startswith(KINDS_PREFIX)}
    kinds = ", ".join(sorted(n[len(KINDS_PREFIX):] for n in stems))
    if not isinstance(raw, dict):
        raise ConfigError("inputs", f"must be a mapping of input kinds ({kinds})")
    checked: Dict[str, Any] = {}
    for kind, section in raw.items():
        name = f"{KINDS_PREFIX}{kind}"
        if name not in stems:
            raise ConfigError(name, f"unknown input kind (kinds: {kinds})")
        checked[name] = _module(name, stems[name]).check(section, name, base_dir)
    return checked


def sections_of(config: Any) -> Dict[str, Any]:
    """The config's sections that an input reads (section name -> its checked values):
    top-level ones (``telemetry``), then those of ``inputs`` (``inputs.socket``...)."""
    sections = {name: getattr(config, name) for name in _sections()
                if "." not in name and getattr(config, name, None) is not None}
    sections.update(getattr(config, "inputs", None) or {})
    return sections


def build(sections: Mapping[str, Any], env: InputEnv) -> List[Input]:
    """The inputs of the sections, in the order given (a builder may return several: one
    per entry of a list section). A section no input reads is a ConfigError naming it."""
    stems = _sections()
    built: List[Input] = []
    for name, section in sections.items():
        if name not in stems:
            raise ConfigError(name, f"no input reads this section (inputs: "
                              f"{', '.join(sorted(stems))})")
        made = _module(name, stems[name]).build(section, env)
        built.extend(made if isinstance(made, list) else [made])
    return built


def reconfigure(inputs: List[Input], old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Hand each input its section if a reload changed it (main thread, on SIGHUP). A
    section that came or went takes effect only after a restart (logged)."""
    for item in inputs:
        if item.section in new and new[item.section] != old.get(item.section):
            item.configure(new[item.section])
    for name in sorted(set(old) ^ set(new)):
        log.warning("reload: section %s was %s; that takes effect only after a restart",
                    name, "added" if name in new else "removed")


def missing(sections: Mapping[str, Any]) -> List[str]:
    """What the inputs of these sections need and cannot import here (``REQUIRES``: module
    names), each with the section: for ``--check-config``, which builds no input."""
    import importlib.util

    stems = _sections()
    return [f"{name}: needs {req}, which is not installed"
            for name in sections if name in stems
            for req in getattr(_module(name, stems[name]), "REQUIRES", ())
            if importlib.util.find_spec(req) is None]

"""The composition root: builds the parts, owns the threads, the signals and shutdown.

Threads and what each owns:

* main thread: signals (recorded by ``signals.SignalInbox``, acted on here),
  systemd notifications, the watchdog, the status file, reloads, and the
  shutdown sequence;
* ``nexus-input-<source>``: one per input built from its config section by the
  registry (``inputs/``: ``nexus-input-system`` every ``telemetry.interval_s``;
  with an ``inputs`` section, ``nexus-input-socket``, one per script, and the
  Modbus input, which runs one more thread per port, ``nexus-modbus-N``, see
  ``inputs/modbus.py``); each stores its samples through the mailbox (outbox,
  then a wake-up of the transport), timestamp = sample time;
* ``nexus-transport``: the socket (see ``transport.py``); command requests
  leave it through a ``queue.SimpleQueue`` to the command runner;
* ``nexus-cmd-intake`` and ``nexus-cmd-N``: the command runner's intake (ledger,
  allow-list) and workers (see ``runner.py``), only with an allow-list; results
  go through the mailbox like samples.

The service builds these parts and hands each what it needs; no part calls
another's methods back (docs/design.md, "Paths").

Shutdown (SIGTERM/SIGINT), in this order, within about 5 s:

* tell systemd STOPPING=1;
* stop the inputs (no new messages): set their Event, wake those that sleep in a
  ``select`` (the ingest socket closes its clients and removes its file);
* stop the transport: it waits up to 2 s for in-flight acks, then closes with 1000;
* stop the command workers; close the ledger and the outbox (checkpointed).

Nothing unacknowledged is lost: it stays in the outbox for the next start.
A second SIGTERM/SIGINT while stopping skips the wait for acks (exit 0 all the
same); a third exits at once with ``EXIT_FORCED`` (everything queued is
already committed to the outbox, so even that loses nothing).

Reload (SIGHUP): the config file is read again; if it is valid, telemetry
interval, reconnect delays, server settings and the allow-list take effect
(server settings from the next connection); if not, the error is logged and
the old config stays. ``state_dir`` and ``queue.max_bytes`` need a restart.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from . import config as config_mod
from . import statusfile, store
from .auth import check_credentials
from .config import Config
from .connstate import ConnectionStats
from .errors import ConfigError, NexusError
from .codec import CODEC, Record
from .inputs import Input, InputEnv, reconfigure, sections_of
from .inputs import build as build_inputs
from .mailbox import Mailbox
from .outbox import Outbox
from .sdnotify import Notifier, watchdog_interval
from .signals import DAEMON_SIGNALS, SignalInbox
from .signals import name as signal_name
from .transport import Transport

if TYPE_CHECKING:  # imported only with an allow-list: queue, subprocess, the executor
    import queue

    from . import protocol as p
    from .runner import CommandRunner

log = logging.getLogger("nexus.agent")

# The status file and systemd's STATUS= line: facts (connected, last error, set aside,
# storing, healthy...) are written as soon as they change (the transport and the inputs
# wake the main loop); counters (sent, acked, queue depth...) at the main loop's tick,
# every COUNTER_SAMPLES samples, between STATUS_MIN_S and statusfile.REFRESH_S (and at
# half of WatchdogSec under a watchdog if that is shorter). At 1 s that is every 10 s
# instead of every 2 s: each pass costs about 0.5 ms of CPU (a rewrite, the outbox's
# figures, systemd's STATUS= line).
COUNTER_SAMPLES = 10
STATUS_MIN_S = 2.0
# Keys of Agent.status() that move with the traffic; every other key is a fact.
COUNTERS = frozenset(("queue_depth", "queue_bytes", "oldest_queued_at", "dropped",
                      "reconnects", "sent", "sent_items", "acked", "last_ack_at",
                      "drain_per_min", "drain_eta_s"))
EXIT_FORCED = 1  # a third stop signal: out at once
DRAIN_WINDOW_S = 60.0  # the drain rate in the status is over this long


class Agent:
    def __init__(self, config: Config, notifier: Optional[Notifier] = None,
                 inputs: Optional[Sequence[Input]] = None) -> None:
        """``inputs`` replaces the ones the registry would build (tests pass fakes)."""
        self.config = config
        self.notifier = notifier or Notifier()
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        # One agent per state_dir, whatever queue.lock says (store.DirLock); held until close.
        self.dir_lock = store.DirLock(config.state_dir)
        try:
            self.outbox: Outbox[Record] = Outbox(
                CODEC, config.state_dir, config.queue.max_bytes,
                durability=config.queue.durability,
                sync_interval_s=config.queue.sync_interval_s, lock=config.queue.lock)
        except BaseException:
            self.dir_lock.close()
            raise
        self.connection = ConnectionStats()
        self.runner: Optional[CommandRunner] = None
        requests: Optional[queue.SimpleQueue[Optional[p.CommandRequest]]] = None
        if config.commands.allow:
            import queue  # like the runner, loaded only with an allow-list

            requests = queue.SimpleQueue()  # transport -> runner: command requests
        self.transport = Transport(config, self.outbox, self.connection, requests)
        self.mailbox = Mailbox(self.outbox, self.transport.wake, config.device_id)
        if requests is not None:
            from .runner import CommandRunner

            self.runner = CommandRunner(config.commands, config.device_id, config.state_dir,
                                        requests, self.mailbox)
        env = InputEnv(config.state_dir, self._own_metrics, self.facts_changed,
                       self.outbox.fill)
        try:
            self.inputs: List[Input] = list(inputs) if inputs is not None else \
                build_inputs(sections_of(config), env)
        except BaseException:  # a socket path that cannot be used: ConfigError, exit 78
            self.outbox.close()
            self.dir_lock.close()
            raise
        self._inputs_stop = threading.Event()
        self._transport_stop = threading.Event()
        self._status_failing = False
        self._acks_seen: Deque[Tuple[float, int]] = collections.deque()  # (when, acked so far)
        self._status_written: Optional[Dict[str, Any]] = None  # as last written, sans time
        self._status_written_at = 0.0
        # A byte here wakes the main loop to look at the status facts (any thread).
        self._look_r, self._look_w = os.pipe()
        os.set_blocking(self._look_r, False)
        os.set_blocking(self._look_w, False)
        self.connection.on_fact = self.facts_changed
        self._stops = 0  # stop signals counted during shutdown
        self._inbox: Optional[SignalInbox] = None  # read by shutdown for more stop signals
        self._threads: Dict[str, threading.Thread] = {}
        self.started = time.time()
        self.started_with = config  # what a reload cannot change without a restart
        self.restart_needed: List[str] = []  # what a reload asked for that needs one

    # ------------------------------------------------------------------ inputs

    def _own_metrics(self, now: float) -> Dict[str, float]:
        """The agent's own health figures, for the system input's samples (its thread)."""
        stats = self.outbox.stats()
        connection = self.connection.snapshot()
        oldest_age = round(now - stats.oldest_created, 1) if stats.oldest_created else 0.0
        metrics = {"agent_queue_depth": stats.depth, "agent_queue_bytes": stats.bytes,
                   "agent_oldest_queued_age_s": oldest_age, "agent_dropped": stats.dropped,
                   "agent_reconnects": connection.reconnects}
        if connection.clock_offset_s is not None:  # measured at the last welcome
            metrics["agent_clock_offset_s"] = connection.clock_offset_s
        return metrics

    # ------------------------------------------------------------------ running

    def _start_threads(self) -> None:
        # Inputs first, then the transport (thread order as bench/abcpu.py lists them).
        for item in self.inputs:
            self._start(f"nexus-input-{item.source}", item.run, self._inputs_stop,
                        self.mailbox.sample)
        self._start("nexus-transport", self.transport.run, self._transport_stop)
        if self.runner is not None:
            self.runner.start()

    def _start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads[name] = thread

    def healthy(self) -> bool:
        """All threads alive and no input stuck (for the watchdog)."""
        threads_ok = all(t.is_alive() for t in self._threads.values())
        runner_ok = self.runner is None or self.runner.alive()
        inputs_ok = not any(item.health().stuck for item in self.inputs)
        return threads_ok and runner_ok and inputs_ok

    def run(self, inbox: Optional[SignalInbox] = None) -> int:
        """Serve until SIGTERM/SIGINT; ``inbox`` is created early by ``__main__`` so a signal
        in the first moments is recorded, not fatal."""
        inbox = inbox or SignalInbox(DAEMON_SIGNALS)
        self._start_threads()
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        log.info("started: device %s, server %s, state %s", self.config.device_id,
                 self.config.server.url, self.config.state_dir)
        warning = config_mod.pace_warning(self.config)
        if warning:
            log.warning("%s", warning)
        watchdog = watchdog_interval()
        stops = 0
        next_tick = time.monotonic()
        while not stops:
            for signum in inbox.wait(max(0.0, next_tick - time.monotonic()), self._look_r):
                if signum == signal.SIGHUP:
                    self._reload()
                    # A shorter interval means a shorter tick: not after the old one.
                    next_tick = min(next_tick, time.monotonic() + self.tick(watchdog))
                else:
                    stops += 1
                    log.info("%s received", signal_name(signum))
            if stops:
                continue
            if time.monotonic() < next_tick:
                self._report(counters=False)  # woken by a fact: written if one changed
                continue
            next_tick = time.monotonic() + self.tick(watchdog)
            self._acks_seen.append((time.monotonic(), self.connection.snapshot().acked))
            while self._acks_seen[0][0] < time.monotonic() - DRAIN_WINDOW_S:
                self._acks_seen.popleft()
            # WATCHDOG=1 only while every thread makes progress: a stuck one gets us restarted.
            self._report(watchdog=bool(watchdog) and self.healthy())
        self.shutdown(inbox, stops)
        return 0

    def facts_changed(self) -> None:
        """Wake the main loop to look at the status facts (any thread; never a handler)."""
        try:
            os.write(self._look_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a look is already pending

    def counters_every(self) -> float:
        """How long counter-only changes may wait before the status file is rewritten."""
        pace = COUNTER_SAMPLES * self.config.telemetry.interval_s
        return min(statusfile.REFRESH_S, max(STATUS_MIN_S, pace))

    def tick(self, watchdog: Optional[float]) -> float:
        """The main loop's period: the counters' pace, and half of WatchdogSec under a
        systemd watchdog (``watchdog`` is that half already) if that is shorter."""
        every = self.counters_every()
        return min(every, watchdog) if watchdog else every

    def _report(self, watchdog: bool = False, counters: bool = True) -> None:
        self.write_status(counters=counters)
        if self.notifier.enabled:  # status_line reads the outbox: not for nobody
            ping = ["WATCHDOG=1"] if watchdog else []
            self.notifier.notify(*ping, f"STATUS={self.status_line()}")

    def shutdown(self, inbox: Optional[SignalInbox] = None, stops: int = 1) -> None:
        """The sequence in the module docstring. Safe to call twice.

        While it runs, further stop signals from ``inbox`` count on: the second skips the
        wait for acks, the third exits the process at once.
        """
        self.notifier.notify("STOPPING=1")
        log.info("stopping")
        self._stops = 1
        self._inbox = inbox
        for _ in range(stops - 1):  # signals that came together, before the loop saw them
            self._count_stop("stop signal")
        self._inputs_stop.set()
        for item in self.inputs:
            item.wake()  # one blocked in a select (the ingest socket) looks at the Event
        deadline = time.monotonic() + 2.0  # for all inputs together
        for item in self.inputs:
            self._join(f"nexus-input-{item.source}", max(0.0, deadline - time.monotonic()))
        self._transport_stop.set()
        self.transport.wake()
        self._join("nexus-transport", 3.0)  # its drain is 2 s, its close 1 s
        if self.runner is not None:
            self.runner.close()
        self.write_status(stopped=True)
        self.outbox.close()
        self.dir_lock.close()
        self.notifier.close()
        # The look pipe stays open until the process ends, like the transport's wake pipe:
        # a thread that outlived its join may still write to it, and a closed descriptor's
        # number could by then belong to another file.
        log.info("stopped")

    def _more_stop_signals(self) -> None:
        """Count stop signals that arrive during shutdown (main thread, never a handler)."""
        inbox = self._inbox
        if inbox is None:
            return
        for signum in inbox.wait(0):
            if signum != signal.SIGHUP:  # no reload while stopping
                self._count_stop(signal_name(signum))

    def _count_stop(self, what: str) -> None:
        self._stops += 1
        if self._stops == 2:
            log.warning("%s again: not waiting for acks (nothing is lost: unacked messages "
                        "stay queued)", what)
            self.transport.hurry()
        else:
            log.warning("%s a third time: exiting at once", what)
            sys.stderr.flush()
            os._exit(EXIT_FORCED)

    def _join(self, name: str, timeout: float) -> None:
        thread = self._threads.get(name)
        if thread is not None:
            deadline = time.monotonic() + timeout
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
                self._more_stop_signals()
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", name, timeout)

    def _reload(self) -> None:
        try:
            new = config_mod.load(self.config.source)
            check_credentials(new.server.token_file, new.server.client_key)  # as at start
        except (ConfigError, NexusError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        # What the running agent cannot take over; `nexus-agent status` lists it until a restart.
        pending = [f"{key} changed" for key in ("state_dir", "queue")
                   if getattr(new, key) != getattr(self.started_with, key)]
        if bool(new.commands.allow) != (self.runner is not None):
            pending.append("commands " + ("enabled (no command is taken until then)"
                                          if new.commands.allow else "disabled (commands are "
                                          "still taken until then)"))
        if new.server.url.split(":")[0] != self.started_with.server.url.split(":")[0]:
            pending.append("the URL scheme changed")
        for what in pending:
            log.warning("reload: %s; that takes effect only after a restart "
                        "(systemctl restart nexus-agent)", what)
        self.restart_needed = pending
        changed = config_mod.changes(self.config, new)
        reconfigure(self.inputs, sections_of(self.config), sections_of(new))
        self.config = new
        self.transport.set_config(new)
        if self.runner is not None:
            self.runner.config = new.commands
        log.info("reloaded %s: %s", new.source, "; ".join(changed) or "no changes")
        self.write_status(counters=False)  # restart_needed is a fact: shown at once

    # ------------------------------------------------------------------ status

    def status(self) -> Dict[str, Any]:
        stats = self.outbox.stats()
        h = self.connection.snapshot()
        inputs = [item.health() for item in self.inputs]
        now = time.time()
        return {
            "device_id": self.config.device_id, "server": self.config.server.url,
            "state_dir": self.config.state_dir,
            "pid": os.getpid(), "updated": now, "started": self.started,
            "connected": h.connected, "last_ack_at": h.last_ack_at,
            "queue_depth": stats.depth, "queue_bytes": stats.bytes,
            "oldest_queued_at": stats.oldest_created, "dropped": stats.dropped,
            "reconnects": h.reconnects, "sent": h.sent, "sent_items": h.sent_items,
            "acked": h.acked,
            "set_aside": stats.set_aside, "last_set_aside": stats.last_set_aside,
            "unstored": sum(i.failures for i in inputs),
            **self._drain(stats.depth),
            "storing": all(i.failing == 0 for i in inputs), "token_expires": h.token_expires,
            "certificate_expires": h.certificate_expires,
            "clock_offset_s": h.clock_offset_s, "last_error": h.last_error,
            "healthy": self.healthy(), "stopped": False,
            "restart_needed": self.restart_needed,
            "inputs": [{"source": i.source, "samples": i.samples, "failures": i.failures,
                        "refused": i.refused, "timeouts": i.timeouts,
                        "last_success": i.last_success} for i in inputs],
            "input_details": self._input_details(),
        }

    def _input_details(self) -> Dict[str, Any]:
        """source -> what an input says beyond its health (``Input.report``: the Modbus
        input's devices), for the inputs that say more."""
        reports = {}
        for item in self.inputs:
            report = item.report()
            if report is not None:
                reports[item.source] = report
        return reports

    def _drain(self, depth: int) -> Dict[str, Optional[float]]:
        """Acked messages a minute over the last DRAIN_WINDOW_S, and the time to empty."""
        if len(self._acks_seen) < 2:
            return {"drain_per_min": None, "drain_eta_s": None}
        (t0, a0), (t1, a1) = self._acks_seen[0], self._acks_seen[-1]
        rate = (a1 - a0) / (t1 - t0) * 60.0 if t1 > t0 else 0.0
        eta = depth / rate * 60.0 if rate > 0 else None
        return {"drain_per_min": round(rate, 1), "drain_eta_s": None if eta is None else
                round(eta, 1)}

    def status_line(self) -> str:
        h = self.connection.snapshot()
        stats = self.outbox.stats()
        state = "connected" if h.connected else f"disconnected ({h.last_error or 'starting'})"
        return f"{state}; queue {stats.depth} messages, {stats.bytes} bytes; dropped " \
               f"{stats.dropped}"

    def write_status(self, stopped: bool = False, counters: bool = True) -> None:
        """Atomically replace the status file (read by ``nexus-agent status``) when something
        in it changed (``updated`` aside), or ``statusfile.REFRESH_S`` after the last write:
        outside systemd's runtime directory it is on the SD card too. ``counters`` False
        (a fact woke the main loop): written only if a fact changed, not for counters."""
        data = self.status()
        data["stopped"] = stopped
        facts = {key: value for key, value in data.items() if key != "updated"}
        now = time.monotonic()
        last = self._status_written
        if last is not None and now - self._status_written_at < statusfile.REFRESH_S:
            if facts == last:
                return
            if not counters and all(value == last.get(key) for key, value in facts.items()
                                    if key not in COUNTERS):
                return
        path = statusfile.path(self.config.state_dir)
        try:
            statusfile.write(self.config.state_dir, data)
        except OSError as exc:
            if not self._status_failing:  # once until it works again: it runs every 2 s
                log.warning("cannot write %s: %s (logged again when it works)", path, exc)
                self._status_failing = True
            return
        self._status_written, self._status_written_at = facts, now
        if self._status_failing:
            log.warning("writing %s again", path)
            self._status_failing = False


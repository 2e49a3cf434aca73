"""The composition root: builds the parts, owns the threads, the signals and shutdown.

Threads and what each owns:

* main thread: signals (handlers only set events), systemd notifications,
  the watchdog, the status file, reloads, and the shutdown sequence;
* ``nexus-sampler``: takes a sample every ``telemetry.interval_s`` and puts it
  in the outbox (timestamp = sample time);
* ``nexus-transport``: the socket (see ``transport.py``);
* ``nexus-cmd-N``: command workers (see ``runner.py``), only with an allow-list.

Shutdown (SIGTERM/SIGINT), in this order, within about 5 s:

* tell systemd STOPPING=1;
* stop the sampler (no new messages);
* stop the transport: it waits up to 2 s for in-flight acks, then closes with 1000;
* stop the command workers; close the ledger and the outbox (checkpointed).

Nothing unacknowledged is lost: it stays in the outbox for the next start.

Reload (SIGHUP): the config file is read again; if it is valid, telemetry
interval, reconnect delays, server settings and the allow-list take effect
(server settings from the next connection); if not, the error is logged and
the old config stays. ``state_dir`` and ``queue.max_bytes`` need a restart.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

from . import config as config_mod
from . import protocol as p
from .auth import read_token
from .config import Config
from .errors import ConfigError, NexusError
from .metrics import Sampler, TemperatureSource
from .outbox import Outbox
from .runner import CommandRunner
from .sdnotify import Notifier, watchdog_interval
from .transport import Health, Transport

log = logging.getLogger("nexus.agent")

STATUS_FILE = "status.json"
STATUS_EVERY_S = 2.0


class Agent:
    def __init__(self, config: Config, temperatures: Optional[TemperatureSource] = None,
                 notifier: Optional[Notifier] = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.outbox = Outbox(config.state_dir, config.queue.max_bytes)
        self.health = Health()
        self.sampler = Sampler(config.state_dir, temperatures)
        self.runner: Optional[CommandRunner] = None
        self.transport = Transport(config, self.outbox, self.health)
        if config.commands.allow:
            self.runner = CommandRunner(config.commands, config.device_id, config.state_dir,
                                        self.outbox, self.transport.wake)
            self.transport.on_command = self.runner.submit
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._sampling_stop = threading.Event()
        self._transport_stop = threading.Event()
        self._last_sample = time.monotonic()
        self._threads: Dict[str, threading.Thread] = {}
        self.started = time.time()

    # ------------------------------------------------------------------ sampling

    def sample_once(self) -> None:
        now = time.time()
        metrics = self.sampler.sample(self._health_metrics(now))
        payload = {"device_id": self.config.device_id, "metrics": metrics}
        self.outbox.put("telemetry", payload, p.format_timestamp(now), now)
        self.transport.wake()

    def _health_metrics(self, now: float) -> Dict[str, float]:
        stats = self.outbox.stats()
        health = self.health.snapshot()
        oldest_age = round(now - stats.oldest_created, 1) if stats.oldest_created else 0.0
        return {"agent_queue_depth": stats.depth, "agent_queue_bytes": stats.bytes,
                "agent_oldest_queued_age_s": oldest_age, "agent_dropped": stats.dropped,
                "agent_reconnects": health.reconnects}

    def _sample_loop(self) -> None:
        next_at = time.monotonic()
        while not self._sampling_stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.sample_once()
                self._last_sample = time.monotonic()  # only a stored sample counts as progress
            except Exception:  # noqa: BLE001 - one failed sample must not stop sampling
                log.exception("sampling failed; trying again next interval")
            interval = self.config.telemetry.interval_s
            next_at += interval
            if next_at < time.monotonic():  # fell behind (suspend, slow disk): skip, no burst
                next_at = time.monotonic() + interval

    # ------------------------------------------------------------------ running

    def _start_threads(self) -> None:
        targets = {"nexus-sampler": self._sample_loop,
                   "nexus-transport": lambda: self.transport.run(self._transport_stop)}
        for name, target in targets.items():
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads[name] = thread
        if self.runner is not None:
            self.runner.start()

    def healthy(self) -> bool:
        """All threads alive and the sampler not stuck (for the watchdog)."""
        threads_ok = all(t.is_alive() for t in self._threads.values())
        runner_ok = self.runner is None or self.runner.alive()
        stuck_after = 3 * self.config.telemetry.interval_s + 5.0
        return threads_ok and runner_ok and time.monotonic() - self._last_sample < stuck_after

    def run(self) -> int:
        self._install_signals()
        self._start_threads()
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        log.info("started: device %s, server %s, state %s", self.config.device_id,
                 self.config.server.url, self.config.state_dir)
        watchdog = watchdog_interval()
        tick = min(STATUS_EVERY_S, watchdog) if watchdog else STATUS_EVERY_S
        while not self.stop.wait(tick):
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
            self.write_status()
            # WATCHDOG=1 only while every thread makes progress: a stuck one gets us restarted.
            ping = ["WATCHDOG=1"] if watchdog and self.healthy() else []
            self.notifier.notify(*ping, f"STATUS={self.status_line()}")
        self.shutdown()
        return 0

    def _install_signals(self) -> None:
        # Handlers only record the signal; the main loop acts on it.
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())

    def shutdown(self) -> None:
        """The sequence in the module docstring. Safe to call twice."""
        self.notifier.notify("STOPPING=1")
        log.info("stopping")
        self._sampling_stop.set()
        self._join("nexus-sampler", 2.0)
        self._transport_stop.set()
        self.transport.wake()
        self._join("nexus-transport", 3.0)  # its drain is 2 s, its close 1 s
        if self.runner is not None:
            self.runner.close()
        self.write_status(stopped=True)
        self.outbox.close()
        self.notifier.close()
        log.info("stopped")

    def _join(self, name: str, timeout: float) -> None:
        thread = self._threads.get(name)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", name, timeout)

    def _reload(self) -> None:
        try:
            new = config_mod.load(self.config.source)
            read_token(new.server.token_file)  # the same checks as at start
        except (ConfigError, NexusError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        for key in ("state_dir", "queue"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; that takes effect only after a restart", key)
        if bool(new.commands.allow) != (self.runner is not None):
            log.warning("reload: commands were %s; that takes effect only after a restart",
                        "enabled" if new.commands.allow else "disabled")
        if new.server.url.split(":")[0] != self.config.server.url.split(":")[0]:
            log.warning("reload: the URL scheme changed; restart the agent to use it")
        changed = config_mod.changes(self.config, new)
        self.config = new
        self.transport.set_config(new)
        if self.runner is not None:
            self.runner.config = new.commands
        log.info("reloaded %s: %s", new.source, "; ".join(changed) or "no changes")

    # ------------------------------------------------------------------ status

    def status(self) -> Dict[str, Any]:
        stats = self.outbox.stats()
        h = self.health.snapshot()
        now = time.time()
        return {
            "device_id": self.config.device_id, "server": self.config.server.url,
            "pid": os.getpid(), "updated": now, "started": self.started,
            "connected": h.connected, "last_ack_at": h.last_ack_at,
            "queue_depth": stats.depth, "queue_bytes": stats.bytes,
            "oldest_queued_at": stats.oldest_created, "dropped": stats.dropped,
            "reconnects": h.reconnects, "sent": h.sent, "acked": h.acked,
            "rejected": h.rejected, "token_expires": h.token_expires,
            "clock_offset_s": h.clock_offset_s, "last_error": h.last_error,
            "healthy": self.healthy(), "stopped": False,
        }

    def status_line(self) -> str:
        h = self.health.snapshot()
        stats = self.outbox.stats()
        state = "connected" if h.connected else f"disconnected ({h.last_error or 'starting'})"
        return f"{state}; queue {stats.depth} messages, {stats.bytes} bytes; dropped " \
               f"{stats.dropped}"

    def write_status(self, stopped: bool = False) -> None:
        """Atomically replace ``status.json`` in state_dir (read by ``nexus-agent status``)."""
        data = self.status()
        data["stopped"] = stopped
        path = os.path.join(self.config.state_dir, STATUS_FILE)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)


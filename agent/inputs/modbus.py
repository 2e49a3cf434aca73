"""The Modbus input: PLCs and meters over Modbus TCP and RTU (section ``inputs.modbus``).

Rules:

* The section is a list of devices, checked by ``modbus.check`` (key paths like
  ``inputs.modbus[0].points[2].type``). pymodbus (the ``modbus`` extra) is imported
  by ``build`` through ``modbus_client``, never when no Modbus input is configured.
* One thread per port (``nexus-modbus-<n>``: a TCP host:port or a serial device),
  which reads its devices in turn, each every ``interval_s``: one request in flight
  per port, several unit ids on one bus share its thread, and a device that does not
  answer delays only the devices on its own port (by at most its ``timeout_s`` a poll).
* Each poll of a device that read at least one point is one :class:`Sample` (source
  = the device's name, metrics = the points read, in config order, time = when the
  poll began) handed to ``store`` like every other input's: the outbox keeps it until
  the server acks it. A point that was not read is left out, never invented.
* A port that refuses or loses its connection is reopened after a full-jitter
  backoff (``RECONNECT_BASE_S`` doubling up to ``RECONNECT_MAX_S``); meanwhile its
  devices' polls read nothing and say why.
* Health: ``health()`` counts samples stored or not stored (the outbox's side, like
  every input); ``report()`` gives per device the last good read, errors by kind and
  the failing points, for ``nexus-agent status``. A device's change of condition is
  logged once (``modbus.DeviceHealth``), never once a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .. import modbus
from ..errors import NotStored
from . import STUCK_GRACE_S, STUCK_INTERVALS, Input, InputEnv, InputHealth, Sample, Store

log = logging.getLogger("nexus.inputs.modbus")

SECTION = "inputs.modbus"
SOURCE = "modbus"
REQUIRES = ("pymodbus",)  # the modbus extra (docs/deploy.md)
RECONNECT_BASE_S = 0.5
RECONNECT_MAX_S = 30.0
JOIN_S = 1.5  # a port thread in the middle of a request gets this long to finish at stop


def check(raw: Any, key: str, base_dir: str = "") -> Tuple[modbus.Device, ...]:
    """The checked section (``base_dir``: no relative paths here; a serial device's path
    is taken as written)."""
    return modbus.check(raw, key)


class Poller:
    """One device's reading state (its port's thread): the points read on their own
    since an exception, and its health (read by other threads under the input's lock)."""

    def __init__(self, device: modbus.Device) -> None:
        self.device = device
        self.isolated: frozenset = frozenset()
        self.requests = modbus.plan(device)  # planned again when ``isolated`` grows
        self.health = modbus.DeviceHealth(device.name, device.url, device.unit)
        self.next_at = 0.0  # monotonic


class PortLoop:
    """One port's devices, read in turn on one thread."""

    def __init__(self, port: Any, pollers: Sequence[Poller], owner: ModbusInput) -> None:
        self.port = port  # a modbus_client.Port (or a test's fake with read and close)
        self.pollers = list(pollers)
        self.owner = owner
        self.progress = time.monotonic()  # the last finished poll (for "stuck")
        self.retry_at = 0.0  # monotonic: no connection attempt before this
        self.refused: Optional[modbus.PointError] = None  # why, while waiting to retry
        self._delays = self._backoff()
        per_poll = sum((len(modbus.plan(p.device)) + 1) * p.device.timeout_s
                       for p in self.pollers)
        self.stuck_after = STUCK_INTERVALS * max(p.device.interval_s for p in self.pollers) \
            + STUCK_GRACE_S + per_poll

    @staticmethod
    def _backoff() -> Iterator[float]:
        from ..transport import Jitter, backoff_delays

        return backoff_delays(RECONNECT_BASE_S, RECONNECT_MAX_S, Jitter())

    def run(self, stop: threading.Event, store: Store) -> None:
        now = time.monotonic()
        for poller in self.pollers:
            poller.next_at = now
        try:
            while True:
                poller = min(self.pollers, key=lambda p: p.next_at)
                if stop.wait(max(0.0, poller.next_at - time.monotonic())):
                    return
                self.poll(poller, store)
                interval = poller.device.interval_s
                poller.next_at += interval
                if poller.next_at < time.monotonic():  # fell behind: skip, no burst
                    poller.next_at = time.monotonic() + interval
        finally:
            self.port.close()

    def poll(self, poller: Poller, store: Store) -> None:
        """Read one device once, record what happened, store what was read."""
        began = time.time()
        if self.refused is not None and time.monotonic() < self.retry_at:
            result: Dict[str, Any] = {p.name: self.refused for p in poller.device.points}
            kinds: List[str] = []
        else:
            result, kinds, isolated = modbus.poll(poller.device, self.port.read,
                                                  poller.isolated, poller.requests)
            if isolated != poller.isolated:
                poller.isolated, poller.requests = isolated, modbus.plan(poller.device, isolated)
            self._connection(kinds)
        self.owner.record(poller, result, kinds, began)
        metrics = {name: value for name, value in result.items()
                   if not isinstance(value, modbus.PointError)}
        if metrics:
            self.owner.store(store, Sample(poller.device.name, began, metrics))
        self.progress = time.monotonic()

    def _connection(self, kinds: List[str]) -> None:
        """After a poll: a refused or lost connection waits out the backoff, a poll
        that reached the port resets it."""
        if "connection" in kinds:
            delay = next(self._delays)
            self.retry_at = time.monotonic() + delay
            self.refused = modbus.PointError(
                "connection", f"{self.port.endpoint.label} refused or lost; next attempt "
                f"in {delay:.1f} s or later")
        elif self.port.is_open:
            self.refused = None
            self._delays = self._backoff()


class ModbusInput(Input):
    def __init__(self, devices: Sequence[modbus.Device], on_fact: Callable[[], None],
                 open_port: Callable[[modbus.Endpoint, float], Any]) -> None:
        self.source = SOURCE
        self.section = SECTION
        self.devices = tuple(devices)
        self._on_fact = on_fact
        self._lock = threading.Lock()  # the counters and every DeviceHealth
        self._samples = 0
        self._failures = 0
        self._failing = 0
        self._last_success: Optional[float] = None
        by_port: Dict[str, List[Poller]] = {}
        for device in self.devices:
            by_port.setdefault(device.endpoint.label, []).append(Poller(device))
        # The port's timeout: the longest of its devices' (one connection, one setting).
        self.loops = [PortLoop(open_port(pollers[0].device.endpoint,
                                         max(p.device.timeout_s for p in pollers)),
                               pollers, self) for pollers in by_port.values()]

    def run(self, stop: threading.Event, store: Store) -> None:
        threads = [threading.Thread(target=loop.run, args=(stop, store), daemon=True,
                                    name=f"nexus-modbus-{i}")
                   for i, loop in enumerate(self.loops)]
        for thread in threads:
            thread.start()
        stop.wait()
        deadline = time.monotonic() + JOIN_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ port threads

    def record(self, poller: Poller, result: Mapping[str, Any], kinds: List[str],
               now: float) -> None:
        with self._lock:
            before = poller.health.condition
            line = poller.health.record(result, kinds, now)
            after = poller.health.condition
        if line is not None:
            if after == "reading":
                log.warning("%s", line)
            else:
                log.error("%s (logged again when it changes)", line)
        if after != before:  # the first "reading" too: not logged, but status shows it now
            self._on_fact()

    def store(self, store: Store, sample: Sample) -> None:
        try:
            store(sample)
        except NotStored as exc:
            self._stored(False, f"cannot store samples (input modbus): {exc.reason}")
        except ValueError as exc:
            self._stored(False, f"sample refused (input modbus): {exc}")
        else:
            self._stored(True, "")

    def _stored(self, ok: bool, what: str) -> None:
        with self._lock:
            if ok:
                self._samples += 1
                self._last_success = time.time()
                failing, self._failing = self._failing, 0
            else:
                self._failures += 1
                self._failing += 1
                failing = self._failing
        if ok and failing:
            log.warning("storing modbus samples again; %d in a row could not be stored",
                        failing)
            self._on_fact()
        elif not ok and failing == 1:
            log.error("%s; counted (status: unstored), logged again when it works", what)
            self._on_fact()

    # ------------------------------------------------------------ any thread

    def health(self) -> InputHealth:
        now = time.monotonic()
        stuck = any(now - loop.progress >= loop.stuck_after for loop in self.loops)
        with self._lock:
            return InputHealth(self.source, self._samples, self._failures, self._failing,
                               self._last_success, stuck)

    def report(self) -> Optional[Dict[str, Any]]:
        with self._lock:
            return {"devices": {p.device.name: p.health.report()
                                for loop in self.loops for p in loop.pollers}}


def open_port(endpoint: modbus.Endpoint, timeout_s: float) -> Any:
    from ..modbus_client import Port  # pymodbus: only now

    return Port(endpoint, timeout_s)


def build(section: Sequence[modbus.Device], env: InputEnv) -> ModbusInput:
    try:
        import pymodbus  # noqa: F401 - say so now, not at the first poll
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError(SECTION, "needs pymodbus, the modbus extra: pip install "
                          "'nexus-edge-agent[modbus]' (docs/deploy.md)") from None
    return ModbusInput(section, env.on_fact, open_port)

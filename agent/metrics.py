"""psutil readings -> the telemetry payload.

The payload keeps the guide's two metrics (``cpu_usage``, ``memory_usage``,
percent) and adds, flat and numeric, what an operator expects of a gateway.
A reading the board cannot give (no temperature sensor, no load average) is
left out rather than sent as a made-up value. Names and units are listed in
``docs/protocol.md``.

The temperature is read at most every ``TEMPERATURE_EVERY_S`` (10 s) and the
last reading is sent with the samples in between: psutil's
``sensors_temperatures`` walks every hwmon and thermal zone in sysfs, the
dearest reading of a sample (about 85 us of about 270 us here,
docs/performance.md "Footprint"), and a SoC's temperature does not need a
reading a second. Disk usage (``disk_root_usage``, ``disk_state_usage``) and
the agent's own ``agent_rss_bytes`` are read at most every ``SLOW_EVERY_S``
(10 s) too, the last readings sent in between: they move slowly, and in the
running agent (caches cold after a second's sleep) the three calls cost about
150 us of a sample's 1.1 ms (docs/performance.md "Footprint"). Everything else
is read at every sample.

Memory and swap come from one read of ``/proc/meminfo`` on Linux, with psutil's
formulas (``memory_usage`` is ``(MemTotal - MemAvailable) / MemTotal``,
``swap_usage`` is ``(SwapTotal - SwapFree) / SwapTotal``, percent to one decimal):
``psutil.virtual_memory`` and ``psutil.swap_memory`` read that file twice and
``/proc/vmstat`` once more (for swap-in/out counts the payload does not carry),
about 80 us of a sample's 270 us. Where the file cannot be read or lacks
``MemAvailable`` (before Linux 3.14), psutil is asked as before.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import psutil

log = logging.getLogger("nexus.metrics")

# Sensor names that carry the SoC/CPU temperature, best first: Raspberry Pi, Intel, AMD, ARM SoCs.
TEMPERATURE_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal",
                       "acpitz")

TEMPERATURE_EVERY_S = 10.0
SLOW_EVERY_S = 10.0  # disk usage (both filesystems) and the agent's own RSS

TemperatureSource = Callable[[], Mapping[str, list]]

MEMINFO = "/proc/meminfo"
_MEMINFO_LINES = re.compile(rb"^(MemTotal|MemFree|MemAvailable|SwapTotal|SwapFree):\s+(\d+)", re.M)


def _percent(used: float, total: float) -> float:
    return round(used / total * 100.0, 1) if total else 0.0


def meminfo_memory(path: str = MEMINFO) -> Optional[Tuple[float, int, float]]:
    """(memory_usage %, memory_available_bytes, swap_usage %) from one read of
    ``/proc/meminfo``, as psutil computes them; None when it cannot tell."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    values = {key: int(kb) * 1024 for key, kb in _MEMINFO_LINES.findall(text)}
    total, avail = values.get(b"MemTotal", 0), values.get(b"MemAvailable", 0)
    if not total or not avail or b"SwapTotal" not in values:
        return None  # an old kernel (psutil estimates MemAvailable) or an odd file
    if avail > total:  # a container's distorted figures: psutil takes MemFree then
        avail = values.get(b"MemFree", 0)
    swap_total = values[b"SwapTotal"]
    swap_used = swap_total - values.get(b"SwapFree", 0)
    return _percent(total - avail, total), avail, _percent(swap_used, swap_total)


def _psutil_memory() -> Tuple[float, int, float]:
    vm = psutil.virtual_memory()
    return vm.percent, vm.available, psutil.swap_memory().percent


def _default_temperatures() -> Mapping[str, list]:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    return read() if read else {}


class Sampler:
    """Takes one sample at a time; holds the state psutil needs between calls."""

    def __init__(self, state_dir: str,
                 temperatures: Optional[TemperatureSource] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self._temperatures = temperatures or _default_temperatures
        self._clock = clock
        self._temperature: Optional[float] = None
        self._temperature_at: Optional[float] = None  # clock() of the last reading
        self._process = psutil.Process()
        self._boot_time = psutil.boot_time()
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        self._first = True
        self._slow: Dict[str, float] = {}
        self._slow_at: Optional[float] = None  # clock() of the last disk and RSS readings
        self._memory: Callable[[], Optional[Tuple[float, int, float]]] = meminfo_memory

    def sample(self, health: Mapping[str, float]) -> Dict[str, float]:
        """One reading of the system, plus the agent's own ``health`` figures."""
        memory = self._memory() or _psutil_memory()
        # cpu_percent compares with its previous call; right after start that is too short a
        # window to mean anything, so the first sample waits 0.2 s for a real reading.
        window = 0.2 if self._first else None
        self._first = False
        metrics: Dict[str, float] = {
            "cpu_usage": psutil.cpu_percent(interval=window),
            "memory_usage": memory[0],
            "memory_available_bytes": memory[1],
            "swap_usage": memory[2],
            "uptime_s": round(time.time() - self._boot_time, 1),
        }
        metrics.update(self._recent_slow())
        net = psutil.net_io_counters()
        if net is not None:
            metrics["net_bytes_sent"] = net.bytes_sent
            metrics["net_bytes_recv"] = net.bytes_recv
        if hasattr(os, "getloadavg"):
            metrics["load_1m"], metrics["load_5m"], metrics["load_15m"] = (
                round(x, 2) for x in os.getloadavg())
        temperature = self._recent_temperature()
        if temperature is not None:
            metrics["cpu_temp_c"] = temperature
        metrics.update(health)
        return metrics

    def _recent_slow(self) -> Dict[str, float]:
        """Disk usage and the agent's own RSS: the last readings if under ``SLOW_EVERY_S``
        old, else new ones."""
        now = self._clock()
        if self._slow_at is None or now - self._slow_at >= SLOW_EVERY_S:
            slow: Dict[str, float] = {}
            for name, path in (("disk_root_usage", "/"), ("disk_state_usage", self.state_dir)):
                try:
                    slow[name] = psutil.disk_usage(path).percent
                except OSError:
                    pass
            slow["agent_rss_bytes"] = self._process.memory_info().rss
            self._slow, self._slow_at = slow, now
        return self._slow

    def _recent_temperature(self) -> Optional[float]:
        """The last reading if under ``TEMPERATURE_EVERY_S`` old, else a new one."""
        now = self._clock()
        if self._temperature_at is None or now - self._temperature_at >= TEMPERATURE_EVERY_S:
            self._temperature, self._temperature_at = self.cpu_temperature(), now
        return self._temperature

    def cpu_temperature(self) -> Optional[float]:
        try:
            sensors = self._temperatures()
        except (OSError, ValueError) as exc:  # a flaky sysfs read must not stop sampling
            log.debug("temperature unreadable: %s", exc)
            return None
        for name in TEMPERATURE_SENSORS:
            readings = sensors.get(name)
            if readings:
                return round(float(readings[0].current), 1)
        return None

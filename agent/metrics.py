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
reading a second. Everything else is read at every sample (``disk_usage`` is
one ``statvfs``, 3 us).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, Mapping, Optional

import psutil

log = logging.getLogger("nexus.metrics")

# Sensor names that carry the SoC/CPU temperature, best first: Raspberry Pi, Intel, AMD, ARM SoCs.
TEMPERATURE_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal",
                       "acpitz")

TEMPERATURE_EVERY_S = 10.0

TemperatureSource = Callable[[], Mapping[str, list]]


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

    def sample(self, health: Mapping[str, float]) -> Dict[str, float]:
        """One reading of the system, plus the agent's own ``health`` figures."""
        vm = psutil.virtual_memory()
        # cpu_percent compares with its previous call; right after start that is too short a
        # window to mean anything, so the first sample waits 0.2 s for a real reading.
        window = 0.2 if self._first else None
        self._first = False
        metrics: Dict[str, float] = {
            "cpu_usage": psutil.cpu_percent(interval=window),
            "memory_usage": vm.percent,
            "memory_available_bytes": vm.available,
            "swap_usage": psutil.swap_memory().percent,
            "uptime_s": round(time.time() - self._boot_time, 1),
        }
        for name, path in (("disk_root_usage", "/"), ("disk_state_usage", self.state_dir)):
            try:
                metrics[name] = psutil.disk_usage(path).percent
            except OSError:
                pass
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
        metrics["agent_rss_bytes"] = self._process.memory_info().rss
        metrics.update(health)
        return metrics

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

"""The system input: the device's psutil readings and the agent's own health figures.

Section ``telemetry`` (``config.TelemetryConfig``): one sample every
``interval_s``, taken by ``metrics.Sampler``; a reload's new interval applies
from the next sample. Source name ``system``, no tags.

The metrics, in this order (the wire order, which the outbox's compression
dictionary is built around): the sampler's readings, then the agent's own figures
(``agent_queue_depth`` ... ``agent_clock_offset_s``), which the service gives
every input through ``InputEnv.own_metrics``; this input never reads the
outbox or the connection itself.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ..metrics import Sampler, TemperatureSource
from . import InputEnv, PolledInput, Sample

SECTION = "telemetry"
SOURCE = "system"


class SystemInput(PolledInput):
    def __init__(self, interval_s: float, state_dir: str,
                 own_metrics: Callable[[float], Mapping[str, float]],
                 on_fact: Callable[[], None],
                 temperatures: Optional[TemperatureSource] = None) -> None:
        super().__init__(SOURCE, SECTION, interval_s, on_fact)
        self.sampler = Sampler(state_dir, temperatures)
        self.own_metrics = own_metrics

    def gather(self, now: float) -> Sample:
        return Sample(SOURCE, now, self.sampler.sample(self.own_metrics(now)))

    def configure(self, section: Any) -> None:
        self.interval_s = section.interval_s


def build(section: Any, env: InputEnv) -> SystemInput:
    return SystemInput(section.interval_s, env.state_dir, env.own_metrics, env.on_fact)

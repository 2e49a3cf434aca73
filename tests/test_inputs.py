"""Inputs: the registry builds them from config sections; a polled input counts its own
health; the system input's metrics keep the wire order."""

from __future__ import annotations

import threading
import time

import pytest

from agent import config as config_mod
from agent.errors import ConfigError, NotStored
from agent.inputs import InputEnv, PolledInput, Sample, build, reconfigure, registry, sections_of
from agent.inputs.system import SystemInput

OWN = {"agent_queue_depth": 3, "agent_queue_bytes": 900, "agent_oldest_queued_age_s": 1.5,
       "agent_dropped": 0, "agent_reconnects": 2, "agent_clock_offset_s": 0.25}


def env(tmp_path, looks=None):
    return InputEnv(str(tmp_path), lambda now: dict(OWN),
                    (lambda: looks.append(1)) if looks is not None else (lambda: None))


def test_the_registry_builds_the_system_input_from_the_telemetry_section(tmp_path):
    assert "telemetry" in registry()
    config = config_mod.build({"device_id": "d", "state_dir": str(tmp_path),
                               "server": {"url": "ws://127.0.0.1:9/v1/ws"},
                               "telemetry": {"interval_s": 2}})
    sections = sections_of(config)
    assert sections == {"telemetry": config.telemetry}
    [system] = build(sections, env(tmp_path))
    assert isinstance(system, SystemInput)
    assert (system.source, system.section, system.interval_s) == ("system", "telemetry", 2.0)
    reconfigure([system], sections, {"telemetry": config_mod.TelemetryConfig(interval_s=0.5)})
    assert system.interval_s == 0.5


def test_a_reload_hands_an_input_its_section_only_when_it_changed(tmp_path, caplog):
    class Fixed(PolledInput):
        def gather(self, now):
            return Sample("fixed", now, {})

    fixed = Fixed("fixed", "fixed", 1.0, lambda: None)  # takes no new section: warns
    same = {"fixed": config_mod.TelemetryConfig()}
    reconfigure([fixed], same, dict(same))
    assert "does not take" not in caplog.text
    reconfigure([fixed], same, {"fixed": config_mod.TelemetryConfig(interval_s=1.0)})
    assert "input fixed does not take a new fixed section before a restart" in caplog.text
    reconfigure([fixed], same, {**same, "other": {}})
    assert "section other was added; that takes effect only after a restart" in caplog.text


def test_a_section_no_input_reads_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        build({"modbus": {}}, env(tmp_path))
    assert err.value.key == "modbus" and "telemetry" in err.value.reason


# The order the system sampler has always sent (before inputs existed): the wire payload,
# and so the outbox's compressed rows, must not change. A reading the board cannot give is
# left out, the rest keep their places.
WIRE_ORDER = ["cpu_usage", "memory_usage", "memory_available_bytes", "swap_usage", "uptime_s",
              "disk_root_usage", "disk_state_usage", "agent_rss_bytes", "net_bytes_sent",
              "net_bytes_recv", "load_1m", "load_5m", "load_15m", "cpu_temp_c", *OWN]


def test_system_metrics_keep_the_order_they_always_had(tmp_path):
    """The agent's own figures (from InputEnv.own_metrics) come last, after the readings."""
    system = SystemInput(1.0, str(tmp_path), lambda now: dict(OWN), lambda: None,
                         temperatures=lambda: {})
    sample = system.gather(1700000000.5)
    assert (sample.source, sample.time, dict(sample.tags)) == ("system", 1700000000.5, {})
    names = list(sample.metrics)
    assert names == [name for name in WIRE_ORDER if name in names]
    assert names[-len(OWN):] == list(OWN) and {"cpu_usage", "memory_usage"} <= set(names)


class Counting(PolledInput):
    """A polled input whose gather does what the test says next."""

    def __init__(self, looks):
        super().__init__("fake", "fake", 0.01, lambda: looks.append(1))
        self.next = "ok"

    def gather(self, now):
        if self.next == "boom":
            raise RuntimeError("sensor gone")
        return Sample("fake", now, {"x": 1.0})


def store_that(outcome):
    def store(sample):
        if outcome[0] is not None:
            raise outcome[0]
    return store


def test_a_polled_input_counts_failures_logs_the_first_and_wakes_the_status(tmp_path, caplog):
    looks = []
    source = Counting(looks)
    outcome = [None]
    store = store_that(outcome)
    source.once(store)
    assert source.health().samples == 1 and source.health().last_success is not None
    outcome[0] = NotStored("database or disk is full", waiting=False)
    for _ in range(3):
        source.once(store)
    source.next = "boom"
    outcome[0] = None
    source.once(store)
    health = source.health()
    assert (health.samples, health.failures, health.failing) == (1, 4, 4)
    assert looks == [1]  # the first failure of the run only
    assert caplog.text.count("cannot store samples") == 1
    source.next = "ok"
    source.once(store)
    health = source.health()
    assert (health.samples, health.failures, health.failing) == (2, 4, 0)
    assert looks == [1, 1] and "storing samples again (input fake); 4 in a row" in caplog.text


def test_a_lock_that_never_ends_is_stuck_a_full_disk_is_not(tmp_path):
    source = Counting([])
    source.interval_s = 0.0  # stuck after STUCK_GRACE_S of no progress
    source._progress -= 10.0
    source.once(store_that([NotStored("database is full", waiting=False)]))
    assert not source.health().stuck  # a full disk: a restart would not help
    source._progress -= 10.0
    source.once(store_that([NotStored("database is locked", waiting=True)]))
    assert source.health().stuck


def test_a_polled_input_runs_until_its_stop_event(tmp_path):
    source = Counting([])
    got = []
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, got.append))
    thread.start()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and len(got) >= 3
    assert all(s.source == "fake" and s.metrics == {"x": 1.0} for s in got)


def test_the_daemon_imports_only_the_inputs_its_config_names(tmp_path):
    import subprocess
    import sys

    from helpers import REPO, child_env

    code = ("import sys\nfrom agent import config\nfrom agent.inputs import sections_of\n"
            "base = {'device_id': 'd', 'state_dir': sys.argv[1], "
            "'server': {'url': 'ws://127.0.0.1:9/v1/ws'}}\n"
            "sections_of(config.build(base))\n"
            "print(sorted(m for m in sys.modules if m.startswith('agent.inputs.')))\n"
            "sections_of(config.build(dict(base, inputs={'exec': []})))\n"
            "print(sorted(m for m in sys.modules if m.startswith('agent.inputs.')))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=30)
    first, second = out.stdout.splitlines()
    assert first == "[]", out.stderr
    assert second == "['agent.inputs._lines', 'agent.inputs._settings', 'agent.inputs.exec']"

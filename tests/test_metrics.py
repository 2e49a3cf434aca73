"""psutil readings on this machine; the temperature sensor is faked (no Pi thermal zone here)."""

from __future__ import annotations

from collections import namedtuple

from agent.metrics import Sampler

Temp = namedtuple("Temp", "label current high critical")


def test_sample_has_the_guide_metrics_and_the_extras(tmp_path):
    sampler = Sampler(str(tmp_path), temperatures=lambda: {})
    m = sampler.sample({"agent_queue_depth": 3})
    assert 0 <= m["cpu_usage"] <= 100 and 0 < m["memory_usage"] <= 100
    for key in ("disk_root_usage", "disk_state_usage", "uptime_s", "net_bytes_sent",
                "load_1m", "agent_rss_bytes", "memory_available_bytes"):
        assert key in m, key
    assert m["agent_queue_depth"] == 3
    assert "cpu_temp_c" not in m  # no sensor: left out, never invented
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())


def test_temperature_prefers_the_pi_sensor(tmp_path):
    # Mocked: this machine has no Raspberry Pi thermal zone.
    sensors = {"acpitz": [Temp("", 30.0, None, None)], "cpu_thermal": [Temp("", 48.25, 80, 85)]}
    assert Sampler(str(tmp_path), temperatures=lambda: sensors).sample({})["cpu_temp_c"] == 48.2


def test_a_failing_sensor_does_not_stop_sampling(tmp_path):
    def broken():
        raise OSError("sysfs read failed")

    assert "cpu_temp_c" not in Sampler(str(tmp_path), temperatures=broken).sample({})

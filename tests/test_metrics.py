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


def test_temperature_is_read_at_most_every_ten_seconds_and_sent_with_every_sample(tmp_path):
    reads = []
    clock = [100.0]

    def sensors():
        reads.append(clock[0])
        return {"cpu_thermal": [Temp("", 40.0 + len(reads), None, None)]}

    sampler = Sampler(str(tmp_path), temperatures=sensors, clock=lambda: clock[0])
    seen = []
    for _ in range(25):  # 25 samples at 1 s
        seen.append(sampler.sample({})["cpu_temp_c"])
        clock[0] += 1.0
    assert reads == [100.0, 110.0, 120.0]  # TEMPERATURE_EVERY_S apart
    assert seen == [41.0] * 10 + [42.0] * 10 + [43.0] * 5  # the last reading in between


def test_no_sensor_is_not_looked_for_at_every_sample(tmp_path):
    calls = []
    sampler = Sampler(str(tmp_path), temperatures=lambda: calls.append(1) or {},
                      clock=lambda: 0.0)
    for _ in range(5):
        assert "cpu_temp_c" not in sampler.sample({})
    assert len(calls) == 1


MEMINFO = """MemTotal:        1000000 kB
MemFree:          100000 kB
MemAvailable:     250000 kB
Buffers:           10000 kB
SwapCached:            0 kB
SwapTotal:        400000 kB
SwapFree:         300000 kB
"""


def test_memory_and_swap_from_one_meminfo_read_with_psutils_formulas(tmp_path):
    from agent.metrics import meminfo_memory

    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert meminfo_memory(str(path)) == (75.0, 250000 * 1024, 25.0)
    path.write_text(MEMINFO.replace("400000", "0").replace("300000", "0"))  # no swap
    assert meminfo_memory(str(path))[2] == 0.0
    path.write_text(MEMINFO.replace("250000", "2000000"))  # a container's odd figures
    assert meminfo_memory(str(path))[:2] == (90.0, 100000 * 1024)  # MemFree, as psutil
    path.write_text(MEMINFO.replace("MemAvailable", "Other"))  # before Linux 3.14
    assert meminfo_memory(str(path)) is None  # psutil estimates it: ask psutil
    assert meminfo_memory(str(tmp_path / "absent")) is None


def test_meminfo_agrees_with_psutil_here():
    import psutil

    from agent.metrics import meminfo_memory

    ours = meminfo_memory()
    assert ours is not None  # Linux
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    assert abs(ours[0] - vm.percent) < 2.0 and abs(ours[2] - swap.percent) < 2.0
    assert abs(ours[1] - vm.available) < 0.02 * vm.total


def test_sampler_falls_back_to_psutil_without_meminfo(tmp_path):
    sampler = Sampler(str(tmp_path), temperatures=lambda: {})
    sampler._memory = lambda: None  # no /proc/meminfo (or no MemAvailable)
    m = sampler.sample({})
    assert 0 < m["memory_usage"] <= 100 and m["memory_available_bytes"] > 0
    assert 0 <= m["swap_usage"] <= 100


def test_disk_usage_and_own_rss_are_read_at_most_every_ten_seconds(tmp_path, monkeypatch):
    import psutil

    from agent import metrics

    clock = [100.0]
    disk_reads = []
    real = psutil.disk_usage
    monkeypatch.setattr(metrics.psutil, "disk_usage",
                        lambda path: disk_reads.append(clock[0]) or real(path))
    sampler = Sampler(str(tmp_path), temperatures=lambda: {}, clock=lambda: clock[0])
    for _ in range(25):  # 25 samples at 1 s
        m = sampler.sample({})
        assert {"disk_root_usage", "disk_state_usage", "agent_rss_bytes"} <= set(m)
        clock[0] += 1.0
    assert sorted(set(disk_reads)) == [100.0, 110.0, 120.0]  # SLOW_EVERY_S apart
    assert len(disk_reads) == 6  # both filesystems each time

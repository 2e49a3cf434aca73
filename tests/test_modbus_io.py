"""The Modbus input against real peers: pymodbus's server over TCP on loopback and over
RTU on a socat pseudo-terminal pair; a device that stops answering while another keeps
going; an exception response for one point; the daemon end to end."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import yaml
from helpers import (
    REPO,
    AgentProcess,
    ServerProcess,
    child_env,
    free_port,
    stored,
    wait_for,
    write_config,
)
from modbuskit import BlackHole, Peer, PtyPair

from agent import modbus
from agent.inputs import modbus as modbus_input
from agent.modbus_client import Port

TYPES = [("int16", -2), ("uint16", 65534), ("int32", -70000), ("uint32", 0x12345678),
         ("int64", -(2 ** 40) - 3), ("uint64", 2 ** 63 + 5), ("float32", 1.5),
         ("float64", -1234.5678)]


class Collect:
    """The store: samples by source, with the monotonic time each arrived."""

    def __init__(self):
        self.lock = threading.Lock()
        self.samples = []  # (arrived, Sample)

    def __call__(self, sample):
        with self.lock:
            self.samples.append((time.monotonic(), sample))

    def of(self, source):
        with self.lock:
            return [(t, s) for t, s in self.samples if s.source == source]


class Counted(Port):
    """A real port that counts its requests."""

    def __init__(self, endpoint, timeout_s):
        super().__init__(endpoint, timeout_s)
        self.requests = 0

    def read(self, table, address, count, unit):
        self.requests += 1
        return super().read(table, address, count, unit)


class Running:
    """A ModbusInput on its own thread until ``stop()``."""

    def __init__(self, devices_raw, open_port=Counted):
        self.devices = modbus.check(devices_raw, "inputs.modbus")
        self.facts = []
        self.input = modbus_input.ModbusInput(self.devices, lambda: self.facts.append(1),
                                              open_port)
        self.store = Collect()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.input.run,
                                       args=(self.stop_event, self.store), daemon=True)
        self.thread.start()

    def device(self, name):
        return self.input.report()["devices"][name]

    def stop(self):
        self.stop_event.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def cleanup():
    items = []
    yield items.append
    for item in reversed(items):
        (item.stop if hasattr(item, "stop") else item.close)()


def typed_points(table="holding", start=0):
    """Every type in both word orders, back to back, and the registers that hold them."""
    points, registers, expected, address = [], {}, {}, start
    for type_, value in TYPES:
        for order in ("big", "little"):
            name = f"{type_}_{order}"
            point = {"name": name, "table": table, "address": address, "type": type_}
            if modbus.TYPES[type_][0] > 1:
                point["word_order"] = order
            elif order == "little":
                continue
            points.append(point)
            for i, word in enumerate(modbus.encode(type_, value, order)):
                registers[address + i] = word
            expected[name] = value
            address += modbus.TYPES[type_][0]
    return points, registers, expected


def test_every_type_in_both_word_orders_from_a_pymodbus_server_over_tcp(cleanup):
    holding, hregs, expected = typed_points("holding")
    inputs, iregs, iexpected = typed_points("input", start=100)
    peer = Peer({1: {"holding": hregs, "input": iregs, "coil": {3: 1, 5: 0},
                     "discrete": {0: 1}}})
    cleanup(peer)
    scaled = {"name": "scaled", "table": "holding", "address": 200, "type": "int16",
              "scale": 0.5, "offset": 10}
    points = holding + [{**p, "name": "in_" + p["name"]} for p in inputs] + [scaled] + [
        {"name": "running", "table": "coil", "address": 3, "type": "bool"},
        {"name": "stopped", "table": "coil", "address": 5, "type": "bool"},
        {"name": "door", "table": "discrete", "address": 0, "type": "bool"}]
    run = Running([{"name": "plc", "url": peer.url, "unit": 1, "interval_s": 0.2,
                    "timeout_s": 1, "points": points}])
    cleanup(run)
    [(_, sample)] = wait_for(lambda: run.store.of("plc")[:1], what="a sample")
    assert run.facts == [1]  # the first "reading" wakes the status file (not logged)
    want = {**expected, **{"in_" + k: v for k, v in iexpected.items()}, "scaled": 10.0,
            "running": 1, "stopped": 0, "door": 1}
    assert dict(sample.metrics) == want
    assert list(sample.metrics) == [p["name"] for p in points]  # the config's order
    assert abs(sample.time - time.time()) < 5
    # 34 points in 5 requests: coils 3 and 5 together, the discrete input, holding 0-35,
    # holding 200 (too far to merge), input 100-135.
    port = run.input.loops[0].port
    wait_for(lambda: len(run.store.of("plc")) >= 2, what="a second sample")
    polls = run.device("plc")["polls"]
    assert port.requests in (5 * polls, 5 * (polls + 1))  # a poll may be under way
    report = run.device("plc")
    assert report["condition"] == "reading" and report["errors"] == {}
    assert report["last_good"] is not None


def test_two_units_on_one_rtu_bus_share_one_thread(tmp_path, cleanup):
    pty = PtyPair(tmp_path)
    cleanup(pty)
    peer = Peer({1: {"holding": {0: 111, 1: 112}}, 2: {"holding": {0: 221, 1: 222}}},
                serial=pty.b, baudrate=115200)
    cleanup(peer)
    url = f"rtu://{pty.a}?baudrate=115200"
    two = [{"name": f"meter-{u}", "url": url, "unit": u, "interval_s": 0.1, "timeout_s": 0.5,
            "points": [{"name": "a", "table": "holding", "address": 0, "type": "uint16"},
                       {"name": "b", "table": "holding", "address": 1, "type": "uint16"}]}
           for u in (1, 2)]
    run = Running(two)
    cleanup(run)
    assert len(run.input.loops) == 1  # one bus, one conversation at a time
    wait_for(lambda: len(run.store.of("meter-1")) >= 3 and len(run.store.of("meter-2")) >= 3,
             what="samples of both units")
    assert dict(run.store.of("meter-1")[-1][1].metrics) == {"a": 111, "b": 112}
    assert dict(run.store.of("meter-2")[-1][1].metrics) == {"a": 221, "b": 222}
    assert run.device("meter-2")["errors"] == {}


def test_a_unit_missing_from_the_bus_is_not_read_and_the_other_is(tmp_path, cleanup):
    """The missing unit times out (pymodbus 3.8's server stays silent) or gets exception 4
    (later servers answer for it, modbuskit's docstring); either way nothing is invented
    and the unit that is there is read at its pace."""
    pty = PtyPair(tmp_path)
    cleanup(pty)
    peer = Peer({1: {"input": {4: 7}}}, serial=pty.b, baudrate=115200)
    cleanup(peer)
    url = f"rtu://{pty.a}?baudrate=115200"
    run = Running([{"name": f"m{u}", "url": url, "unit": u, "interval_s": 0.1,
                    "timeout_s": 0.2,
                    "points": [{"name": "x", "table": "input", "address": 4, "type": "uint16"}]}
                   for u in (1, 9)])
    cleanup(run)
    wait_for(lambda: sum(run.device("m9")["errors"].values()) >= 3, what="failed reads")
    wait_for(lambda: len(run.store.of("m1")) >= 5, what="m1 read meanwhile")
    assert run.store.of("m9") == []  # nothing invented for the missing unit
    condition = run.device("m9")["condition"]
    assert condition.startswith(("not read: timeout", "not read: exception: exception 4")), \
        condition
    assert dict(run.store.of("m1")[-1][1].metrics) == {"x": 7}


def test_a_device_that_stops_answering_does_not_delay_another(cleanup):
    good, bad = Peer({1: {"holding": {0: 1}}}), Peer({1: {"holding": {0: 2}}})
    hole = BlackHole()
    for item in (good, bad, hole):
        cleanup(item)
    point = [{"name": "v", "table": "holding", "address": 0, "type": "uint16"}]
    run = Running([{"name": n, "url": u, "unit": 1, "interval_s": 0.1, "timeout_s": 1.0,
                    "points": point}
                   for n, u in (("good", good.url), ("bad", bad.url), ("hung", hole.url))])
    cleanup(run)
    wait_for(lambda: run.store.of("bad"), what="the bad device's first sample")
    bad.stop()  # refused from now on: connection lost, reopened with backoff
    stopped_at = time.monotonic()
    wait_for(lambda: run.device("bad")["errors"].get("connection"), what="the lost connection")
    wait_for(lambda: run.device("hung")["errors"].get("timeout", 0) >= 2, what="timeouts")
    wait_for(lambda: len([t for t, _ in run.store.of("good") if t > stopped_at]) >= 10,
             what="the good device read meanwhile")
    arrivals = [t for t, _ in run.store.of("good") if t > stopped_at]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.6, gaps  # 0.1 s apart: never waits for a 1 s timeout
    assert run.store.of("hung") == []
    hung = run.device("hung")
    assert hung["condition"].startswith("not read: timeout") and hung["last_good"] is None
    bad_report = run.device("bad")
    assert bad_report["last_good"] is not None and "connection" in bad_report["condition"]
    assert set(bad_report["failing"]) == {"v"}


def test_a_lost_connection_is_reopened_and_logged_once_per_change(cleanup, caplog):
    peer = Peer({1: {"holding": {0: 5}}})
    cleanup(peer)
    port = peer.port
    run = Running([{"name": "plc", "url": peer.url, "unit": 1, "interval_s": 0.05,
                    "timeout_s": 0.3,
                    "points": [{"name": "v", "table": "holding", "address": 0,
                                "type": "uint16"}]}])
    cleanup(run)
    wait_for(lambda: run.store.of("plc"), what="a first sample")
    peer.stop()
    wait_for(lambda: run.device("plc")["polls"] >= 20 and
             "connection" in run.device("plc")["condition"], what="twenty polls while down")
    again = Peer({1: {"holding": {0: 6}}}, port=port)
    cleanup(again)
    wait_for(lambda: run.store.of("plc")[-1][1].metrics["v"] == 6, timeout=10,
             what="a sample from the restarted peer")
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus.inputs.modbus"]
    assert len(lines) == 2, lines  # "not read: connection ..." then "reading", not per poll
    assert "not read: connection" in lines[0] and lines[1].endswith(": reading")


def test_an_exception_response_names_its_point_and_the_others_are_read(cleanup):
    peer = Peer({1: {"holding": {297: 1, 298: 2}}}, size=300)  # 300 and on: illegal
    cleanup(peer)
    points = [{"name": "a", "table": "holding", "address": 297, "type": "uint16"},
              {"name": "b", "table": "holding", "address": 298, "type": "uint16"},
              {"name": "beyond", "table": "holding", "address": 300, "type": "uint16"}]
    run = Running([{"name": "plc", "url": peer.url, "unit": 1, "interval_s": 0.1,
                    "timeout_s": 1, "points": points}])
    cleanup(run)
    wait_for(lambda: len(run.store.of("plc")) >= 2, what="two samples")
    assert [dict(s.metrics) for _, s in run.store.of("plc")[:2]] == [{"a": 1, "b": 2}] * 2
    report = run.device("plc")
    assert report["failing"] == {"beyond": "exception: exception 2 (illegal data address)"}
    assert report["condition"].startswith("points failing: beyond")
    assert report["last_good"] is None and report["last_read"] is not None
    assert run.input.loops[0].pollers[0].isolated == {"a", "b", "beyond"}


# --------------------------------------------------------------------------- the daemon

MODULES = """
import os, signal, sys, threading, time
def watch():
    while not any(t.name == "nexus-transport" for t in threading.enumerate()):
        time.sleep(0.05)
    time.sleep(0.3)
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("pymodbus", "serial")
                 or m.startswith("agent.modbus")), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from agent.__main__ import main
main(["--config", sys.argv[1]])
"""


def test_without_a_modbus_input_nothing_of_pymodbus_is_loaded(tmp_path):
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", log_level="warning")
    out = subprocess.run([sys.executable, "-c", MODULES, str(config)], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=30)
    # Not even the Modbus core: the registry reads each input module's SECTION line and
    # imports only the inputs the config names (issue 24).
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # ...and with one, it is (the same probe, so the probe can see it)
    peer = Peer({1: {"holding": {0: 1}}})
    try:
        config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", log_level="warning",
                              inputs={"modbus": [{
                                  "name": "m", "url": peer.url, "unit": 1,
                                  "points": [{"name": "v", "table": "holding", "address": 0,
                                              "type": "uint16"}]}]})
        out = subprocess.run([sys.executable, "-c", MODULES, str(config)], cwd=REPO,
                             env=child_env(), capture_output=True, text=True, timeout=30)
        assert "'pymodbus'" in out.stdout and "'agent.modbus_client'" in out.stdout, out
    finally:
        peer.stop()


def test_the_daemon_delivers_modbus_samples_and_shows_each_device(tmp_path, cleanup):
    peer = Peer({7: {"input": {0: 230, 1: 231}}})
    cleanup(peer)
    srv = ServerProcess(db=str(tmp_path / "server.db"))
    config = write_config(tmp_path, srv.url, telemetry={"interval_s": 5}, inputs={"modbus": [
        {"name": "meter-1", "url": peer.url, "unit": 7, "interval_s": 0.2, "timeout_s": 0.5,
         "points": [{"name": "voltage_l1", "table": "input", "address": 0, "type": "uint16",
                     "scale": 0.1}]},
        {"name": "meter-2", "url": "tcp://127.0.0.1:1", "unit": 1, "interval_s": 0.2,
         "points": [{"name": "voltage_l2", "table": "input", "address": 1, "type": "uint16"}]},
    ]})
    agent = AgentProcess(config)
    try:
        rows = wait_for(lambda: [r for r in stored(tmp_path / "server.db")
                                 if "voltage_l1" in r["payload"]["metrics"]][:2],
                        what="modbus samples at the server")
        # The device's name is the sample's source on the wire (issue 24): the fleet page
        # lists the meter under the device's sources, not in its own readings' row.
        assert rows[0]["payload"] == {"device_id": "device-001", "source": "meter-1",
                                      "metrics": {"voltage_l1": 23.0}}
        devices = wait_for(lambda: agent.status().get("input_details", {}).get("modbus", {})
                           .get("devices", {}).get("meter-2", {}).get("errors") and
                           agent.status()["input_details"]["modbus"]["devices"],
                           what="the status of both devices")
        assert devices["meter-1"]["condition"] == "reading"
        assert "connection" in devices["meter-2"]["errors"]
        shown = subprocess.run([sys.executable, "-m", "agent", "status", "--config",
                                str(config)], cwd=REPO, env=child_env(), capture_output=True,
                               text=True, timeout=30).stdout
        assert "meter-1" in shown and "meter-2" in shown and "not read: connection" in shown
    finally:
        assert agent.stop() == 0
        srv.stop()
    assert yaml.safe_load(config.read_text())["inputs"]["modbus"][0]["unit"] == 7


# --------------------------------------------------------------------------- commands


def nexus_agent(*args):
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=30)


def test_modbus_read_prints_each_value_or_error(tmp_path, cleanup):
    peer = Peer({1: {"holding": {0: 0x3FC0, 1: 0, 298: 9}, "coil": {2: 1}}}, size=300)
    cleanup(peer)
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", inputs={"modbus": [
        {"name": "plc", "url": peer.url, "unit": 1, "timeout_s": 1, "points": [
            {"name": "temp", "table": "holding", "address": 0, "type": "float32"},
            {"name": "pump", "table": "coil", "address": 2, "type": "bool"}]},
        {"name": "meter", "url": peer.url, "unit": 1, "timeout_s": 1, "points": [
            {"name": "ok", "table": "holding", "address": 298, "type": "uint16"},
            {"name": "gone", "table": "holding", "address": 300, "type": "uint16"}]}]})
    out = nexus_agent("modbus", "read", "--config", str(config))
    assert out.returncode == 1, out
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plc (tcp://127.0.0.1:") and "2 points, 2 requests" in lines[0]
    assert lines[1].split() == ["temp", "=", "1.5", "[holding", "0", "float32]"]
    assert lines[2].split() == ["pump", "=", "1", "[coil", "2", "bool]"]
    assert "1 requests planned (2 failed: exception)" in lines[3]  # merged, then "gone"
    assert lines[4].split()[:3] == ["ok", "=", "9"]
    assert "gone  NOT READ  exception: exception 2 (illegal data address)" in lines[5]
    only = nexus_agent("modbus", "read", "--config", str(config), "plc")
    assert only.returncode == 0 and "meter" not in only.stdout, only
    none = nexus_agent("modbus", "read", "--config", str(config), "boiler")
    assert none.returncode == 2 and "devices: plc, meter" in none.stderr


def test_check_config_refuses_a_bad_point_by_its_key(tmp_path):
    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", inputs={"modbus": [
        {"name": "plc", "url": "tcp://127.0.0.1:1502", "unit": 1, "points": [
            {"name": "a", "table": "holding", "address": 0, "type": "uint16"},
            {"name": "b", "table": "holding", "address": 1, "type": "int32"},
            {"name": "c", "table": "coil", "address": 1, "type": "uint16"}]}]})
    out = nexus_agent("--check-config", "--config", str(config))
    assert out.returncode == 78
    assert "inputs.modbus[0].points[2].type: uint16 does not fit table coil" in out.stderr


def test_a_missing_library_is_a_config_error_naming_the_section(tmp_path, monkeypatch, capsys):
    from agent import cli

    config = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", inputs={"modbus": [
        {"name": "plc", "url": "tcp://127.0.0.1:1502", "unit": 1, "points": [
            {"name": "a", "table": "holding", "address": 0, "type": "uint16"}]}]})
    assert cli.load_config(str(config), check_files=True) is not None
    monkeypatch.setattr(modbus_input, "REQUIRES", ("no_such_library_here",))
    assert cli.load_config(str(config), check_files=True) is None
    assert "inputs.modbus: needs no_such_library_here, which is not installed" in \
        capsys.readouterr().err


# --------------------------------------------------------------------------- the input's own health


class ScriptedPort:
    """A port whose every read answers ``value`` (no peer: the input's bookkeeping)."""

    endpoint = modbus.Endpoint("tcp", "127.0.0.1", 1502)
    is_open = True

    def __init__(self, endpoint=None, timeout_s=None):
        self.value = 1

    def read(self, table, address, count, unit):
        return [self.value] * count

    def close(self):
        pass


def test_samples_the_outbox_refuses_are_counted_and_the_recovery_logged(caplog):
    from agent.errors import NotStored

    devices = modbus.check([{"name": "m", "url": "tcp://127.0.0.1:1502", "unit": 1,
                             "points": [{"name": "v", "table": "holding", "address": 0,
                                         "type": "uint16"}]}], "inputs.modbus")
    facts = []
    item = modbus_input.ModbusInput(devices, lambda: facts.append(1), ScriptedPort)
    [loop] = item.loops
    [poller] = loop.pollers
    outcomes = []

    def store(sample):
        if outcomes and outcomes.pop(0):
            raise NotStored("database or disk is full", waiting=False)

    outcomes[:] = [True, True, False]
    for _ in range(3):
        loop.poll(poller, store)
    health = item.health()
    assert (health.samples, health.failures, health.failing) == (1, 2, 0)
    assert health.last_success is not None and not health.stuck
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot store samples (input modbus)" in m for m in messages) == 1
    assert any("storing modbus samples again; 2 in a row" in m for m in messages)
    assert len(facts) == 3  # the first "reading", the first refusal, the recovery


def test_a_port_thread_without_progress_marks_the_input_stuck():
    devices = modbus.check([{"name": "m", "url": "tcp://127.0.0.1:1502", "unit": 1,
                             "interval_s": 2, "timeout_s": 1,
                             "points": [{"name": "v", "table": "holding", "address": 0,
                                         "type": "uint16"}]}], "inputs.modbus")
    item = modbus_input.ModbusInput(devices, lambda: None, ScriptedPort)
    [loop] = item.loops
    assert loop.stuck_after == 3 * 2 + 5 + 2 * 1  # intervals, grace, (1 request + 1) timeouts
    assert not item.health().stuck
    loop.progress -= loop.stuck_after
    assert item.health().stuck


def test_the_port_turns_every_failure_into_a_point_error(cleanup):
    hole = BlackHole()
    cleanup(hole)
    port = Port(modbus.parse_url(hole.url, "url"), 0.2)
    with pytest.raises(modbus.PointError) as err:
        port.read("holding", 0, 1, 1)
    assert err.value.kind == "timeout" and not port.is_open  # closed: no late answer later
    refused = Port(modbus.Endpoint("tcp", "127.0.0.1", free_port()), 0.2)  # nobody there
    with pytest.raises(modbus.PointError) as err:
        refused.read("holding", 0, 1, 1)
    assert err.value.kind == "connection"

    class Surprising:
        def read_holding_registers(self, *args, **kwargs):
            raise RuntimeError("a library surprise")

        def close(self):
            pass

    odd = Port(modbus.Endpoint("tcp", "127.0.0.1", 1), 0.2)
    odd._client = Surprising()
    with pytest.raises(modbus.PointError) as err:
        odd.read("holding", 0, 1, 1)
    assert (err.value.kind, err.value.detail) == ("error", "RuntimeError: a library surprise")
    assert not odd.is_open

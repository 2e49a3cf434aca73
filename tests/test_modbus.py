"""agent/modbus.py without I/O: the inputs.modbus section, request planning, decoding,
a poll through a fake port, and the health that logs once per change."""

from __future__ import annotations

import math
import struct

import pytest

from agent import config as config_mod
from agent import modbus
from agent.errors import ConfigError
from agent.inputs import sections_of

EXAMPLE = [{
    "name": "meter-1", "url": "tcp://192.168.1.50:502", "unit": 1, "interval_s": 5,
    "timeout_s": 1,
    "points": [
        {"name": "voltage", "table": "input", "address": 0, "type": "float32"},
        {"name": "energy_kwh", "table": "holding", "address": 10, "type": "uint32",
         "word_order": "little", "scale": 0.01},
        {"name": "running", "table": "coil", "address": 3, "type": "bool"},
    ]}]


def agent_config(tmp_path, modbus_section):
    return config_mod.build({"device_id": "d", "state_dir": str(tmp_path),
                             "server": {"url": "ws://127.0.0.1:9/v1/ws"},
                             "inputs": {"modbus": modbus_section}})


def refused(tmp_path, section) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        agent_config(tmp_path, section)
    return err.value


def with_points(*points, **device):
    return [{**EXAMPLE[0], **device, "points": list(points)}]


# --------------------------------------------------------------------------- the section


def test_the_issues_example_is_the_contract(tmp_path):
    cfg = agent_config(tmp_path, EXAMPLE)
    [device] = cfg.inputs["inputs.modbus"]
    assert sections_of(cfg)["inputs.modbus"] == (device,)
    assert (device.name, device.unit, device.interval_s, device.timeout_s) == \
        ("meter-1", 1, 5.0, 1.0)
    assert device.endpoint == modbus.Endpoint("tcp", host="192.168.1.50", port=502)
    assert device.points[1] == modbus.Point("energy_kwh", "holding", 10, "uint32", "little",
                                            0.01, 0.0)
    assert (device.max_registers, device.max_bits) == (125, 2000)


def test_rtu_urls_carry_the_line_settings():
    e = modbus.parse_url("rtu:///dev/ttyUSB0?baudrate=9600&parity=E&stopbits=2&bytesize=7", "k")
    assert e == modbus.Endpoint("rtu", device="/dev/ttyUSB0", baudrate=9600, parity="E",
                                stopbits=2, bytesize=7)
    assert e.label == "rtu:///dev/ttyUSB0"
    assert modbus.parse_url("rtu:///dev/ttyS1?baudrate=19200", "k").parity == "N"
    assert modbus.parse_url("tcp://plc.local", "k").port == 502


@pytest.mark.parametrize("url", [
    "tcp://", "tcp://host:99999", "tcp://host:502/path", "http://host:502", "host:502",
    "rtu://dev/ttyUSB0?baudrate=9600", "rtu:///dev/ttyUSB0", "rtu:///dev/ttyUSB0?baudrate=x",
    "rtu:///dev/ttyUSB0?baudrate=9600&parity=X", "rtu:///dev/ttyUSB0?baudrate=9600&speed=1",
    "rtu:///dev/ttyUSB0?baudrate=9600&stopbits=3", 42])
def test_an_unparsable_url_is_refused_by_its_key(tmp_path, url):
    assert refused(tmp_path, with_points(EXAMPLE[0]["points"][0], url=url)).key == \
        "inputs.modbus[0].url"


@pytest.mark.parametrize("point, key, words", [
    ({"table": "coil", "type": "uint16"}, "points[1].type", "does not fit table coil"),
    ({"table": "discrete", "type": "float32"}, "points[1].type", "does not fit"),
    ({"table": "holding", "type": "bool"}, "points[1].type", "does not fit table holding"),
    ({"table": "input", "type": "int8"}, "points[1].type", "must be one of"),
    ({"table": "register", "type": "int16"}, "points[1].table", "must be one of"),
    ({"table": "holding", "type": "int16", "address": 65536}, "points[1].address",
     "between 0 and 65535"),
    ({"table": "holding", "type": "int16", "address": -1}, "points[1].address", "between"),
    ({"table": "holding", "type": "uint32", "address": 65535}, "points[1].address",
     "ends at register 65536"),
    ({"table": "input", "type": "float64", "address": 65533}, "points[1].address",
     "ends at register 65536"),
    ({"table": "holding", "type": "int16", "word_order": "little"}, "points[1].word_order",
     "two or four registers"),
    ({"table": "holding", "type": "int32", "word_order": "middle"}, "points[1].word_order",
     "big or little"),
    ({"table": "coil", "type": "bool", "scale": 2}, "points[1].scale", "bool"),
    ({"table": "holding", "type": "int16", "colour": "red"}, "points[1].colour", "unknown"),
])
def test_a_point_that_cannot_be_is_refused_naming_its_key(tmp_path, point, key, words):
    first = {"name": "a", "table": "input", "address": 0, "type": "uint16"}
    err = refused(tmp_path, with_points(first, {"name": "b", "address": 100, **point}))
    assert err.key == f"inputs.modbus[0].{key}" and words in err.reason, err


def test_the_last_register_fits(tmp_path):
    cfg = agent_config(tmp_path, with_points(
        {"name": "a", "table": "holding", "address": 65534, "type": "uint32"},
        {"name": "b", "table": "coil", "address": 65535, "type": "bool"}))
    assert cfg.inputs["inputs.modbus"][0].points[0].end == 65535


def test_overlapping_points_of_one_table_are_refused_but_not_across_tables(tmp_path):
    err = refused(tmp_path, with_points(
        {"name": "a", "table": "holding", "address": 10, "type": "float64"},  # 10-13
        {"name": "b", "table": "input", "address": 11, "type": "uint16"},  # other table: fine
        {"name": "c", "table": "holding", "address": 13, "type": "uint16"}))
    assert err.key == "inputs.modbus[0].points[2].address"
    assert "c overlaps a (inputs.modbus[0].points[0]) in table holding" in err.reason
    # the point listed first may be the one with the higher address
    err = refused(tmp_path, with_points(
        {"name": "x", "table": "input", "address": 5, "type": "uint16"},
        {"name": "y", "table": "input", "address": 4, "type": "int32"}))
    assert err.key == "inputs.modbus[0].points[1].address" and "y overlaps x" in err.reason


def test_names_are_unique_and_buses_have_one_speed(tmp_path):
    point = EXAMPLE[0]["points"][0]
    err = refused(tmp_path, with_points(point, {**point, "address": 50}))
    assert err.key == "inputs.modbus[0].points[1].name"
    err = refused(tmp_path, EXAMPLE + [{**EXAMPLE[0], "url": "tcp://10.0.0.2"}])
    assert err.key == "inputs.modbus[1].name"
    bus = "rtu:///dev/ttyUSB0?baudrate="
    err = refused(tmp_path, [{**EXAMPLE[0], "url": bus + "9600"},
                             {**EXAMPLE[0], "name": "m2", "url": bus + "19200", "unit": 2}])
    assert err.key == "inputs.modbus[1].url" and "one speed" in err.reason


@pytest.mark.parametrize("change, key", [
    ({"unit": 256}, "unit"), ({"unit": "1"}, "unit"), ({"interval_s": 0}, "interval_s"),
    ({"timeout_s": True}, "timeout_s"), ({"points": []}, "points"),
    ({"max_registers_per_request": 126}, "max_registers_per_request"),
    ({"max_bits_per_request": 2001}, "max_bits_per_request"), ({"name": "a b"}, "name"),
    ({"speed": 1}, "speed")])
def test_device_keys_are_checked(tmp_path, change, key):
    assert refused(tmp_path, [{**EXAMPLE[0], **change}]).key == f"inputs.modbus[0].{key}"


def test_an_unknown_input_kind_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_mod.build({"device_id": "d", "state_dir": str(tmp_path),
                          "server": {"url": "ws://127.0.0.1:9/v1/ws"},
                          "inputs": {"opcua": []}})
    assert err.value.key == "inputs.opcua" and "modbus" in err.value.reason
    assert refused(tmp_path, {"name": "x"}).key == "inputs.modbus"


# --------------------------------------------------------------------------- planning


def device(points, **kw):
    return modbus.Device("d", "tcp://h", modbus.Endpoint("tcp", "h"), 1, 1.0, 1.0,
                         tuple(points), **kw)


def p(name, table, address, type_="uint16"):
    return modbus.Point(name, table, address, type_)


def test_adjacent_points_are_one_request_and_far_ones_two():
    d = device([p("a", "holding", 0), p("b", "holding", 1, "float32"),
                p("c", "holding", 3 + modbus.GAP_REGISTERS),  # a gap of 8: merged
                p("d", "holding", 200), p("e", "coil", 0, "bool"), p("f", "coil", 70, "bool"),
                p("g", "input", 5)])
    requests = modbus.plan(d)
    assert [(r.table, r.address, r.count, [x.name for x in r.points]) for r in requests] == [
        ("coil", 0, 1, ["e"]), ("coil", 70, 1, ["f"]),  # 69 bits apart: more than GAP_BITS
        ("holding", 0, 12, ["a", "b", "c"]), ("holding", 200, 1, ["d"]),
        ("input", 5, 1, ["g"])]


def test_a_hundred_points_take_as_few_requests_as_the_limits_allow():
    hundred = [p(f"r{i}", "holding", i) for i in range(100)]
    assert len(modbus.plan(device(hundred))) == 1
    floats = [p(f"f{i}", "input", 2 * i, "float32") for i in range(100)]  # 200 registers
    requests = modbus.plan(device(floats))
    assert [(r.address, r.count) for r in requests] == [(0, 124), (124, 76)]  # no split value
    small = modbus.plan(device(hundred, max_registers=10))
    assert len(small) == 10 and all(r.count <= 10 for r in small)
    bits = [p(f"b{i}", "coil", i, "bool") for i in range(2500)]
    assert [r.count for r in modbus.plan(device(bits))] == [2000, 500]
    assert len(modbus.plan(device(bits, max_bits=100))) == 25


def test_an_isolated_point_is_read_on_its_own():
    d = device([p("a", "holding", 0), p("b", "holding", 1), p("c", "holding", 2)])
    assert [[x.name for x in r.points] for r in modbus.plan(d, frozenset({"b"}))] == \
        [["a"], ["b"], ["c"]]


# --------------------------------------------------------------------------- decoding


# Hand-made register images (big-endian words, high word first for word_order big).
KNOWN = [
    ("int16", -2, [0xFFFE]), ("uint16", 65534, [0xFFFE]),
    ("int32", -70000, [0xFFFE, 0xEE90]), ("uint32", 0x12345678, [0x1234, 0x5678]),
    ("int64", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("uint64", 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("float32", 1.5, [0x3FC0, 0x0000]), ("float32", -0.15625, [0xBE20, 0x0000]),
    ("float64", 1.5, [0x3FF8, 0, 0, 0])]


@pytest.mark.parametrize("type_, value, words", KNOWN)
@pytest.mark.parametrize("order", ["big", "little"])
def test_every_type_decodes_in_both_word_orders(type_, value, words, order):
    image = words if order == "big" else words[::-1]
    point = modbus.Point("x", "holding", 0, type_, order)
    assert modbus.decode(point, image) == value
    assert modbus.encode(type_, value, order) == image


def test_scale_offset_and_bool():
    point = modbus.Point("e", "holding", 0, "uint32", "little", scale=0.01, offset=-1.0)
    assert modbus.decode(point, [0x5678, 0x1234]) == pytest.approx(0x12345678 * 0.01 - 1)
    assert modbus.decode(modbus.Point("r", "coil", 0, "bool"), [True]) == 1
    assert modbus.decode(modbus.Point("r", "coil", 0, "bool"), [0]) == 0
    value = modbus.decode(modbus.Point("n", "input", 0, "int16"), [0x8000])
    assert value == -32768 and isinstance(value, int)


def test_a_nan_register_is_a_point_error_not_a_value():
    nan = [int.from_bytes(struct.pack(">f", math.nan)[i:i + 2], "big") for i in (0, 2)]
    request = modbus.Request("input", 0, 3, (modbus.Point("t", "input", 0, "float32"),
                                             modbus.Point("u", "input", 2, "uint16")))
    out = modbus.values(request, nan + [7])
    assert isinstance(out["t"], modbus.PointError) and out["t"].kind == "value"
    assert out["u"] == 7


# --------------------------------------------------------------------------- a poll


class FakePort:
    """Registers by address; an address in ``illegal`` answers exception 2, ``dead``
    times out."""

    def __init__(self, illegal=(), dead=False):
        self.illegal, self.dead, self.requests = set(illegal), dead, []

    def read(self, table, address, count, unit):
        self.requests.append((table, address, count))
        if self.dead:
            raise modbus.PointError("timeout", "no answer within 1 s")
        if self.illegal & set(range(address, address + count)):
            raise modbus.PointError("exception", modbus.exception_name(2))
        return [address + i for i in range(count)]


def test_an_exception_for_a_merged_request_names_its_point_and_reads_the_rest():
    d = device([p("a", "holding", 0), p("b", "holding", 1), p("c", "holding", 2),
                p("z", "input", 0)])
    port = FakePort(illegal={1})
    result, kinds, isolated = modbus.poll(d, port.read)
    assert result["a"] == 0 and result["c"] == 2 and result["z"] == 0
    assert str(result["b"]) == "exception: exception 2 (illegal data address)"
    assert kinds == ["exception", "exception"] and isolated == {"a", "b", "c"}
    assert port.requests == [("holding", 0, 3), ("holding", 0, 1), ("holding", 1, 1),
                             ("holding", 2, 1), ("input", 0, 1)]
    port.requests.clear()
    modbus.poll(d, port.read, isolated)  # the next poll does not try the merged read again
    assert port.requests[0] == ("holding", 0, 1) and len(port.requests) == 4


def test_a_device_that_does_not_answer_is_asked_once_a_poll():
    d = device([p("a", "holding", 0), p("b", "holding", 500), p("c", "input", 0)])
    port = FakePort(dead=True)
    result, kinds, _ = modbus.poll(d, port.read)
    assert len(port.requests) == 1 and kinds == ["timeout"]
    assert all(isinstance(v, modbus.PointError) and v.kind == "timeout"
               for v in result.values()) and list(result) == ["a", "b", "c"]


def test_health_logs_a_line_per_change_never_per_poll():
    h = modbus.DeviceHealth("m", "tcp://h:502", 1)
    ok = {"a": 1, "b": 2}
    assert h.record(ok, [], 10.0) is None  # working from the start is not news
    assert h.record(ok, [], 11.0) is None
    timeout = modbus.PointError("timeout", "no answer within 1 s")
    line = h.record({"a": timeout, "b": timeout}, ["timeout"], 12.0)
    assert line == "modbus device m (tcp://h:502, unit 1): not read: timeout (no answer " \
                   "within 1 s)"
    assert h.record({"a": timeout, "b": timeout}, ["timeout"], 13.0) is None
    other = modbus.PointError("timeout", "no answer within 1 s (another wording)")
    assert h.record({"a": other, "b": timeout}, ["timeout"], 13.5) is None  # same condition
    bad = modbus.PointError("exception", modbus.exception_name(2))
    line = h.record({"a": 1, "b": bad}, ["exception"], 14.0)
    assert line is not None and "points failing: b (exception: exception 2 (illegal data " \
        "address))" in line
    assert h.record(ok, [], 15.0).endswith(": reading")
    report = h.report()
    assert report["errors"] == {"timeout": 3, "exception": 1} and report["polls"] == 7
    assert (report["last_good"], report["last_read"], report["failing"]) == (15.0, 15.0, {})


def test_the_commented_example_in_agent_example_yaml_is_valid(tmp_path):
    """config/agent.example.yaml's inputs: block, uncommented, is the issue's contract."""
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parent.parent / "config" / "agent.example.yaml") \
        .read_text()
    block = text[text.index("# inputs:"):].splitlines()
    raw = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:]
                                   for line in block))
    cfg = agent_config(tmp_path, raw["inputs"]["modbus"])
    assert cfg.inputs["inputs.modbus"] == agent_config(tmp_path, EXAMPLE).inputs["inputs.modbus"]


def test_a_device_may_not_be_called_system(tmp_path):
    """Its name is its samples' source on the wire (issue 24), and "system" there means the
    agent's own readings."""
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        agent_config(tmp_path, [dict(EXAMPLE[0], name="system")])
    assert err.value.key == "inputs.modbus[0].name" and "agent's own" in err.value.reason

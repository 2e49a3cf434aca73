"""Real Modbus peers for tests and the bench: pymodbus's own server on its own thread and
event loop, over TCP on 127.0.0.1 or RTU on one end of a socat pseudo-terminal pair.

Works with pymodbus 3.8 (``ModbusSlaveContext``, ``slaves=``) and later
(``ModbusDeviceContext``, ``devices=``). A unit id the RTU server does not hold gets no
answer from 3.8's server (a silent unit on the bus); 3.16's answers exception 4 instead
(its simulator core looks the unit up without the "ignore missing devices" check).
Addresses are the protocol's (0-based): a block starts at 1 because the server's
context adds one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from helpers import free_port, wait_for

pymodbus = pytest.importorskip("pymodbus", reason="the modbus extra (pymodbus) is not installed")

from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext  # noqa: E402

try:
    from pymodbus.datastore import ModbusDeviceContext as _Context  # 3.9 and later

    _UNITS, _IGNORE_MISSING = "devices", "ignore_missing_devices"
except ImportError:  # 3.8
    from pymodbus.datastore import ModbusSlaveContext as _Context  # type: ignore[no-redef]

    _UNITS, _IGNORE_MISSING = "slaves", "ignore_missing_slaves"

SIZE = 300  # registers (and bits) each table holds; reading beyond is an illegal address
TABLE_KEYS = {"coil": "co", "discrete": "di", "holding": "hr", "input": "ir"}

Tables = Dict[str, Dict[int, int]]  # table -> address -> value (a register or 0/1)


def _unit(tables: Tables, size: int) -> object:
    blocks = {}
    for table, key in TABLE_KEYS.items():
        values: List[int] = [0] * size
        for address, value in tables.get(table, {}).items():
            values[address] = value
        if table in ("coil", "discrete"):
            blocks[key] = ModbusSequentialDataBlock(1, [bool(v) for v in values])
        else:
            blocks[key] = ModbusSequentialDataBlock(1, values)
    return _Context(**blocks)


class Peer:
    """A pymodbus server holding ``units`` (unit id -> tables); ``stop()`` to end it."""

    def __init__(self, units: Dict[int, Tables], serial: Optional[str] = None,
                 baudrate: int = 19200, size: int = SIZE, port: int = 0) -> None:
        self.context = ModbusServerContext(
            **{_UNITS: {unit: _unit(t, size) for unit, t in units.items()}}, single=False)
        self.serial = serial
        self.port = 0 if serial else port or free_port()
        self.url = f"rtu://{serial}?baudrate={baudrate}" if serial else \
            f"tcp://127.0.0.1:{self.port}"
        self.baudrate = baudrate
        self.loop = asyncio.new_event_loop()
        self.server = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="modbus-peer")
        self.thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the pymodbus server did not start")
        if not serial:
            wait_for(self._listening, what="the pymodbus server's port")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from pymodbus import FramerType
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer

        if self.serial:
            self.server = ModbusSerialServer(self.context, framer=FramerType.RTU,
                                             port=self.serial, baudrate=self.baudrate,
                                             **{_IGNORE_MISSING: True})
        else:
            self.server = ModbusTcpServer(self.context, address=("127.0.0.1", self.port))
        self.loop.call_soon(self._ready.set)
        await self.server.serve_forever()

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.thread.join(5)


class PtyPair:
    """Two linked pseudo-terminals from socat: ``a`` for the agent, ``b`` for the peer."""

    def __init__(self, folder: Path) -> None:
        socat = shutil.which("socat")
        if socat is None:
            pytest.skip("socat is not installed (.ci/run installs it with apt-get)")
        self.a, self.b = str(folder / "ttyA"), str(folder / "ttyB")
        self.proc = subprocess.Popen(
            [socat, "-d", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: os.path.exists(self.a) and os.path.exists(self.b),
                 what="socat's pseudo-terminals")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)


class BlackHole:
    """A TCP port that accepts connections and never answers (a hung gateway)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.conns: List[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.conns:
            conn.close()

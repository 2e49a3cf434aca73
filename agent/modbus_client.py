"""The only pymodbus code: open a port, read one block of one unit, close.

Rules:

* Imported only when a Modbus input is built or ``nexus-agent modbus read`` runs
  (``pymodbus`` is the ``modbus`` extra; ``pip install 'nexus-edge-agent[modbus]'``).
* One :class:`Port` per TCP host:port or serial device, used by one thread at a time
  (its port thread, or the ``modbus read`` command): a serial bus has one master and
  one conversation, and a TCP connection carries one request at a time here.
* Every failure comes out as :class:`~agent.modbus.PointError` with its kind:
  ``connection`` (refused, lost, no such serial device), ``timeout`` (no answer),
  ``exception`` (the device answered with a Modbus exception), ``error`` (anything
  else pymodbus raised), never a pymodbus exception. pymodbus's own retries are off
  (one timeout costs ``timeout_s``, not four) and its logger is quiet: each device's
  condition is logged once per change by the input (``modbus.DeviceHealth``), a dead
  meter must not write a line a poll.
* Works with pymodbus 3.8 (the last for Python 3.9: ``slave=``) to 3.x (``device_id=``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, List, Optional

from .modbus import Endpoint, PointError, exception_name

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # see the module docstring

READS = {"coil": "read_coils", "discrete": "read_discrete_inputs",
         "holding": "read_holding_registers", "input": "read_input_registers"}


class Port:
    """One TCP connection or serial line; ``timeout_s`` for every request on it."""

    def __init__(self, endpoint: Endpoint, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._client: Optional[Any] = None
        self._unit_keyword = ""

    def _open(self) -> Any:
        from pymodbus import FramerType
        from pymodbus.client import ModbusSerialClient, ModbusTcpClient

        e = self.endpoint
        client: Any
        if e.kind == "tcp":
            client = ModbusTcpClient(e.host, port=e.port, timeout=self.timeout_s, retries=0)
        else:
            client = ModbusSerialClient(e.device, framer=FramerType.RTU, baudrate=e.baudrate,
                                        parity=e.parity, stopbits=e.stopbits,
                                        bytesize=e.bytesize, timeout=self.timeout_s,
                                        retries=0)
        params = inspect.signature(client.read_coils).parameters
        self._unit_keyword = "device_id" if "device_id" in params else "slave"
        if not client.connect():
            client.close()
            raise PointError("connection", f"cannot connect to {e.label}")
        return client

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def read(self, table: str, address: int, count: int, unit: int) -> List[int]:
        """``count`` registers (or bits, as 0/1) of ``table`` from ``address``."""
        from pymodbus.exceptions import ConnectionException, ModbusException

        try:
            if self._client is None:
                self._client = self._open()
            method = getattr(self._client, READS[table])
            response = method(address, count=count, **{self._unit_keyword: unit})
        except PointError:
            raise
        except ConnectionException as exc:
            self.close()
            raise PointError("connection", f"{self.endpoint.label}: {_short(exc)}") from None
        except ModbusException as exc:  # no (complete) answer within timeout_s
            if self.endpoint.kind == "tcp":
                self.close()  # a late answer must not be taken for the next request's
            raise PointError("timeout", f"no answer within {self.timeout_s:g} s "
                             f"({_short(exc)})") from None
        except OSError as exc:
            self.close()
            raise PointError("connection", f"{self.endpoint.label}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a library surprise must not end the port's
            self.close()  # thread: counted as an error, the port opened again next poll
            raise PointError("error", f"{type(exc).__name__}: {_short(exc)}") from None
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise PointError("exception", exception_name(int(code)))
        data = response.bits if table in ("coil", "discrete") else response.registers
        if len(data) < count:
            raise PointError("exception", f"short answer: {len(data)} of {count}")
        return [int(v) for v in data[:count]]

    def close(self) -> None:
        """Idempotent; the next read opens it again."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _short(exc: BaseException) -> str:
    text = str(exc).replace("Modbus Error: ", "").strip()
    return text[:160] or type(exc).__name__

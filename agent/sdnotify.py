"""systemd notification: one datagram to ``$NOTIFY_SOCKET`` (no dependency).

``Notifier.enabled`` is False when not running under systemd (no
``NOTIFY_SOCKET``), which is not an error; a send that fails under systemd is
logged once, since systemd will then act on a missing READY or WATCHDOG.
A leading ``@`` in the socket path means the Linux abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

log = logging.getLogger("nexus.sdnotify")


class Notifier:
    def __init__(self, address: Optional[str] = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.enabled = bool(address)
        self._sock: Optional[socket.socket] = None
        self._failed = False

    def notify(self, *lines: str) -> bool:
        """Send ``READY=1``-style lines; False if not under systemd or the send failed."""
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            self._failed = False
            return True
        except OSError as exc:
            if not self._failed:
                log.error("cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> Optional[float]:
    """Half of ``WatchdogSec`` in seconds, if systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None

"""A TCP proxy on 127.0.0.1 that injects network faults between an agent and a server.

toxiproxy cannot be installed here and netem is not in this kernel, so this is the
small version: one accept thread, two pump threads per connection, and a ``mode``
that the test changes at any time:

* ``pass``: bytes go through;
* ``blackhole``: connections stay open, nothing passes either way (a dead NAT);
* ``trickle``: server-to-agent bytes pass one at a time, every ``trickle_s``;
* ``reset``: the next server-to-agent chunk is cut in half and the agent's side is
  reset (RST) in the middle of a frame;
* ``half_open``: the agent's side gets FIN (it reads EOF) while its own writes are
  still read and thrown away;
* ``flap``: every connection is reset ``flap_s`` after it opened;
* ``cut_on``: bytes go through until a server-to-agent chunk holds ``cut_marker``
  (server frames are not masked: a message type shows in clear); that chunk is cut
  in the middle of the marker, the agent's side is reset, ``cuts`` counts it and the
  mode goes back to ``pass`` (one cut).

``accepted`` counts connections, so a test can see an agent come back.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import List, Tuple


class FaultProxy:
    def __init__(self, upstream_port: int, trickle_s: float = 0.02, flap_s: float = 1.0) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.trickle_s = trickle_s
        self.flap_s = flap_s
        self.accepted = 0
        self.cut_marker = b""
        self.cuts = 0
        self._pairs: List[Tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"
        threading.Thread(target=self._accept, daemon=True).start()

    # ------------------------------------------------------------------ control

    def reset_all(self) -> None:
        """RST every open connection (a proxy or NAT that forgot them)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.reset_all()

    # ------------------------------------------------------------------ pumping

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
            except OSError:
                _reset(client)
                continue
            self.accepted += 1
            with self._lock:
                self._pairs.append((client, upstream))
            opened = time.monotonic()
            threading.Thread(target=self._pump, args=(client, upstream, False, opened),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True, opened),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_agent: bool,
              opened: float) -> None:
        try:
            src.settimeout(0.05)
        except OSError:  # reset_all() closed it before this thread started
            return
        while not self._closed:
            if self.mode == "flap" and time.monotonic() - opened > self.flap_s:
                _reset(src)
                _reset(dst)
                return
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                if not self._forward(data, dst, to_agent):
                    return
            except OSError:
                break
        _close(dst)

    def _forward(self, data: bytes, dst: socket.socket, to_agent: bool) -> bool:
        """Send ``data`` as the mode says; False when this direction is finished."""
        mode = self.mode
        if mode == "blackhole":
            return True  # swallowed
        if mode == "half_open" and to_agent:
            try:
                dst.shutdown(socket.SHUT_WR)  # the agent reads EOF; the rest is dropped
            except OSError:
                pass
            return True
        if mode == "cut_on" and to_agent and self.cut_marker and self.cut_marker in data:
            at = data.index(self.cut_marker) + len(self.cut_marker) // 2
            dst.sendall(data[:at])
            _reset(dst)
            self.mode = "pass"
            self.cuts += 1
            return False
        if mode == "reset" and to_agent:
            dst.sendall(data[:max(1, len(data) // 2)])
            _reset(dst)
            return False
        if mode == "trickle" and to_agent:
            for i in range(len(data)):
                dst.sendall(data[i:i + 1])
                time.sleep(self.trickle_s)  # the fault itself: a slow link
            return True
        dst.sendall(data)
        return True


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

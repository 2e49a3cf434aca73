"""The companion server under fleet conditions: a client that stops reading, a stop under load.

Real sockets on loopback. The long load runs are in bench/fleet.py; these stay fast.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import List, Tuple

from helpers import SECRET, Peer, connected, mint, wait_for

from agent import protocol as p


def big_telemetry(msg_id: str, device: str) -> dict:
    metrics = {f"metric_with_a_long_name_{i:03d}": float(i) for i in range(250)}  # ~9 KB
    return {"type": "telemetry", "id": msg_id, "timestamp": "2025-11-03T01:53:54.518Z",
            "payload": {"device_id": device, "metrics": metrics}}


def stalled_operator(url: str) -> Peer:
    """An operator subscribed to all telemetry with a small receive buffer; it reads no more.

    The small buffer keeps what the kernels hold for it to a few MB (the server's send
    buffer still grows), so its queue fills after a few hundred broadcasts.
    """
    peer = Peer(url, mint("watcher", "operator"),
                sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    assert peer.recv()["type"] == "connected"
    reply = peer.request({"type": "subscribe", "id": "s", "payload": {"channel": "telemetry"}})
    assert reply["type"] == "subscribed"
    return peer


def overflow_warnings(caplog) -> List[logging.LogRecord]:
    return [r for r in caplog.records if "send queue is full" in r.getMessage()]


def test_stalled_reader_delays_nobody_and_is_closed_with_1013(caplog):
    from agent.server.app import CompanionServer, ServerSettings

    caplog.set_level(logging.WARNING, logger="nexus.server")
    srv = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=10**6, close_timeout_s=3,
                                         send_queue_messages=50, write_limit_bytes=4096),
                          SECRET.encode()).start()
    try:
        resumes, never = stalled_operator(srv.url), stalled_operator(srv.url)
        devices = [connected(srv.url, f"device-{i}") for i in range(3)]
        slowest, n = 0.0, 0
        deadline = time.monotonic() + 30
        while len(overflow_warnings(caplog)) < 2:
            assert time.monotonic() < deadline, "the stalled operators were never closed"
            for i, device in enumerate(devices):
                n += 1
                start = time.monotonic()
                assert device.request(big_telemetry(f"t-{n}", f"device-{i}"))["type"] == "ack"
                slowest = max(slowest, time.monotonic() - start)
        # Every ack came back promptly while both operators sat on full buffers.
        assert n > 50 and slowest < 1.0, (n, slowest)
        assert len(srv.hub.telemetry()) == n
        # One reads again (with a window that lets it catch up before the close timeout):
        # behind the broadcasts already in flight it finds the close code.
        resumes.ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        assert resumes.close_code() == p.CLOSE_TRY_AGAIN
        # The other never reads: aborted after the close timeout, gone from the hub.
        wait_for(lambda: len(srv.hub.peers()) == 3, timeout=10, what="stalled clients dropped")
        assert devices[0].request(big_telemetry("after", "device-0"))["type"] == "ack"
        # Logged once per client, although many more broadcasts were dropped for each.
        assert len(overflow_warnings(caplog)) == 2
        for peer in [never, *devices]:
            peer.close()  # before stop(), which would wait close_timeout for them to read
    finally:
        srv.stop()


async def _fleet(url: str, n: int, ready: threading.Event) -> List[Tuple[int, float]]:
    """Connect ``n`` clients, set ``ready``, then note each one's (close code, monotonic time)."""
    from websockets.asyncio.client import ClientConnection, connect

    gate = asyncio.Semaphore(100)  # the listen backlog, not the test, should be the limit

    async def one(i: int) -> ClientConnection:
        async with gate:
            conn = await connect(url, additional_headers={
                "Authorization": f"Bearer {mint(f'device-{i}')}"}, open_timeout=30)
            await conn.recv()  # connected
            return conn

    async def closed(conn: ClientConnection) -> Tuple[int, float]:
        await conn.wait_closed()
        return conn.close_code or 0, time.monotonic()

    conns = await asyncio.gather(*(one(i) for i in range(n)))
    ready.set()
    return list(await asyncio.gather(*(closed(c) for c in conns)))


def test_stop_under_500_connections_closes_all_with_1000_within_2s():
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, close_timeout_s=1.0),
                          SECRET.encode()).start()
    ready: threading.Event = threading.Event()
    results: List[Tuple[int, float]] = []
    thread = threading.Thread(target=lambda: results.extend(
        asyncio.run(_fleet(srv.url, 500, ready))), daemon=True)
    try:
        thread.start()
        assert ready.wait(60), "500 clients did not connect"
        wait_for(lambda: len(srv.hub.peers()) == 500, what="500 registered clients")
        start = time.monotonic()
        srv.stop()
        assert time.monotonic() - start < 2.0
        thread.join(10)
        assert len(results) == 500
        assert {code for code, _ in results} == {1000}
        assert max(at for _, at in results) - start < 2.0
    finally:
        srv.stop()


def _queue_of(srv, subject: str):
    """The server's SendQueue for the client whose token subject is ``subject``."""
    return next(peer for peer in srv.hub.peers() if peer.name.endswith(f" {subject})"))


def test_a_client_that_keeps_up_is_written_to_without_a_writer_task():
    """The common case costs no task wake-up: the text goes straight to the transport."""
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0), SECRET.encode()).start()
    try:
        device = connected(srv.url, "device-7")
        for i in range(20):
            assert device.request(big_telemetry(f"k-{i}", "device-7"))["type"] == "ack"
        queue = _queue_of(srv, "device-7")
        assert queue._writer is None and not queue._texts
    finally:
        srv.stop()


def test_a_client_that_falls_behind_then_reads_gets_every_broadcast_in_order():
    """Written directly, then queued while it does not read, then direct again: one order."""
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, rate_limit_per_minute=10**6,
                                         send_queue_messages=10**5, send_queue_bytes=1 << 28,
                                         write_limit_bytes=4096), SECRET.encode()).start()
    try:
        watcher = stalled_operator(srv.url)
        device = connected(srv.url, "device-0")
        queue = _queue_of(srv, "watcher")
        sent = 0
        deadline = time.monotonic() + 30
        while not queue._texts:  # until the watcher's broadcasts have to wait in its queue
            assert time.monotonic() < deadline, "the watcher's queue never filled"
            sent += 1
            assert device.request(big_telemetry(f"t-{sent}", "device-0"))["type"] == "ack"
        for _ in range(5):
            sent += 1
            assert device.request(big_telemetry(f"t-{sent}", "device-0"))["type"] == "ack"
        watcher.ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        seen = [watcher.recv_type("telemetry.update")["payload"]["message_id"]
                for _ in range(sent)]
        assert seen == [f"t-{i}" for i in range(1, sent + 1)]
        # Caught up: the next one goes straight out again.
        wait_for(lambda: not queue._texts and queue._writer.done(), what="the queue drained")
        assert device.request(big_telemetry("last", "device-0"))["type"] == "ack"
        assert watcher.recv_type("telemetry.update")["payload"]["message_id"] == "last"
        assert not queue._texts
    finally:
        srv.stop()

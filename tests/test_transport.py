"""Transport pieces without a network (backoff, token bucket, send plan), then over loopback."""

from __future__ import annotations

import random
import statistics
import socket
import subprocess
import sys

import pytest

from helpers import REPO

from agent.outbox import Outbox
from agent.codec import CODEC
from agent.session import TokenBucket
from agent.sendplan import SendPlan
from agent.transport import backoff_delays


def test_backoff_grows_stays_under_cap_and_is_spread():
    rng = random.Random(7)
    base, cap = 1.0, 60.0
    runs = [[d for _, d in zip(range(12), backoff_delays(base, cap, rng))] for _ in range(400)]
    for n in range(12):
        column = [run[n] for run in runs]
        assert all(0 <= d <= min(cap, base * 2 ** n) for d in column)
    means = [statistics.mean(run[n] for run in runs) for n in range(12)]
    assert means[0] < means[2] < means[4] < means[6]  # grows
    assert means[-1] < cap  # capped
    late = [run[10] for run in runs]
    assert statistics.pstdev(late) > cap / 6  # spread: full jitter, not a fixed delay
    assert len({round(d, 3) for d in late}) > 300  # devices do not reconnect in lockstep


def test_token_bucket_paces_to_the_rate():
    bucket = TokenBucket(60, now=0.0)  # 1 per second, burst 6
    taken = sum(bucket.take(0.0) for _ in range(100))
    assert taken == 6
    assert 0.9 < bucket.wait(0.0) <= 1.0
    assert bucket.take(1.0) and not bucket.take(1.0)
    # over 60 s never more than rate * 60 + burst
    bucket = TokenBucket(90, now=0.0)
    sent = sum(bucket.take(t / 10) for t in range(600))
    assert sent <= 90 + 9


def test_send_plan_puts_live_first_and_the_backlog_in_order(tmp_path):
    """Live first: a sample taken now leaves within one interval whatever the backlog (the
    backlog takes the pace's spare room, so a long one never starves live data)."""
    box = Outbox(CODEC, str(tmp_path), 10**6)
    for i in range(6):
        box.put("telemetry", {"i": i}, "2025-01-01T00:00:00.000Z")
    plan = SendPlan(box, boundary=box.stats().last_seq, rows=2)
    assert plan.next().seq == 1
    for i in range(6, 9):
        box.put("telemetry", {"i": i}, "2025-01-01T00:00:00.000Z")
    plan.new_rows()  # the transport's wake-up after a put
    order = [plan.next().seq for _ in range(4)]
    assert order == [7, 8, 9, 2]
    box.put("telemetry", {"i": 9}, "2025-01-01T00:00:00.000Z")
    plan.new_rows()
    order = [plan.next().seq for _ in range(5)]
    assert order == [10, 3, 4, 5, 6]
    assert plan.next() is None


class CountingOutbox(Outbox):
    reads = 0

    def _read(self, *args, **kwargs):  # what the send plan's cursors call
        self.reads += 1
        return super()._read(*args, **kwargs)


def test_send_plan_reads_the_outbox_only_when_something_may_be_new(tmp_path):
    """A steady connection asked the outbox for live and backlog rows (two queries) on every
    pass of its loop; now live rows are read after a wake-up, the backlog until it runs out."""
    box = CountingOutbox(CODEC, str(tmp_path), 10**6)
    for i in range(3):
        box.put("telemetry", {"i": i}, "2025-01-01T00:00:00.000Z")
    plan = SendPlan(box, boundary=box.stats().last_seq, rows=2)
    assert [plan.next().seq for _ in range(3)] == [1, 2, 3]
    assert plan.next() is None
    reads = box.reads
    for _ in range(10):  # passes of the loop with nothing new: no query
        assert plan.next() is None
    assert box.reads == reads
    box.put("telemetry", {"i": 3}, "2025-01-01T00:00:00.000Z")
    plan.new_rows()
    assert plan.next().seq == 4 and plan.next() is None
    assert box.reads == reads + 1  # one live read; the backlog is known to be done
    box.close()


def test_send_plan_batches_the_backlog_within_both_limits(tmp_path):
    from agent import protocol as p

    box = Outbox(CODEC, str(tmp_path), 10**7)
    for i in range(25):
        box.put("telemetry", {"device_id": "d", "metrics": {"cpu_usage": i}},
                "2025-01-01T00:00:00.000Z")
    box.put("command.result", {"command_id": "c"}, "2025-01-01T00:00:00.000Z")  # alone
    box.put("telemetry", {"device_id": "d", "metrics": {"cpu_usage": 99}},
            "2025-01-01T00:00:00.000Z")
    plan = SendPlan(box, boundary=box.stats().last_seq, rows=4,
                    batch=p.BatchOffer(max_items=10, max_bytes=10**6), device_id="d")
    sizes = []
    while True:
        nxt = plan.next()
        if nxt is None:
            break
        sizes.append(len(nxt) if isinstance(nxt, list) else nxt.type)
    assert sizes == [10, 10, 5, "command.result", 1]
    # the byte limit: items of ~70 bytes, 2 KiB offered minus the envelope's room
    plan = SendPlan(box, boundary=box.stats().last_seq, rows=4,
                    batch=p.BatchOffer(max_items=1000, max_bytes=2048), device_id="d")
    first = plan.next()
    text = p.batch_text("b", 0, "d", [item for _, item in first])
    assert 10 < len(first) < 25 and len(text) <= 2048


def test_send_plan_sends_several_waiting_live_records_as_a_batch_in_order(tmp_path):
    """An application writing faster than single messages go: what waits live goes as a
    batch (in order: the system sample behind the app samples stored before it), a lone
    live record alone, and without an offer everything alone as before."""
    from agent import protocol as p

    box = Outbox(CODEC, str(tmp_path), 10**7)
    offer = p.BatchOffer(max_items=1000, max_bytes=10**6)
    plan = SendPlan(box, boundary=box.stats().last_seq, rows=16, batch=offer, device_id="d")
    singles = SendPlan(box, boundary=box.stats().last_seq, rows=16, device_id="d")
    ids = [box.put("telemetry", {"device_id": "d", "source": "flood", "metrics": {"n": i}},
                   "2025-01-01T00:00:00.000Z").id for i in range(40)]
    ids.append(box.put("telemetry", {"device_id": "d", "metrics": {"cpu_usage": 1.0}},
                       "2025-01-01T00:00:00.000Z").id)
    plan.new_rows()
    batch = plan.next()
    assert isinstance(batch, list) and [msg_id for msg_id, _ in batch] == ids
    assert plan.next() is None
    lone = box.put("telemetry", {"device_id": "d", "metrics": {"cpu_usage": 2.0}},
                   "2025-01-01T00:00:00.000Z")
    plan.new_rows()
    assert plan.next(batch_allowed=False).id == lone.id  # a batch in flight: alone
    alone = box.put("telemetry", {"device_id": "d", "metrics": {"cpu_usage": 3.0}},
                    "2025-01-01T00:00:00.000Z")
    plan.new_rows()
    assert plan.next().id == alone.id  # one waiting: alone, as always
    singles.new_rows()
    assert not isinstance(singles.next(), list)  # no offer: single messages
    box.close()


def test_ws_url_does_not_import_ssl():
    code = ("import sys; from agent.transport import import_websocket; "
            "import_websocket('ws://127.0.0.1:1/v1/ws'); "
            "import agent.service; print('ssl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("host, family", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_the_transport_opens_ws_connections_itself_ipv4_and_ipv6(host, family):
    """ws:// with an ASCII host and no proxy: resolved as bytes (no idna codec), connected
    with websocket-client's own socket options, and handed to it."""
    import websocket

    from agent.transport import tcp_socket

    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    listener.listen(1)
    port = listener.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    sock = tcp_socket(websocket, f"ws://{shown}:{port}/v1/ws", 2.0)
    try:
        assert sock is not None and sock.family == family
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.gettimeout() == 2.0
        listener.accept()[0].close()
    finally:
        sock.close()
        listener.close()


def test_websocket_client_connects_itself_for_wss_a_proxy_or_a_non_ascii_host(monkeypatch):
    import websocket

    from agent.transport import tcp_socket

    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert tcp_socket(websocket, "wss://example.org/v1/ws", 1.0) is None
    assert tcp_socket(websocket, "ws://bücher.example/v1/ws", 1.0) is None
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert tcp_socket(websocket, "ws://example.org/v1/ws", 1.0) is None


def test_a_refused_connection_is_an_os_error():
    import websocket

    from agent.transport import tcp_socket

    with pytest.raises(OSError):
        tcp_socket(websocket, "ws://127.0.0.1:1/v1/ws", 1.0)

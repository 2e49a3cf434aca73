"""Attacks from an independent review of issues 21, 23 and 27's agent side: ways to lose a
message, reuse an id, stall the queue, drift a counter or lock the agent out. Each test
states the attack. Ten of them found defects, fixed with them (a backlog stalled behind
one damaged row, an ack or a read racing a replaced file, NULL cells, damaged schema
names, a failed recovery, batches not halved on a reset, a damaged first epoch, renewed
tokens the agent could not read back, the set-aside count across a replaced file); the
rest are guards that held.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import threading
import types

import pytest

from agent import auth
from agent import protocol as p
from agent import sendplan as sendplan_mod
from agent import store
from agent.codec import CODEC
from agent.outbox import Outbox
from agent.sendplan import SendPlan
from agent.transport import Transport

TS = "2025-01-01T00:00:00.000Z"


def sample(n=0):
    return {"device_id": "d", "metrics": {"x": n}}


def fill(box, count):
    return [box.put("telemetry", sample(i), TS) for i in range(count)]


def drain_plan(plan, limit=100_000):
    """Every single record the plan gives on one connection (no batches)."""
    out = []
    for _ in range(limit):
        rec = plan.next()
        if rec is None:
            return out
        assert not isinstance(rec, list)
        out.append(rec)
    raise AssertionError("the plan never ends")


# -------------------------------------------------------------------------------------- the cursor


def test_an_unreadable_row_in_a_backlog_read_does_not_stop_the_backlog(tmp_path):
    """One damaged row among the first ``rows`` of a backlog: the read comes back one short,
    and the bounded backlog cursor takes a short read for "nothing more". The rest of the
    backlog must still be sent on this connection (issue 21: "the rest of the backlog
    follows")."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        records = fill(box, 200)
        box._db.execute("UPDATE messages SET payload = 'not json' WHERE seq = ?",
                        (records[4].seq,))
        plan = SendPlan(box, box.stats().last_seq, rows=10)
        sent = drain_plan(plan)
        assert len(sent) == 199, f"only {len(sent)} of 199 readable backlog rows were sent"
    finally:
        box.close()


def test_an_unreadable_row_in_a_batch_read_does_not_stop_the_backlog(tmp_path):
    """The same with a batch offer: a batch read of BATCH_READ_ROWS meets the damaged row."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        records = fill(box, 300)
        box._db.execute("UPDATE messages SET payload = x'0199' WHERE seq = ?",
                        (records[50].seq,))
        plan = SendPlan(box, box.stats().last_seq, rows=10,
                        batch=p.BatchOffer(max_items=1000, max_bytes=1 << 20), device_id="d")
        sent = 0
        for _ in range(10_000):
            got = plan.next()
            if got is None:
                break
            sent += len(got) if isinstance(got, list) else 1
        assert sent == 299, f"only {sent} of 299 readable backlog rows were sent"
    finally:
        box.close()


# -------------------------------------------------------------------------------------- NULL cells


def _null_payload(path, seq):
    """Make row ``seq``'s payload NULL, as a damaged record header that says NULL would
    read: NOT NULL is dropped from the schema text for the update and put back (the schema
    cookie unchanged), so the file says NOT NULL and holds a NULL."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA writable_schema=ON")
    sql = other.execute("SELECT sql FROM sqlite_master WHERE name='messages'").fetchone()[0]
    other.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'messages'",
                  (sql.replace("payload NOT NULL", "payload"),))
    other.close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("UPDATE messages SET payload = NULL WHERE seq = ?", (seq,))
    other.execute("PRAGMA writable_schema=ON")
    other.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'messages'", (sql,))
    other.close()


def test_a_null_payload_read_after_opening_does_not_stop_the_queue(tmp_path):
    """A payload cell that reads back NULL (a damaged serial type, a bad sector read for the
    first time while the agent runs: quick_check at open saw nothing). Setting it aside
    copies the payload into set_aside.payload, declared NOT NULL: the IntegrityError must
    not escape read_after (it would end every connection: a loop that delivers nothing)."""
    box = Outbox(CODEC, str(tmp_path), 10**7, lock="shared")
    try:
        records = fill(box, 40)  # over HELD_ROWS: read from the file
        _null_payload(os.path.join(str(tmp_path), "outbox.db"), records[3].seq)
        got = box.read_after(0, 100)  # must not raise
        assert len(got) == 39
        assert box.stats().set_aside == 1
    finally:
        box.close()


# ---------------------------------------------------------------------- races with a replaced file


def _corrupt_recover(box):
    """What another thread does when a call meets SQLITE_CORRUPT: set the file aside and go
    on with a fresh one (Outbox._recover, under the lock)."""
    with box._lock:
        box._recover(sqlite3.DatabaseError("database disk image is malformed"))


def test_an_ack_maps_its_ids_under_the_lock(tmp_path):
    """``ack`` used to map ids to seqs before taking the lock. If another thread replaced a
    corrupt file (and put new samples, seqs from 1 again) in between, the old id's seq was
    applied to the new file: a new sample the server never saw was taken out of the queue.
    Mapped under the lock, no replacement can come in between; checked at the mapping."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        old = fill(box, 3)
        original = box._seq_of
        held = []

        def seq_of_noting_the_lock(msg_id):
            held.append(box._lock.locked())
            return original(msg_id)

        box._seq_of = seq_of_noting_the_lock
        assert box.ack([old[1].id]) == 1
        assert box.set_aside(old[2].id, "test") is True
        box._seq_of = original
        assert held == [True, True]
        _corrupt_recover(box)
        new_rows = fill(box, 3)
        assert box.ack([old[0].id]) == 0  # an id of the old file takes nothing of the new
        assert {r.id for r in box.read_after(0, 100)} == {r.id for r in new_rows}
    finally:
        box.close()


def test_rows_read_while_the_file_is_replaced_keep_their_own_ids(tmp_path):
    """``read_after`` computes ids (``self._id``, the epochs table) outside the lock, after
    the query. If another thread replaces a corrupt file in between, rows of the OLD file
    are named with the NEW file's epoch: ``<new epoch>-<old seq>``, an id the new file will
    give to one of its own samples later (the server then drops that sample as a
    duplicate)."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        old = fill(box, 40)  # over HELD_ROWS: read from the file, decoded outside the lock
        real_decode = CODEC.decode
        fired = []

        class Hooked:
            def __getattr__(self, name):
                return getattr(CODEC, name)

            def decode(self, *args):
                if not fired:
                    fired.append(1)
                    t = threading.Thread(target=_corrupt_recover, args=(box,))
                    t.start()
                    t.join()
                return real_decode(*args)

        box.codec = Hooked()
        got = box.read_after(0, 100)
        box.codec = CODEC
        old_ids = {r.id for r in old}
        renamed = [r.id for r in got if r.id not in old_ids]
        # Whatever it returns must be rows under the ids they were stored with, or nothing.
        assert not renamed, f"{len(renamed)} old rows came back under new ids, e.g. {renamed[:2]}"
        new = fill(box, 40)
        assert not ({r.id for r in got} & {r.id for r in new}), "an id was given twice"
    finally:
        box.close()


def test_a_fresh_file_that_cannot_be_opened_leaves_no_closed_connection_behind(tmp_path,
                                                                              monkeypatch):
    """``_recover`` closes the corrupt file, then opens a fresh one. If that open fails (a
    full or failing card: StoreError), ``self._db`` stays the closed connection: every later
    call raises sqlite3.ProgrammingError ("Cannot operate on a closed database"), which no
    caller handles as a store failure: the agent runs on and delivers nothing. It should
    either raise StoreError again (the service exits 75) on each call, or retry the open."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        fill(box, 3)
        real_open = store.open_db

        def failing_open(*args, **kwargs):
            raise store.StoreError("outbox.db", "cannot open or write it: disk I/O error",
                                   temporary=True)

        monkeypatch.setattr(store, "open_db", failing_open)
        with pytest.raises(store.StoreError):
            _corrupt_recover(box)
        monkeypatch.setattr(store, "open_db", real_open)
        try:
            box.put("telemetry", sample(), TS)
        except sqlite3.ProgrammingError as exc:
            pytest.fail(f"a put after a failed recovery raises {exc!r}")
        except store.StoreError:
            pass
    finally:
        try:
            box.close()
        except sqlite3.Error:
            pass


# ------------------------------------------------------------------------------------------ epochs


def test_a_damaged_first_epoch_leaves_no_row_that_can_never_be_acked(tmp_path):
    """The epochs row of the oldest queued rows has its first_seq flipped upwards (rowid 1
    -> 3): rows 1 and 2 are then named with that epoch by ``_id`` (bisect falls back to
    the first epoch) but ``_seq_of`` refuses the same id (seq below the epoch's first):
    the server acks them on every connection and they never leave the queue."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    fill(box, 5)
    box.close()
    Outbox(CODEC, str(tmp_path), 10**7).close()  # the next open prunes the fresh file's epoch 0
    db = sqlite3.connect(os.path.join(str(tmp_path), "outbox.db"), isolation_level=None)
    first, = db.execute("SELECT MIN(first_seq) FROM epochs").fetchone()
    assert first == 1
    db.execute("UPDATE epochs SET first_seq = 3 WHERE first_seq = 1")
    db.close()
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        got = box.read_after(0, 100)
        assert len(got) == 5
        assert box.ack([r.id for r in got]) == 5, \
            f"ids read back but not ackable: {[r.id for r in got if box._seq_of(r.id) is None]}"
        assert box.stats().depth == 0
    finally:
        box.close()


def test_many_reopenings_keep_ids_unique_and_epochs_few(tmp_path):
    """200 opens with puts, acks of some, crashes (no close) and clean closes: every id
    distinct, every queued row ackable by its id, and the epochs table holds only epochs
    that name queued rows (plus the current one)."""
    rng = random.Random(7)
    seen = set()
    queued = {}
    for _ in range(200):
        box = Outbox(CODEC, str(tmp_path), 10**7)
        got = box.read_after(0, 10_000)
        assert {r.id for r in got} == set(queued), "queued rows changed id across an open"
        if queued:  # pruned at open: no epoch wholly below the oldest queued row
            firsts = [f for (f,) in box._db.execute("SELECT first_seq FROM epochs")]
            assert sum(1 for f in firsts if f <= min(queued.values())) <= 1
        for r in box_put_some(box, rng.randrange(0, 4)):
            assert r.id not in seen
            seen.add(r.id)
            queued[r.id] = r.seq
        for msg_id in list(queued):
            if rng.random() < 0.3:
                assert box.ack([msg_id]) == 1
                del queued[msg_id]
        if rng.random() < 0.5:
            box.close()
        else:
            box._flush_acked()  # what a syncer pass would have done before the kill
            box._stop.set()
            box._db.close()
            box._db = None


def box_put_some(box, n):
    return [box.put("telemetry", sample(i), TS) for i in range(n)]


def test_a_power_cut_that_loses_the_epochs_row_but_keeps_meta_reuses_no_id(tmp_path):
    """A restored image of an older file (as a power cut with ``normal`` leaves one): every
    id the file gives after the restore is new, even for seqs given before."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    fill(box, 3)
    box.close()
    path = os.path.join(str(tmp_path), "outbox.db")
    with open(path, "rb") as f:
        image = f.read()
    box = Outbox(CODEC, str(tmp_path), 10**7)
    sent = {r.id for r in fill(box, 5)}
    box.close()
    with open(path, "wb") as f:
        f.write(image)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        again = {r.id for r in fill(box, 5)}
        assert not (again & sent)
    finally:
        box.close()


# ------------------------------------------------------------------------------------------ tokens


def _jwt(sub, pad=0, header="eyJhbGciOiJIUzI1NiJ9"):
    import base64
    import json
    import time as _time
    claims = base64.urlsafe_b64encode(json.dumps(
        {"sub": sub, "exp": int(_time.time()) + 3600}).encode()).decode().rstrip("=")
    return f"{header}.{claims}.{'s' * (43 + pad)}"


def _keeper(tmp_path, token="old-token"):
    """A transport stand-in whose state_dir holds a renewal ``token`` (keep_token's file)."""
    path = tmp_path / auth.RENEWED_TOKEN
    path.write_text(token + "\n")
    path.chmod(0o600)
    updates = []
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(server=types.SimpleNamespace(token_file=None),
                                     state_dir=str(tmp_path), device_id="device-001"),
        health=types.SimpleNamespace(update=lambda **kw: updates.append(kw)))
    return fake, path


def test_a_renewed_token_at_the_protocols_size_limit_can_be_read_back(tmp_path):
    """protocol.parse_token_renewed takes up to MAX_RENEWED_TOKEN_CHARS (8192) characters;
    store_token writes it with a newline (8193 bytes); read_token refuses a file over
    MAX_TOKEN_BYTES (8192): the agent has replaced a working token with one it can never
    read again (locked out until someone provisions it by hand)."""
    fake, path = _keeper(tmp_path)
    token = _jwt("device-001")
    token += "s" * (p.MAX_RENEWED_TOKEN_CHARS - len(token))
    assert len(token) == p.MAX_RENEWED_TOKEN_CHARS
    env = p.Envelope(p.TOKEN_RENEWED, "r1", TS, {"token": token}, None)
    assert p.parse_token_renewed(env) == token  # the protocol takes it
    Transport.keep_token(fake, token)
    assert auth.read_token(str(path)) in (token, "old-token")


def test_a_renewed_token_that_is_not_ascii_does_not_escape_keep_token(tmp_path):
    """parse_token_renewed allows any printable character; token_problem only decodes the
    middle part. A non-ASCII header part reaches store_token, whose ``encode("ascii")``
    raises UnicodeEncodeError, not OSError: it escapes keep_token and ends the connection
    (every connection, if the server keeps renewing). It should be refused and logged."""
    fake, path = _keeper(tmp_path)
    token = _jwt("device-001", header="\u00e9yJhbGciOiJIUzI1NiJ9")
    env = p.Envelope(p.TOKEN_RENEWED, "r1", TS, {"token": token}, None)
    with pytest.raises(p.RemoteProtocolError):  # refused where it arrives (then ignored)
        p.parse_token_renewed(env)
    Transport.keep_token(fake, token)  # and, should one get through, must not raise
    assert path.read_text() == "old-token\n"


def test_a_stale_temporary_token_file_does_not_leave_the_token_world_readable(tmp_path):
    """store_token opens its temporary file with O_CREAT|O_TRUNC and no O_EXCL/fchmod: a
    leftover file of that name keeps its mode (0644 here) and is renamed over the token."""
    fake, path = _keeper(tmp_path)
    stale = tmp_path / f".token.new-{os.getpid()}"
    stale.write_text("x")
    stale.chmod(0o644)
    auth.store_token(str(path), _jwt("device-001"))
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"the token file is {mode:04o}"


# -------------------------------------------------------------------------- counters under threads


def test_counters_match_the_file_after_concurrent_puts_reads_acks_and_set_asides(tmp_path):
    """Sampler threads put, the transport thread reads and acks, a third sets aside and
    calls stats, the syncer runs every 10 ms; then depth/bytes must equal the file."""
    box = Outbox(CODEC, str(tmp_path), 200_000, sync_interval_s=0.01)
    stop = threading.Event()
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                stop.set()
        return run

    def sampler():
        i = 0
        while not stop.is_set() and i < 1500:
            box.put("telemetry", {"device_id": "d", "metrics": {"x": i}, "pad": "p" * (i % 97)},
                    TS)
            i += 1

    def transport():
        cursor = box.cursor()
        rng = random.Random(1)
        while not stop.is_set():
            cursor.more()
            got = cursor.read(rng.randrange(1, 50))
            if got:
                box.ack([r.id for r in got if rng.random() < 0.8])

    def other():
        rng = random.Random(2)
        while not stop.is_set():
            got = box.read_after(0, 20)
            if got:
                box.set_aside(rng.choice(got).id, "review")
            box.stats()

    threads = [threading.Thread(target=guard(f)) for f in (sampler, sampler, transport, other)]
    for t in threads:
        t.start()
    threads[0].join()
    threads[1].join()
    stop.set()
    for t in threads[2:]:
        t.join()
    try:
        assert not errors, errors
        with box._lock:
            box._flush_acked()
            depth, total = box._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            aside = int(box._meta("set_aside"))
            dropped = int(box._meta("dropped"))
        stats = box.stats()
        assert (stats.depth, stats.bytes) == (depth, total)
        assert (stats.set_aside, stats.dropped) == (aside, dropped)
    finally:
        box.close()


# ------------------------------------------------------------------------------ the directory lock


def test_a_second_dir_lock_is_refused_naming_the_first(tmp_path):
    first = store.DirLock(str(tmp_path))
    try:
        with pytest.raises(store.StoreError) as info:
            store.DirLock(str(tmp_path), wait_s=0.3)
        assert f"pid {os.getpid()}" in str(info.value) and info.value.temporary
        assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    finally:
        first.close()
        first.close()
    store.DirLock(str(tmp_path), wait_s=0.3).close()


# -------------------------------------------------------------------------------------- end to end


def test_e2e_a_flipped_row_early_in_a_long_backlog_does_not_stall_the_rest(tmp_path):
    """Issue 21's reproduction 3 with a backlog longer than one read (1,000 rows, the
    existing test has 100, all read at once): the damaged row is set aside, live samples
    flow, and the rest of the backlog must follow on the same connection."""

    from helpers import (
        AgentProcess,
        ServerProcess,
        free_port,
        queued_backlog,
        stored,
        wait_for,
        write_config,
    )

    db = tmp_path / "server.db"
    srv = ServerProcess(free_port(), db=str(db))
    config = write_config(tmp_path, srv.url, telemetry={"interval_s": 0.2})
    backlog = queued_backlog(config.parent / "state", 1000,
                             ("UPDATE messages SET payload = 42 WHERE seq = 5",))
    agent = AgentProcess(config)
    try:
        wait_for(lambda: any(r["sample_time"] > "2026" for r in stored(db)), timeout=10,
                 what="a live sample within 10 s")
        try:
            wait_for(lambda: len({r["id"] for r in stored(db)} & set(backlog)) == 999,
                     timeout=30, what="the rest of the backlog")
        except AssertionError:
            pass
        have = len({r["id"] for r in stored(db)} & set(backlog))
        status = agent.status()
        assert have == 999, f"{have} of 999 backlog rows stored in 30 s; " \
            f"set_aside {status.get('set_aside')}, reconnects {status.get('reconnects')}"
    finally:
        agent.stop()
        srv.stop()


def _dropping_server(big, got):
    """Offers 768 KiB batches; anything over 64 KiB makes it drop the TCP connection with no
    close frame (a proxy or load balancer with a frame or body limit that resets)."""
    import json
    import socket as socket_mod

    def handler(conn):
        now = p.format_timestamp(__import__("time").time())
        conn.send(json.dumps({"type": "connected", "id": "w", "timestamp": now, "payload": {
            "client_id": "dropper", "server_time": now,
            "capabilities": {"telemetry.batch": {"max_items": 1000,
                                                 "max_bytes": 768 * 1024}}}}))
        for text in conn:
            if len(text) > 64 * 1024:
                big.append(len(text))
                conn.socket.shutdown(socket_mod.SHUT_RDWR)
                return
            msg = json.loads(text)
            if msg["type"] == "telemetry":
                got.append(msg["id"])
            elif msg["type"] == "telemetry.batch":
                got.extend(item["id"] for item in msg["payload"]["items"])
            if msg["type"] in ("telemetry", "telemetry.batch", "ping"):
                conn.send(json.dumps({"type": "ack" if msg["type"] != "ping" else "pong",
                                      "id": msg["id"], "timestamp": msg["timestamp"]}))
    return handler


def test_e2e_a_proxy_that_resets_big_frames_still_gets_the_backlog(tmp_path):
    """Issue 21 item 4 with a proxy that resets the TCP connection on a big frame instead
    of closing with 1009: the connection ends by ConnectionLost without an Ended, so
    ``_after_end`` never runs: no halving, no strike. Every reconnect sends the same
    over-size batch again."""
    from helpers import AgentProcess, FakeServer, queued_backlog, wait_for, write_config

    big, got = [], []
    fake = FakeServer(_dropping_server(big, got))
    config = write_config(tmp_path, fake.url, telemetry={"interval_s": 0.2})
    backlog = queued_backlog(config.parent / "state", 3000)
    agent = AgentProcess(config)
    try:
        try:
            wait_for(lambda: set(backlog) <= set(got), timeout=45, what="the whole backlog")
        except AssertionError:
            pass
        missing = len(set(backlog) - set(got))
        assert missing == 0, f"{missing} of 3000 backlog rows never arrived in 45 s; " \
            f"{len(big)} over-size batches sent, {fake.connections} connections"
    finally:
        agent.stop()
        fake.close()


# ------------------------------------------------------------- a model with damage and connections

import shutil  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


class DamagedQueueModel(RuleBasedStateMachine):
    """Puts, damaged cells, reopenings (clean and killed), acks, set-asides, and
    connections drained through a SendPlan (one read covers the whole queue, so the stall
    of the short read is not what this looks for), with live puts in the middle of a
    drain. Checked: ids never repeat; each connection sends every readable queued row once,
    backlog in seq order; damaged rows are set aside once and counted once; depth and
    set_aside counters match the model."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="nexus-review-")
        self.box = Outbox(CODEC, self.dir, 10**8)
        # One batch read covers the whole queue: the short-read stall is tested above.
        self._read_rows = sendplan_mod.BATCH_READ_ROWS
        sendplan_mod.BATCH_READ_ROWS = 100_000
        self.queued = {}  # id -> readable
        self.ever = set()
        self.aside = 0
        self.n = 0

    def teardown(self):
        sendplan_mod.BATCH_READ_ROWS = self._read_rows
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _put(self):
        self.n += 1
        r = self.box.put("telemetry", sample(self.n), TS)
        assert r.id not in self.ever, f"id {r.id} given twice"
        self.ever.add(r.id)
        self.queued[r.id] = True
        return r

    @rule(count=st.integers(1, 40))
    def put(self, count):
        for _ in range(count):
            self._put()

    @precondition(lambda self: self.queued)
    @rule(data=st.data(), how=st.sampled_from(["int", "text", "blob", "type", "ts"]))
    def damage(self, data, how):
        msg_id = data.draw(st.sampled_from(list(self.queued)))
        seq = int(msg_id.split("-")[1])
        column, value = {"int": ("payload", 42), "text": ("payload", "{nope"),
                         "blob": ("payload", b"\x01\xff\xfe"), "type": ("type", 99),
                         "ts": ("ts", -5)}[how]
        with self.box._lock:
            self.box._db.execute(f"UPDATE messages SET {column} = ? WHERE seq = ?", (value, seq))
            # Rows held in memory are sent as they were put (the file is not read for them);
            # drop the memory copies so that the file, damage and all, is what is read (the
            # state a backlog over HELD_ROWS is in).
            self.box._held.clear()
        self.queued[msg_id] = False

    @rule(batch=st.booleans(), live=st.integers(0, 5), ack=st.floats(0, 1))
    def connection(self, batch, live, ack):
        plan = SendPlan(self.box, self.box.stats().last_seq, rows=500,
                        batch=p.BatchOffer(50, 1 << 20) if batch else None, device_id="d")
        sent = []
        for step in range(100_000):
            if step == 1:
                for _ in range(live):
                    self._put()
                plan.new_rows()
            got = plan.next()
            if got is None:
                break
            sent.extend([i for i, _ in got] if isinstance(got, list) else [got.id])
        assert len(sent) == len(set(sent)), "a row sent twice on one connection"
        readable = {i for i, ok in self.queued.items() if ok}
        assert set(sent) == readable, (set(sent) ^ readable)
        unreadable = [i for i, ok in self.queued.items() if not ok]
        self.aside += len(unreadable)
        for i in unreadable:
            del self.queued[i]
        taken = [i for k, i in enumerate(sent) if k < len(sent) * ack]
        assert self.box.ack(taken) == len(taken)
        for i in taken:
            del self.queued[i]

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def set_aside(self, data):
        msg_id = data.draw(st.sampled_from(list(self.queued)))
        assert self.box.set_aside(msg_id, "model")
        del self.queued[msg_id]
        self.aside += 1

    @rule(kill=st.booleans())
    def reopen(self, kill):
        if kill:
            with self.box._lock:
                self.box._flush_acked()  # the kill after the syncer's delete
            self.box._stop.set()
            self.box._db.close()
            self.box._db = None
        else:
            self.box.close()
        self.box = Outbox(CODEC, self.dir, 10**8)

    @invariant()
    def counters(self):
        stats = self.box.stats()
        assert stats.depth == len(self.queued)
        assert stats.set_aside == self.aside


DamagedQueueModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("REVIEW_EXAMPLES", "60")), stateful_step_count=25,
    deadline=None, suppress_health_check=list(HealthCheck))
test_damaged_queue_model = DamagedQueueModel.TestCase


# ------------------------------------------------------------------- batches and the session's end


def _transport_for_ends():
    from agent.sendplan import MAX_BATCH_BYTES

    t = Transport.__new__(Transport)
    t.batches_allowed = True
    t.batch_bytes = MAX_BATCH_BYTES
    t._strikes = ("", 0)
    return t


def test_a_batch_swallowed_with_the_pings_halves_the_batches_too():
    """A proxy that swallows a big frame and everything after it (pongs included): with the
    default timers (ping every 20 s of silence, 10 s to answer; ack timeout 30 s) the ping
    timeout ends the connection before the ack timeout. ``_after_end`` shrinks batches only
    for a refusing close code or ACK_TIMEOUT, and strikes only refusing closes: nothing
    changes, and the next connection sends the same batch again, forever."""
    import json

    from agent.session import Outgoing, Session, SessionConfig

    s = Session(SessionConfig("d", 10, 20, 10, 30, 16, 6000), now=0.0)
    now = p.format_timestamp(0)
    s.receive(json.dumps({"type": "connected", "id": "w", "timestamp": now,
                          "payload": p.welcome_payload("x", 0, p.BatchOffer(1000, 768 << 10))}),
              0.0, 0.0)
    assert s.may_send(15.0)
    s.send(Outgoing("batch-1", "x" * 200_000, ("e-1", "e-2")), 15.0)
    events = []
    t = 15.0
    while not s.ended and t < 100:
        t += 0.5
        events += s.tick(t, t)
    ended = s.ended
    assert ended is not None and ended.batch_bytes == 200_000
    transport = _transport_for_ends()
    transport._after_end(ended)
    assert transport.batch_bytes < 200_000 or not transport.batches_allowed, \
        f"ended by {ended.why.value} with a batch in flight: batches unchanged"


def test_a_null_cell_found_at_open_costs_one_row_not_the_whole_queue(tmp_path):
    """The same NULL payload cell, present when the agent starts: ``PRAGMA quick_check``
    reports "NULL value in messages.payload" (it checks NOT NULL constraints), so
    ``store.open_db`` moves the whole file aside as corrupt and every other queued row is
    lost, uncounted. Issue 21: a row whose value has an unexpected type is set aside, the
    rest flows."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    records = fill(box, 40)
    box.close()
    path = os.path.join(str(tmp_path), "outbox.db")
    _null_payload(path, records[3].seq)
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        moved = [f for f in os.listdir(str(tmp_path)) if ".corrupt-" in f]
        got = box.read_after(0, 100)
        assert len(got) == 39, f"{len(got)} of 39 rows left; files moved aside: {moved}"
    finally:
        box.close()


def test_bit_flips_in_a_file_with_several_epochs_and_set_aside_rows(tmp_path):
    """400 single-bit flips of a file with three epochs, queued rows of each, set-aside
    rows and acked-but-not-deleted rows (in the WAL). For each: open, drain through
    a SendPlan reading the whole queue at once, ack, put, read the new row, reopen. Every
    outcome must be: delivered, rows set aside, or the file refused/set aside; never an
    exception other than StoreError, an id given twice, or a new row that cannot be
    acked."""
    template = tmp_path / "template"
    box = Outbox(CODEC, str(template), 10**8)
    fill(box, 30)
    box.close()
    box = Outbox(CODEC, str(template), 10**8)
    recs = fill(box, 30)
    box.set_aside(recs[3].id, "review")
    box.close()
    box = Outbox(CODEC, str(template), 10**8)
    recs = fill(box, 10)
    box.ack([r.id for r in recs[:3]])
    box._stop.set()  # killed: the acked rows' delete is not written
    box._db.close()
    box._db = None
    rng = random.Random(2123)
    failures = []
    for n in range(400):
        state = tmp_path / f"flip-{n}"
        shutil.copytree(template, state)
        files = [f for f in ("outbox.db", "outbox.db-wal") if (state / f).exists()]
        target = state / rng.choice(files)
        data = bytearray(target.read_bytes())
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(bytes(data))
        try:
            box = Outbox(CODEC, str(state), 10**8, lock_wait_s=0.2)
        except store.StoreError:
            continue
        except Exception as exc:  # noqa: BLE001
            failures.append((n, target.name, bit, "at open: " + repr(exc)[:200]))
            continue
        try:
            plan = SendPlan(box, box.stats().last_seq, rows=100_000)
            sent = drain_plan(plan)
            assert len({r.id for r in sent}) == len(sent)
            box.ack([r.id for r in sent])
            new = box.put("telemetry", sample(), TS)
            assert new.id not in {r.id for r in sent}
            assert box.ack([new.id]) == 1
            box.close()
            box = Outbox(CODEC, str(state), 10**8, lock_wait_s=0.2)
            left = box.read_after(0, 100_000)
            assert box.ack([r.id for r in left]) == len(left), "rows that cannot be acked"
            assert box.stats().depth == 0
        except store.StoreError:
            pass
        except Exception as exc:  # noqa: BLE001
            failures.append((n, target.name, bit, repr(exc)[:200]))
        finally:
            try:
                box.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(state, ignore_errors=True)
    assert not failures, "\n".join(map(repr, failures))


def _flip_in_file(path, needle, offset, bit):
    data = bytearray(open(path, "rb").read())
    at = data.find(needle)
    assert at >= 0, needle
    data[at + offset] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def _closed_template(tmp_path, count=40):
    box = Outbox(CODEC, str(tmp_path), 10**7)
    fill(box, count)
    box.close()  # checkpointed: the schema is in outbox.db
    return os.path.join(str(tmp_path), "outbox.db")


def test_a_flipped_bit_in_a_column_name_of_the_schema_is_not_a_queue_that_does_nothing(
        tmp_path):
    """One bit of the schema text in sqlite_master ("payload" -> "payloae"): quick_check
    says ok, the file opens, and from then on every read and every put fails with
    OperationalError("no such column: payload"), which is neither corruption nor a
    locked file: the agent runs, connects, and neither stores nor delivers anything. It
    should be refused at open (or treated as corrupt) like any other damaged file."""
    path = _closed_template(tmp_path)
    _flip_in_file(path, b"payload NOT NULL", 6, 0)  # d -> e
    try:
        box = Outbox(CODEC, str(tmp_path), 10**7)
    except store.StoreError:
        return  # refused, naming the file: acceptable
    try:
        box.put("telemetry", sample(), TS)
        assert box.read_after(0, 100)
    finally:
        box.close()


def test_a_flipped_bit_in_an_index_name_of_the_schema_names_the_file(tmp_path):
    """One bit of an index name in sqlite_master makes SQLite's error message itself invalid
    UTF-8 ("malformed database schema (s\\xf1lite_autoindex_meta_1)"): Python raises
    UnicodeDecodeError, which ``store.open_db`` does not catch (it is not a DatabaseError):
    the agent dies with a traceback that names no file, and systemd restarts it into the
    same crash forever. It should be StoreError naming the file, or the file set aside."""
    path = _closed_template(tmp_path)
    _flip_in_file(path, b"sqlite_autoindex_meta_1", 1, 7)  # q -> \xf1
    try:
        Outbox(CODEC, str(tmp_path), 10**7).close()
    except store.StoreError as exc:
        assert "outbox.db" in str(exc)


def test_a_kill_between_the_epochs_delete_and_insert_keeps_every_queued_id(tmp_path):
    """kill -9 after ``_start_epoch``'s DELETE FROM epochs and before its INSERT (the same
    transaction: SQLite must roll it back), with ``normal`` durability; then open again:
    every queued row keeps its id, and the new ids are new."""
    import subprocess
    import sys

    box = Outbox(CODEC, str(tmp_path), 10**7)
    first = fill(box, 5)
    box.close()
    box = Outbox(CODEC, str(tmp_path), 10**7)
    second = fill(box, 5)
    box.close()
    before = {r.id for r in first + second}
    script = (
        "import os, sys\n"
        "from contextlib import contextmanager\n"
        "from agent import outbox\n"
        "from agent.codec import CODEC\n"
        "real = outbox.Outbox._transaction\n"
        "class Killing:\n"
        "    def __init__(self, db): self.db = db\n"
        "    def execute(self, *a): return self.db.execute(*a)\n"
        "    def executemany(self, *a): os.kill(os.getpid(), 9)\n"
        "@contextmanager\n"
        "def tx(self):\n"
        "    with real(self) as db:\n"
        "        yield Killing(db)\n"
        "outbox.Outbox._transaction = tx\n"
        "outbox.Outbox(CODEC, sys.argv[1], 10**7)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=repo,
                         capture_output=True, timeout=30)
    assert out.returncode == -9, out.stderr
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        assert {r.id for r in box.read_after(0, 100)} == before
        assert not ({r.id for r in fill(box, 5)} & before)
        assert box.ack(sorted(before)) == 10
    finally:
        box.close()


def test_threads_with_files_replaced_underneath_never_read_an_id_no_put_gave(tmp_path):
    """The sampler puts, the transport reads through a cursor and acks, and a third thread
    now and then meets a corrupt file (``_recover``). Every id a read gives must be one a
    put gave (with that row's payload), and no call may raise."""
    import time

    box = Outbox(CODEC, str(tmp_path), 10**8)
    given = {}
    given_lock = threading.Lock()
    stop = threading.Event()
    errors, wrong = [], []

    def sampler():
        i = 0
        while not stop.is_set():
            r = box.put("telemetry", {"device_id": "d", "metrics": {"x": i}}, TS)
            with given_lock:
                given[r.id] = r.payload
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)

    def transport():
        cursor = box.cursor()
        while not stop.is_set():
            cursor.replaced()
            cursor.more()
            got = cursor.read(64)
            with given_lock:
                for r in got:
                    if given.get(r.id) != r.payload:
                        wrong.append(r.id)
            box.ack([r.id for r in got[: len(got) // 2]])

    def breaker():
        while not stop.wait(0.05):
            _corrupt_recover(box)

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guard(f)) for f in (sampler, transport, breaker)]
    for t in threads:
        t.start()
    time.sleep(float(os.environ.get("REVIEW_RACE_S", "4")))
    stop.set()
    for t in threads:
        t.join()
    box.close()
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} rows read under an id no put gave them, e.g. {wrong[:3]}"


def test_the_set_aside_count_survives_a_replaced_file_like_dropped_does(tmp_path):
    """``_recover`` carries ``dropped`` over to the fresh file but not ``set_aside``: the
    status's set-aside count (and last_set_aside) go back to 0 while dropped goes on."""
    box = Outbox(CODEC, str(tmp_path), 10**7)
    try:
        recs = fill(box, 3)
        assert box.set_aside(recs[0].id, "review")
        _corrupt_recover(box)
        stats = box.stats()
        assert stats.dropped == 2
        assert stats.set_aside == 1, "the set-aside count went back to 0"
    finally:
        box.close()

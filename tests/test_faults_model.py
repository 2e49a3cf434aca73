"""The queue against a model: random sequences of put, read, ack, set aside, restart,
crash and cap changes on a real SQLite file, compared step by step with a few lines of
plain Python that say what the queue must hold.

A crash (the process dies: no close) may bring back messages acked since the last
commit that carried their delete: delivery is at-least-once, so the model allows
exactly those to reappear, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from faults import record, times
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent import outbox as outbox_mod
from agent.outbox import Outbox
from agent.codec import CODEC

TS = "2025-01-01T00:00:00.000Z"


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="nexus-model-")
        self.cap = 10**6
        self.box = Outbox(CODEC, self.dir, self.cap)
        self.queued: dict = {}  # id -> size, in put order (dicts keep it)
        self.maybe: dict = {}  # acked but perhaps not deleted yet: may come back on a crash
        self.ever: set = set()
        self.dropped = 0
        record("model_examples")

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(n=st.integers(0, 400))
    def put(self, n):
        self._put(n)

    @rule(count=st.integers(outbox_mod.HELD_ROWS - 2, outbox_mod.HELD_ROWS + 8))
    def put_many(self, count):
        """A backlog around the length up to which the outbox holds its rows in memory."""
        for _ in range(count):
            self._put(0)

    def _put(self, n):
        record_ = self.box.put("telemetry", {"device_id": "d", "metrics": {"x": 1},
                                             "pad": "p" * n}, TS)
        assert record_.id not in self.ever, "an id was reused"
        self.ever.add(record_.id)
        size = len(record_.payload.encode())
        while self.queued and sum(self.queued.values()) + size > self.cap:
            del self.queued[next(iter(self.queued))]  # the oldest go first
            self.dropped += 1
        self.queued[record_.id] = size
        self.maybe.clear()  # a put's commit carries the pending deletes

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def ack(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.queued)), max_size=5, unique=True))
        taken = self.box.ack(ids + ["ffffffff-1", "junk"])
        assert taken == len(ids)
        for i in ids:
            self.maybe[i] = self.queued.pop(i)

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def set_aside(self, data):
        msg_id = data.draw(st.sampled_from(sorted(self.queued)))
        assert self.box.set_aside(msg_id, "model")
        del self.queued[msg_id]

    @rule()
    def restart(self):
        self.box.close()
        self.box = Outbox(CODEC, self.dir, self.cap)
        self.maybe.clear()  # close deletes what was acked

    @rule()
    def crash(self):
        # What a crash leaves is the files as they are at this instant (SQLite buffers
        # nothing after a commit): copy them and go on with the copy. The outbox holds its
        # file exclusively, so a second one cannot open the same file in this process.
        self.box._stop.set()  # the syncer thread dies with the process
        left = tempfile.mkdtemp(prefix="nexus-model-")
        for suffix in ("", "-wal"):
            if os.path.exists(os.path.join(self.dir, "outbox.db" + suffix)):
                shutil.copyfile(os.path.join(self.dir, "outbox.db" + suffix),
                                os.path.join(left, "outbox.db" + suffix))
        self.box.close()  # in the old folder: nothing of it reaches the copy
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = left
        self.box = Outbox(CODEC, self.dir, self.cap)
        back = {r.id for r in self.box.read_after(0, 10**6)} & set(self.maybe)
        for i in back:  # acked, its delete not yet committed: it is sent again, that is all
            self.queued[i] = self.maybe[i]
        self.queued = dict(sorted(self.queued.items(), key=lambda kv: int(kv[0].split("-")[1])))
        self.maybe.clear()

    @rule(cap=st.sampled_from([65536, 100_000, 10**6]))
    def change_cap(self, cap):
        self.box.close()
        self.cap = cap
        self.box = Outbox(CODEC, self.dir, cap)
        self.maybe.clear()

    @invariant()
    def same_as_the_model(self):
        got = [r.id for r in self.box.read_after(0, 10**6)]
        assert got == list(self.queued)
        stats = self.box.stats()
        assert stats.depth == len(self.queued)
        assert stats.bytes == sum(self.queued.values())
        assert stats.dropped == self.dropped
        # Answers from the rows held in memory (a short queue) agree with the file's rows.
        in_file = [seq for (seq,) in self.box._db.execute("SELECT seq FROM messages ORDER BY seq")
                   if seq not in self.box._acked]
        assert [int(i.split("-")[1]) for i in got] == in_file
        if len(got) > 2:  # reading from the middle gives the rest, in order
            assert [r.id for r in self.box.read_after(int(got[1].split("-")[1]), 10**6)] == \
                got[2:]


QueueModel.TestCase.settings = settings(
    max_examples=times(200, 2000), stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_queue_against_its_model = QueueModel.TestCase

"""The command runner with a real outbox and ledger: busy limits and at-most-once."""

from __future__ import annotations

import json
import queue

from helpers import wait_for

from agent import protocol as p
from agent.commands import parse_allow_list
from agent.config import CommandsConfig
from agent.mailbox import Mailbox
from agent.outbox import Outbox
from agent.codec import CODEC
from agent.runner import CommandRunner


def results(box):
    return {json.loads(r.payload)["command_id"]: json.loads(r.payload)
            for r in box.read_after(0, 1000) if r.type == "command.result"}


def make_runner(tmp_path, box, **limits):
    allow = parse_allow_list({"slow": {"argv": ["/bin/sleep", "1"]}}, "commands.allow")
    cfg = CommandsConfig(allow=allow, **limits)
    runner = CommandRunner(cfg, "device-001", str(tmp_path), queue.SimpleQueue(),
                           Mailbox(box, lambda: None, "device-001"))
    runner.start()
    return runner


def test_over_the_limits_is_rejected_busy(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    runner = make_runner(tmp_path, box, max_concurrent=1, max_queued=1)
    for i in range(3):
        runner.requests.put(p.CommandRequest(f"c{i}", "device-001", "slow", {}))
    got = wait_for(lambda: len(results(box)) == 3 and results(box), timeout=10)
    assert got["c2"]["status"] == "rejected" and "busy" in got["c2"]["stderr"]
    assert got["c0"]["status"] == got["c1"]["status"] == "succeeded"
    runner.close()


def test_interrupted_command_is_reported_not_rerun(tmp_path):
    box = Outbox(CODEC, str(tmp_path), 10**6)
    runner = make_runner(tmp_path, box)
    runner.requests.put(p.CommandRequest("c-int", "device-001", "slow", {}))
    runner.close()  # the agent stops while the command runs: the ledger says "accepted"
    runner2 = make_runner(tmp_path, box)
    got = wait_for(lambda: [r for r in results(box).values() if r["command_id"] == "c-int"
                            and "restarted" in r["stderr"]], timeout=10)
    assert got[0]["status"] == "failed"
    runner2.requests.put(p.CommandRequest("c-int", "device-001", "slow", {}))  # redelivered
    # Not run again: its stored result goes out a second time, and the ledger says done.
    wait_for(lambda: sum(json.loads(r.payload)["command_id"] == "c-int"
                         for r in box.read_after(0, 1000) if r.type == "command.result") == 2,
             timeout=10)
    assert runner2._lookup("c-int")[0] == "done"
    runner2.close()

"""Revocation (issue 27's counterpart to tokens that renew themselves): ``nexus-server
--deny-file`` refuses the identities it names, whatever their credential, re-reads the
file within a second of a change and closes the open connections of a newly denied one.

Real parts: ``nexus-server`` and ``nexus-agent`` as subprocesses on 127.0.0.1, a real
file edited while they run, the server's SQLite store read afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import websocket
from helpers import (
    REPO,
    AgentProcess,
    ServerProcess,
    child_env,
    mint,
    stored,
    wait_for,
    write_config,
)

from agent import protocol as p


def first_message(url, token):
    ws = websocket.create_connection(url, timeout=5, header=[f"Authorization: Bearer {token}"])
    try:
        return json.loads(ws.recv())
    finally:
        ws.close()


def test_a_denied_device_is_refused_and_cut_off_within_a_second_of_the_edit(tmp_path):
    deny = tmp_path / "deny"
    deny.write_text("# stolen on 2026-11-30\ndevice device-009\noperator mallory\n")
    db = tmp_path / "server.db"
    server = ServerProcess(0, "-v", "--deny-file", str(deny), db=str(db))
    agent = AgentProcess(write_config(tmp_path, server.url))
    try:
        for token in (mint("device-009"), mint("mallory", "operator")):
            error = first_message(server.url, token)
            assert error["error"]["code"] == p.AUTH_FAILED
            assert error["error"]["message"] == "Revoked"
        assert first_message(server.url, mint("ops", "operator"))["type"] == "connected"
        wait_for(lambda: len(stored(db)) >= 2, timeout=15, what="device-001 streaming")
        deny.write_text(deny.read_text() + "device-001\n")  # a bare id is a device
        wait_for(lambda: "device device-001 is revoked (deny file): closing" in server.log(),
                 timeout=10, what="the open connection closed")
        wait_for(lambda: "device device-001 is revoked (deny file): refused" in server.log(),
                 timeout=10, what="its reconnect refused")
        count = len(stored(db))
        # A bad edit keeps the list in force (a typo must not unrevoke anyone).
        deny.write_text("device-001\nthis line is wrong\n")
        wait_for(lambda: "line 2" in server.log(), timeout=10, what="the bad line named")
        assert first_message(server.url, mint("device-009"))["error"]["message"] == "Revoked"
        assert len(stored(db)) == count
        deny.write_text("")  # lifted: the agent comes back by itself
        wait_for(lambda: len(stored(db)) >= count + 2, timeout=15, what="device-001 back")
    finally:
        assert agent.stop() == 0
        server.stop()


def test_a_bad_deny_file_stops_the_start_naming_the_line(tmp_path):
    deny = tmp_path / "deny"
    deny.write_text("device ok-1\nrobot r2d2\n")
    out = subprocess.run([sys.executable, "-m", "agent.server", "--port", "0", "--deny-file",
                          str(deny)], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "line 2" in out.stderr, out.stderr


def refused(url, token):
    return first_message(url, token).get("error", {}).get("message") == "Revoked"


def test_an_edit_that_keeps_size_and_modification_time_is_still_read(tmp_path):
    # Two writes within one tick of the kernel's coarse clock (or a 'cp -p') leave mtime,
    # size and inode as they were: the second one must not be missed for good.
    deny = tmp_path / "deny"
    deny.write_text("device device-zz1\n")
    server = ServerProcess(0, "-v", "--deny-file", str(deny))
    try:
        deny.write_text("device device-aa1\n")  # in place: the inode stays
        wait_for(lambda: refused(server.url, mint("device-aa1")), timeout=10,
                 what="the first edit read")
        st = deny.stat()
        deny.write_text("device device-bb2\n")  # the same size
        os.utime(deny, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same tick
        assert deny.stat().st_ino == st.st_ino
        wait_for(lambda: refused(server.url, mint("device-bb2")), timeout=10,
                 what="the second edit read")
        assert not refused(server.url, mint("device-aa1"))
    finally:
        server.stop()


def test_a_byte_order_mark_does_not_hide_the_first_id():
    """An editor's UTF-8 byte-order mark before a bare id: that id is revoked all the same
    (read as part of it, the line revoked nobody and said nothing)."""
    from agent.server.denylist import DenyList

    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".deny") as f:
        f.write("\ufeffdevice-001\n".encode("utf-8"))
        f.flush()
        assert DenyList(f.name).refused("device", "device-001")


def test_a_revoked_device_that_ignores_the_close_frame_is_served_no_more(tmp_path):
    """The close begins at the revocation; a client that does not read it and keeps
    sending was served until the close timeout aborted it (its telemetry stored)."""
    import time

    deny = tmp_path / "deny"
    deny.write_text("")
    db = tmp_path / "server.db"
    server = ServerProcess(0, "-v", "--deny-file", str(deny), db=str(db))
    ws = websocket.create_connection(server.url, timeout=5, header=[
        f"Authorization: Bearer {mint('device-001')}"])
    try:
        assert json.loads(ws.recv())["type"] == "connected"

        def telemetry(msg_id):
            ws.send(json.dumps({"type": "telemetry", "id": msg_id, "timestamp":
                                p.format_timestamp(time.time()), "payload": {
                                    "device_id": "device-001",
                                    "metrics": {"cpu_usage": 1, "memory_usage": 2}}}))

        telemetry("before")
        assert json.loads(ws.recv())["type"] == "ack"
        deny.write_text("device-001\n")
        wait_for(lambda: "is revoked (deny file): closing" in server.log(), timeout=10,
                 what="the revocation")
        for i in range(3):  # never reads the close frame, keeps sending
            telemetry(f"after-{i}")
        wait_for(lambda: "disconnected (close code" in server.log(), timeout=10,
                 what="the connection's end")
    finally:
        ws.close()
        server.stop()
    assert [r["id"] for r in stored(db)] == ["before"]

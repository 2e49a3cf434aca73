"""sd_notify over real Unix datagram sockets, path and abstract namespace."""

from __future__ import annotations

import os
import socket

from agent.sdnotify import Notifier, watchdog_interval


def test_not_under_systemd_is_not_an_error(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.notify("READY=1") is False


def test_path_socket(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "n.sock"))
    n = Notifier(str(tmp_path / "n.sock"))
    assert n.notify("READY=1", "STATUS=ok")
    assert server.recv(100) == b"READY=1\nSTATUS=ok"
    n.close()
    n.close()


def test_abstract_namespace_socket():
    name = f"nexus-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    n = Notifier("@" + name)
    assert n.notify("WATCHDOG=1")
    assert server.recv(100) == b"WATCHDOG=1"


def test_send_failure_is_reported_not_raised(tmp_path, caplog):
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert n.enabled and n.notify("READY=1") is False
    assert n.notify("READY=1") is False
    assert caplog.text.count("cannot notify systemd") == 1


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None

"""Logs: one line per event (tracebacks folded), tokens redacted whatever the caller did."""

from __future__ import annotations

import io
import logging

from helpers import mint

from agent.logsetup import setup_logging


def test_one_line_per_event_and_no_tokens(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging()
    log = logging.getLogger("nexus.test")
    token = mint("device-001")
    log.warning("connecting to wss://h/v1/ws?token=%s", "abc123secret")
    log.warning("header Authorization: Bearer %s", token)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("sampling failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "abc123secret" not in lines[0] and "token=[redacted]" in lines[0]
    assert token not in lines[1] and "[redacted" in lines[1]
    assert "Traceback" in lines[2] and "boom" in lines[2]
    logging.getLogger().handlers.clear()

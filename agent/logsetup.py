"""Logging for daemons under systemd: one line per event on stderr, no secrets.

journald adds its own timestamps, so a line is ``LEVEL logger: message``.
:class:`RedactFilter` masks anything that looks like a JWT or a bearer token in
every record, as a second line of defence: no code should log a token at all.
"""

from __future__ import annotations

import logging
import re
import sys

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+|token=)[^\s&'\"]+")


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class OneLineFormatter(logging.Formatter):
    """Folds a traceback (or any newline) into the same line: one journal entry per event."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every handshake failure at ERROR with a traceback; one line is enough.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)

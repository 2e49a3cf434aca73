"""The status file: its one name, and how it is written and read.

The daemon (``service.py``) replaces it atomically (write a temporary file,
then ``os.replace``) every few seconds; ``nexus-agent status`` reads it. It is
one JSON object; the keys are those of ``Agent.status()``. Nothing here
imports more than the standard library, so both sides can use it cheaply.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

NAME = "status.json"


def path(state_dir: str) -> str:
    return os.path.join(state_dir, NAME)


def write(state_dir: str, data: Dict[str, Any]) -> None:
    """Atomically replace the file; OSError when it cannot (no partial file is left)."""
    target = path(state_dir)
    tmp = f"{target}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, target)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(state_dir: str) -> Optional[Dict[str, Any]]:
    """The last status written, or None when there is none (or it cannot be read)."""
    try:
        with open(path(state_dir), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

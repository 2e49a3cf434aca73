"""The status file: its one name and place, and how it is written and read.

Where: in the runtime directory when there is one (systemd's
``RuntimeDirectory=nexus-agent`` sets ``$RUNTIME_DIRECTORY``, a tmpfs under
``/run``, so the file costs the SD card nothing), else in ``state_dir``.
``nexus-agent status`` looks in ``$RUNTIME_DIRECTORY``, then ``/run/nexus-agent``,
then ``state_dir``, and takes the first file written by an agent with the same
``state_dir`` (a file in ``state_dir`` itself is always that agent's).

The daemon (``service.py``) replaces it atomically (write a temporary file,
then ``os.replace``) at once when a fact in it changed, when its counters
changed at the main loop's tick (``service.COUNTERS``: every ten samples, 2 to
30 s), and at least every ``REFRESH_S``; readers call a file older than
``STALE_S`` stale. It is one JSON
object; the keys are those of ``Agent.status()``. Nothing here imports more
than the standard library, so both sides can use it cheaply.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

NAME = "status.json"
RUN_DIR = "/run/nexus-agent"  # systemd's RuntimeDirectory=nexus-agent
REFRESH_S = 30.0  # rewritten at least this often, even when nothing changed
STALE_S = 90.0  # three refreshes missed: the writer is gone or stuck


def _runtime_dir() -> Optional[str]:
    value = os.environ.get("RUNTIME_DIRECTORY", "")
    return value.split(":")[0] or None  # systemd joins several with ':'


def path(state_dir: str) -> str:
    """Where this process writes the file."""
    return os.path.join(_runtime_dir() or state_dir, NAME)


def candidates(state_dir: str) -> List[str]:
    """Where a reader looks, in order."""
    found: List[str] = []
    for folder in (_runtime_dir(), RUN_DIR, state_dir):
        if folder and os.path.join(folder, NAME) not in found:
            found.append(os.path.join(folder, NAME))
    return found


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


def _load(file: str) -> Optional[Dict[str, Any]]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read(state_dir: str) -> Optional[Dict[str, Any]]:
    """The last status written by the agent of ``state_dir``, or None when there is none
    (or it cannot be read)."""
    own = os.path.join(state_dir, NAME)
    for file in candidates(state_dir):
        data = _load(file)
        if data is not None and (file == own or data.get("state_dir") == state_dir):
            return data
    return None

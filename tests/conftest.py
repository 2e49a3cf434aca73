from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CHILDREN, FAKE_SERVERS, OPEN_PEERS, SECRET  # noqa: E402

os.environ.setdefault("NEXUS_JWT_SECRET", SECRET)


@pytest.fixture
def loop_choice() -> str:
    """The ``server`` fixture's event loop; test_server.py runs its tests on each."""
    return "auto"


@pytest.fixture
def server(loop_choice: str) -> Iterator[object]:
    """A companion server in this process, on a free loopback port, fast heartbeats."""
    from agent.server.app import CompanionServer, ServerSettings

    srv = CompanionServer(ServerSettings(port=0, ping_interval_s=1.0, ping_timeout_s=1.0,
                                         close_timeout_s=0.2, loop=loop_choice),
                          SECRET.encode()).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    yield
    while OPEN_PEERS:
        OPEN_PEERS.pop().close()
    while FAKE_SERVERS:
        FAKE_SERVERS.pop().close()


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """A test that fails half-way must not leave an agent or a server running.

    Only what this test started: module-scoped servers are set up before it, and stay.
    """
    start = len(CHILDREN)
    yield
    while len(CHILDREN) > start:
        proc = CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def node_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """NODE_PATH with the guide's npm packages (ws, jsonwebtoken); skips without Node.js."""
    from nodejs import node_modules

    return str(node_modules(tmp_path_factory.mktemp("npm")))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a fault run: the figures table (tests/faults.py)."""
    import faults

    if not faults.FIGURES:
        return
    terminalreporter.write_sep("=", "fault suite figures" + (" (full run)" if faults.FULL
                                                              else " (default run)"))
    faults.FIGURES["crashes"] = len(terminalreporter.stats.get("failed", [])) + len(
        terminalreporter.stats.get("error", []))
    for key, what in faults.ROWS.items():
        if key in faults.FIGURES:
            terminalreporter.write_line(f"{faults.FIGURES[key]:>12,.1f}  {what}")

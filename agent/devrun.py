"""``make run``: the companion server and one agent on loopback, telemetry printed live.

Steps: make ``.run/`` (a fresh JWT secret and a device token, both 0600), start
the companion server on 127.0.0.1:8765 in this process, start ``nexus-agent
--config config/agent.local.yaml`` as a child process (its log goes to
stderr), and print each ``telemetry.update`` as one line until Ctrl-C (or
``--duration`` seconds), with the fleet page's URL (an operator token in its
fragment) on stderr before the stream. Then the agent gets SIGTERM and the server stops.

The agent runs in a session of its own, so a Ctrl-C in the terminal reaches
only this process, and the agent gets exactly one stop signal (SIGTERM, from
here): a normal stop, acks awaited while the server is still up, nothing that
reads like a fault. If it has not exited within ``AGENT_GRACE_S`` it is
killed, and this says so; nothing is left running either way. The live view
ends without a word when the server stops under it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from . import config as config_mod
from .cli import plain
from .signals import STOP_SIGNALS, SignalInbox, leave

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "agent.local.yaml"
AGENT_GRACE_S = 3.5  # with the server's stop, Ctrl-C is done within 5 s


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.devrun", description=plain(__doc__))
    ap.add_argument("--config", default=str(CONFIG), help="agent config (default: %(default)s)")
    ap.add_argument("--duration", type=float, help="stop after this many seconds")
    # before anything slow: handlers only record. SIGHUP: the terminal closed.
    inbox = SignalInbox((*STOP_SIGNALS, signal.SIGHUP))
    args = ap.parse_args(argv)

    from . import ctl
    from .logsetup import setup_logging
    from .server.app import CompanionServer, ServerSettings
    from .server.page import PAGE_SUBJECT, PAGE_TOKEN_TTL_S, page_url
    from .server.tokens import mint

    setup_logging()
    cfg = config_mod.load(args.config)
    url = cfg.server.url
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    secret = secrets.token_hex(32).encode()
    assert cfg.server.token_file is not None
    _write_private(Path(cfg.server.token_file), mint(secret, cfg.device_id, "device", 86400))
    try:
        server = CompanionServer(ServerSettings(host=host, port=int(port)), secret).start()
    except OSError as exc:
        print(f"devrun: cannot listen on {host}:{port} ({exc.strerror}); is another "
              "nexus-server running?", file=sys.stderr)
        return 1
    print(f"companion server on {server.url}; agent {cfg.device_id} with {args.config}",
          file=sys.stderr)
    page_token = mint(secret, PAGE_SUBJECT, "operator", PAGE_TOKEN_TTL_S)
    print(f"fleet page: {page_url(server.url, page_token)}", file=sys.stderr, flush=True)
    # A session of its own: the terminal's Ctrl-C would be a second stop signal on top of
    # ours ("stop signal again: not waiting for acks"), a warning for a plain stop.
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", args.config],
                             cwd=ROOT, start_new_session=True)
    try:
        ws = ctl.connect(server.url, mint(secret, "devrun", "operator", 86400))
        watcher = threading.Thread(target=ctl.watch, daemon=True,
                                   args=(ws, cfg.device_id, None, sys.stdout, False, False))
        watcher.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not inbox.wait(0.2):
            if deadline and time.monotonic() > deadline:
                break
            if agent.poll() is not None:
                print(f"devrun: the agent exited with {agent.returncode}", file=sys.stderr)
                break
    finally:
        code = _stop_agent(agent)
        server.stop()  # closes the watcher's connection too
    watcher.join(2)
    ws.close()
    leave(0 if code in (0, -signal.SIGTERM) else code)  # see signals.leave
    return 0  # not reached


def _stop_agent(agent: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after AGENT_GRACE_S (said on stderr); its exit code."""
    if agent.poll() is None:
        agent.terminate()
    try:
        return agent.wait(AGENT_GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"devrun: the agent did not stop within {AGENT_GRACE_S:g} s; killed it",
              file=sys.stderr)
        agent.kill()
        return agent.wait()


if __name__ == "__main__":
    sys.exit(main())

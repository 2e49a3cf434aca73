"""``nexus-agent``: the device daemon and its operator subcommands.

    nexus-agent [--config PATH]                 run the daemon (under systemd)
    nexus-agent --check-config [--config PATH]  check the config and token, then exit
    nexus-agent status [--config PATH] [--json] report the running agent's health
    nexus-agent send --source S [--tag K=V] M=N  hand the agent a sample (or lines on stdin)
    nexus-agent provision --device-id ID ...    write config and token (fleet scripts)
    nexus-agent privileges [--config PATH]      print the polkit rule for the allow-list
    nexus-agent modbus read [--config PATH] [NAME]  read the Modbus points once (commissioning)

Exit codes: 0 success (also after one or two stop signals); 1 unhealthy
(status), or a third stop signal while stopping (out at once); 75
(EX_TEMPFAIL) the queue is locked by another process or unreadable for a
reason that may pass (systemd restarts it later); 78 (EX_CONFIG) a bad config,
token or state_dir, so the unit's ``RestartPreventExitStatus=78`` stops a
crash loop.
"""

from __future__ import annotations

import logging
import sys
from typing import List, NamedTuple, Optional

from . import cli
from .cli import EXIT_CONFIG
from .config import Config

EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the queue is locked or the disk fails; systemd retries


class DaemonArgs(NamedTuple):
    config: str
    check_config: bool


def _daemon_args(argv: List[str]) -> DaemonArgs:
    """``[--config PATH] [--check-config]`` read by hand; anything else (help, a typo, a
    missing value) goes to argparse, which the running daemon then never imports (about
    1 MB of RSS with what it pulls in, see ``cli.parser``)."""
    config, check, rest = cli.DEFAULT_CONFIG, False, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--check-config":
            check = True
        elif arg == "--config" and rest and not rest[0].startswith("-"):
            config = rest.pop(0)
        elif arg.startswith("--config=") and len(arg) > len("--config="):
            config = arg[len("--config="):]
        else:
            return _parsed_daemon_args(argv)
    return DaemonArgs(config, check)


def _parsed_daemon_args(argv: List[str]) -> DaemonArgs:
    ap = cli.parser("nexus-agent", "Nexus edge telemetry agent. "
                    "Subcommands: status, send, provision, privileges, modbus read (each has "
                    "-h).")
    ap.add_argument("--check-config", action="store_true",
                    help="check the config file and token, print the result, exit")
    args = ap.parse_args(argv)
    return DaemonArgs(args.config, args.check_config)


def _credential_problem(cfg: Config) -> Optional[str]:
    """What the client certificate (``certinfo.problem``) or the token's claims
    (``auth.token_problem``) say is wrong for this device."""
    import time

    from . import certinfo
    from .auth import current_token, token_problem

    if cfg.server.client_cert:
        problem = certinfo.problem(cfg.server.client_cert, cfg.device_id, time.time())
        if problem:
            return f"server.client_cert {cfg.server.client_cert}: {problem}"
    # A renewal the server sent (state_dir) counts: the provisioned token may have expired
    # long ago on a device that renews.
    token = current_token(cfg.server.token_file, cfg.server.client_key, cfg.state_dir,
                          cfg.device_id, time.time())
    problem = None if token is None else token_problem(token, cfg.device_id, time.time())
    if problem is None:
        return None
    source = f"token file {cfg.server.token_file}" if cfg.server.token_file else "NEXUS_TOKEN"
    return f"{source}: {problem}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    inbox = None
    if argv[:1] not in (["status"], ["provision"], ["privileges"], ["modbus"], ["send"]) and \
            "--check-config" not in argv and not {"-h", "--help"} & set(argv):
        # The daemon, before anything slow: from here on SIGHUP, SIGTERM and SIGINT are
        # recorded (and acted on once it runs), never fatal.
        from .signals import DAEMON_SIGNALS, SignalInbox

        inbox = SignalInbox(DAEMON_SIGNALS)
    if argv[:1] == ["status"]:
        from .status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["send"]:
        from .send import main as send_main

        return send_main(argv[1:])
    if argv[:1] == ["provision"]:
        from .provision import main as provision_main

        return provision_main(argv[1:])
    if argv[:1] == ["privileges"]:
        from .privileges import main as privileges_main

        return privileges_main(argv[1:])
    if argv[:1] == ["modbus"]:
        if argv[1:2] != ["read"]:
            print("usage: nexus-agent modbus read [--config PATH] [NAME]", file=sys.stderr)
            return 2
        from .modbus_read import main as modbus_read_main

        return modbus_read_main(argv[2:])
    args = _daemon_args(argv)
    cfg = cli.load_config(args.config, check_files=True)
    if cfg is None:
        return EXIT_CONFIG
    from .config import pace_warning

    warning = pace_warning(cfg)
    problem = _credential_problem(cfg)
    if args.check_config:
        if problem:  # --check-config promises a usable token
            print(f"nexus-agent: config error: {problem}", file=sys.stderr)
            return EXIT_CONFIG
        if warning:
            print(f"nexus-agent: warning: {warning}", file=sys.stderr)
        print(f"nexus-agent: {args.config} is valid")
        return 0
    if problem:  # the daemon starts anyway: provisioning may replace the token while it runs
        print(f"nexus-agent: warning: {problem}; the server will refuse it until the token "
              "is replaced", file=sys.stderr)
    from .errors import ConfigError
    from .logsetup import setup_logging
    from .service import Agent
    from .store import StoreError

    setup_logging(getattr(logging, cfg.log_level.upper()))
    try:
        agent = Agent(cfg)
    except ConfigError as exc:  # an input that cannot be built (its library missing, a
        # socket path that cannot be used)
        print(f"nexus-agent: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # state_dir not creatable or writable: a deployment error
        print(f"nexus-agent: config error: state_dir: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:  # locked, unwritable or failing: never thrown away
        print(f"nexus-agent: cannot use {exc.path}: {exc.reason}", file=sys.stderr)
        return EXIT_TEMPFAIL if exc.temporary else EXIT_CONFIG
    code = agent.run(inbox)
    from .signals import leave

    leave(code)  # no finalization: a late second stop signal must not kill us on the way out
    return code  # not reached


if __name__ == "__main__":
    sys.exit(main())

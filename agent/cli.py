"""What every ``nexus-agent`` subcommand shares: its parser and the one-line config error."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Optional

from .config import Config

if TYPE_CHECKING:  # argparse is imported only when a parser is built (see parser())
    import argparse

DEFAULT_CONFIG = "/etc/nexus/agent.yaml"
EXIT_CONFIG = 78  # EX_CONFIG; the unit's RestartPreventExitStatus=78 stops a crash loop


def plain(doc: Optional[str]) -> Optional[str]:
    """A module docstring as a person reads it in ``--help``: without RST's double backticks
    around names (``--config`` prints as --config)."""
    return None if doc is None else re.sub(r"``([^`]+)``", r"\1", doc)


def parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """A subcommand parser with ``--config`` and the module docstring (``plain``) as its help.

    argparse is imported here, not at the top: with its help formatter it pulls in shutil,
    bz2, lzma and zlib, about 1 MB of RSS the daemon would carry for its whole run."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=plain(doc),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file ({DEFAULT_CONFIG})")
    return ap


def load_config(path: str, check_files: bool = False) -> Optional[Config]:
    """The checked config, or None after printing the one-line error naming the key or file.

    ``check_files`` (the daemon and ``--check-config``): also the token (its file; what
    it claims is ``auth.token_problem``), the proxy credentials file, and that
    ``state_dir`` can be written by this user, and that every configured input's library
    is installed (``inputs.missing``).
    """
    from . import config as config_mod
    from .auth import check_credentials, read_proxy_auth
    from .errors import AuthError, ConfigError

    try:
        cfg = config_mod.load(path)
        if check_files:
            check_credentials(cfg.server.token_file, cfg.server.client_key)
            if cfg.server.proxy_auth_file:
                read_proxy_auth(cfg.server.proxy_auth_file)
            config_mod.check_state_dir(cfg.state_dir)
            if cfg.inputs:  # an input whose library is missing (an extra not installed)
                from .inputs import missing, sections_of

                for problem in missing(sections_of(cfg))[:1]:
                    name, _, reason = problem.partition(": ")
                    raise ConfigError(name, reason + " (docs/deploy.md)")
    except (ConfigError, AuthError) as exc:
        print(f"nexus-agent: config error: {exc}", file=sys.stderr)
        return None
    return cfg

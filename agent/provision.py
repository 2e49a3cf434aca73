"""``nexus-agent provision``: write a device's config and token, for fleet scripts.

    nexus-agent provision --device-id ID --server URL --token-file PATH
                          [--config /etc/nexus/agent.yaml] [--state-dir DIR]
                          [--ca-file PEM] [--force] [--no-check]

Order: check the input (as the agent would), check that the server accepts
the token (unless ``--no-check``), then write the token (``token`` beside the
config) and the config, each atomically (temporary file, fsync, rename, fsync
of the directory) with mode 0600. Nothing is written when a check fails.

Idempotent: the same input gives byte-identical files and exit 0. An existing
config with other content is refused unless ``--force``; the token file is
simply replaced (that is how tokens are rotated).

Exit codes: 0 done; 2 bad input; 3 an existing config differs (use --force);
4 the server cannot be reached; 5 the server refused the token; 6 a file
system error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

import yaml

from . import config as config_mod
from .auth import read_token
from .errors import AuthError, ConfigError

EXIT_OK, EXIT_INPUT, EXIT_CONFLICT, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_FS = 0, 2, 3, 4, 5, 6


class ProvisionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def render_config(device_id: str, server: str, token_path: str, state_dir: str,
                  ca_file: Optional[str] = None) -> str:
    """The config text: deterministic, so re-running with the same input changes nothing."""
    q = json.dumps  # a JSON string is a YAML double-quoted scalar: nothing can break out
    return (
        "# Written by 'nexus-agent provision'. Every key: agent.example.yaml.\n"
        f"device_id: {q(device_id)}\n"
        f"state_dir: {q(state_dir)}\n"
        "server:\n"
        f"  url: {q(server)}\n"
        f"  token_file: {q(token_path)}\n"
        + (f"  ca_file: {q(os.path.abspath(ca_file))}\n" if ca_file else "")
    )


def write_atomic(path: str, data: str) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so readers see the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".provision-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def check_server(url: str, token: str, ca_file: Optional[str] = None,
                 timeout: float = 10.0) -> None:
    """ProvisionError unless the server at ``url`` welcomes ``token``."""
    from .transport import AuthRefused, open_welcomed

    try:
        open_welcomed(url, token, ca_file, timeout).close()
    except AuthRefused as exc:
        raise ProvisionError(EXIT_AUTH, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS and timeouts all mean "unreachable"
        raise ProvisionError(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}") from None


def provision(args: argparse.Namespace) -> str:
    config_path = os.path.abspath(args.config)
    token_path = os.path.join(os.path.dirname(config_path), "token")
    text = render_config(args.device_id, args.server, token_path, args.state_dir, args.ca_file)
    try:
        config_mod.build(yaml.safe_load(text), config_path)
    except ConfigError as exc:
        option = {"device_id": "--device-id", "server.url": "--server",
                  "state_dir": "--state-dir", "server.ca_file": "--ca-file"}.get(exc.key, exc.key)
        raise ProvisionError(EXIT_INPUT, f"{option}: {exc.reason}") from None
    try:
        token = read_token(args.token_file)
    except AuthError as exc:
        raise ProvisionError(EXIT_INPUT, f"--token-file: {exc}") from None
    try:
        with open(config_path, encoding="utf-8") as f:
            existing: Optional[str] = f.read()
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ProvisionError(EXIT_FS, f"{config_path}: {exc.strerror}") from None
    if existing is not None and existing != text and not args.force:
        raise ProvisionError(EXIT_CONFLICT, f"{config_path} exists with other settings; "
                             "re-run with --force to replace it")
    if not args.no_check:
        check_server(args.server, token, args.ca_file)
    try:
        write_atomic(token_path, token + "\n")
        if existing != text:
            write_atomic(config_path, text)
        else:
            os.chmod(config_path, 0o600)
    except OSError as exc:
        raise ProvisionError(EXIT_FS, f"cannot write {exc.filename or config_path}: "
                             f"{exc.strerror}") from None
    return config_path


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="nexus-agent provision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-id", required=True)
    ap.add_argument("--server", required=True, help="ws:// or wss:// URL of /v1/ws")
    ap.add_argument("--token-file", required=True, help="file holding the device's token "
                    "(mode 0600); it is copied to 'token' beside the config")
    ap.add_argument("--config", default="/etc/nexus/agent.yaml")
    ap.add_argument("--state-dir", default="/var/lib/nexus-agent")
    ap.add_argument("--ca-file", help="PEM CA file for a wss:// server with a private CA")
    ap.add_argument("--force", action="store_true", help="replace a config with other settings")
    ap.add_argument("--no-check", action="store_true",
                    help="do not check the token against the server (offline provisioning)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return EXIT_INPUT if exc.code else EXIT_OK
    start = time.monotonic()
    try:
        path = provision(args)
    except ProvisionError as exc:
        print(f"nexus-agent provision: {exc}", file=sys.stderr)
        return exc.code
    print(f"nexus-agent provision: {path} ready for {args.device_id} "
          f"({time.monotonic() - start:.1f} s)")
    return EXIT_OK

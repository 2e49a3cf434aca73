"""The command allow-list: a request from the server becomes an argv to run, or a rejection.

Rules (deny by default):

* Only names listed under ``commands.allow`` run. The executable is the
  absolute path written in the config; the server never chooses it.
* An argument fills one *whole* argv item written as ``"{name}"``; it is never
  spliced into a longer string, and no shell ever reads the result.
* Every argument the request carries must be declared by the entry and match
  its schema (``enum`` or ``pattern``, matched in full); every declared
  argument is required. A value that starts with ``-`` is refused unless the
  schema sets ``allow_dash: true`` (it would be read as an option), and so is
  any control character.
* The whole allow-list is checked when the config loads, with errors that name
  the entry (``commands.allow.ping-host.argv``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import CommandRejected, ConfigError


@dataclass(frozen=True)
class CommandSpec:
    """One allow-listed command: what ``parse_allow_list`` makes of a config entry."""

    name: str
    argv: Tuple[str, ...]
    timeout_s: float = 30.0
    args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    run_as: Optional[str] = None

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]{0,31})\}$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_MAX_LENGTH = 256
SCHEMA_KEYS = {"enum", "pattern", "max_length", "allow_dash"}
ENTRY_KEYS = {"argv", "timeout_s", "args", "run_as"}


def parse_allow_list(raw: Any, path: str) -> Dict[str, CommandSpec]:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a mapping of command names to entries")
    return {str(name): _parse_entry(name, entry, f"{path}.{name}") for name, entry in raw.items()}


def _parse_entry(name: Any, entry: Any, path: str) -> CommandSpec:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(path, "a command name is 1 to 64 letters, digits, . _ or -")
    if not isinstance(entry, dict):
        raise ConfigError(path, "must be a mapping with at least argv")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{path}.{sorted(unknown)[0]}",
                          f"unknown key (known keys: {', '.join(sorted(ENTRY_KEYS))})")
    argv = _parse_argv(entry.get("argv"), f"{path}.argv")
    args = _parse_args(entry.get("args") or {}, f"{path}.args")
    used = {m.group(1) for item in argv[1:] for m in [PLACEHOLDER.match(item)] if m}
    for missing in sorted(used - set(args)):
        raise ConfigError(f"{path}.argv", f"uses {{{missing}}} but {path}.args does not "
                          "declare it")
    for unused in sorted(set(args) - used):
        raise ConfigError(f"{path}.args.{unused}", "is declared but not used in argv")
    timeout = entry.get("timeout_s", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0.1 <= timeout <= 86400):
        raise ConfigError(f"{path}.timeout_s", "must be a number between 0.1 and 86400")
    run_as = entry.get("run_as")
    if run_as is not None:
        _check_run_as(run_as, f"{path}.run_as")
    return CommandSpec(name, tuple(argv), float(timeout), args, run_as)


def _parse_argv(argv: Any, path: str) -> List[str]:
    if not isinstance(argv, list) or not argv:
        raise ConfigError(path, "must be a non-empty list of strings")
    for i, item in enumerate(argv):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]", "must be a string (quote numbers: \"3\")")
        if CONTROL.search(item):
            raise ConfigError(f"{path}[{i}]", "contains a control character")
        if ("{" in item or "}" in item) and not (i > 0 and PLACEHOLDER.match(item)):
            raise ConfigError(f"{path}[{i}]", "a placeholder must be a whole argv item like "
                              "\"{host}\" (and never the executable)")
    if not os.path.isabs(argv[0]):
        raise ConfigError(f"{path}[0]", f"the executable must be an absolute path, not "
                          f"{argv[0]!r}")
    return list(argv)


def _parse_args(args: Any, path: str) -> Dict[str, Mapping[str, Any]]:
    if not isinstance(args, dict):
        raise ConfigError(path, "must be a mapping of argument names to schemas")
    out: Dict[str, Mapping[str, Any]] = {}
    for name, schema in args.items():
        where = f"{path}.{name}"
        if not isinstance(schema, dict) or not schema:
            raise ConfigError(where, "must be a mapping with enum or pattern")
        unknown = set(schema) - SCHEMA_KEYS
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}",
                              f"unknown key (known keys: {', '.join(sorted(SCHEMA_KEYS))})")
        if ("enum" in schema) == ("pattern" in schema):
            raise ConfigError(where, "needs exactly one of enum or pattern")
        if "enum" in schema:
            enum = schema["enum"]
            if not isinstance(enum, list) or not enum or not all(
                    isinstance(v, str) for v in enum):
                raise ConfigError(f"{where}.enum", "must be a non-empty list of strings")
        else:
            try:
                re.compile(schema["pattern"])
            except (re.error, TypeError) as exc:
                raise ConfigError(f"{where}.pattern", f"not a valid regular expression: {exc}"
                                  ) from None
        max_length = schema.get("max_length", DEFAULT_MAX_LENGTH)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not (
                1 <= max_length <= 4096):
            raise ConfigError(f"{where}.max_length", "must be an integer between 1 and 4096")
        if not isinstance(schema.get("allow_dash", False), bool):
            raise ConfigError(f"{where}.allow_dash", "must be true or false")
        out[str(name)] = dict(schema)
    return out


def _check_run_as(user: Any, path: str) -> None:
    import pwd

    if not isinstance(user, str) or not user:
        raise ConfigError(path, "must be a user name")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(path, f"no such user {user!r}") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise ConfigError(path, f"the agent runs as uid {os.geteuid()} and cannot switch to "
                          f"{user!r} (run it as root or drop run_as; there is no fallback)")


def resolve(allow: Mapping[str, CommandSpec], name: str,
            args: Mapping[str, str]) -> Tuple[CommandSpec, List[str]]:
    """The entry and the argv to run for a request; CommandRejected says why not."""
    spec = allow.get(name)
    if spec is None:
        raise CommandRejected(f"command {name!r} is not on this device's allow-list")
    for key in args:
        if key not in spec.args:
            raise CommandRejected(f"argument {key!r} is not declared for {name!r}")
    for key, schema in spec.args.items():
        if key not in args:
            raise CommandRejected(f"argument {key!r} is required by {name!r}")
        _check_value(name, key, args[key], schema)
    argv: List[str] = []
    for item in spec.argv:
        m = PLACEHOLDER.match(item)
        argv.append(args[m.group(1)] if m and argv else item)
    return spec, argv


def _check_value(name: str, key: str, value: str, schema: Mapping[str, Any]) -> None:
    if not isinstance(value, str):
        raise CommandRejected(f"argument {key!r} must be a string")
    if len(value) > schema.get("max_length", DEFAULT_MAX_LENGTH):
        raise CommandRejected(f"argument {key!r} is longer than its max_length")
    if CONTROL.search(value):
        raise CommandRejected(f"argument {key!r} contains a control character")
    if value.startswith("-") and not schema.get("allow_dash", False):
        raise CommandRejected(f"argument {key!r} starts with '-' (it would be read as an "
                              "option)")
    if "enum" in schema:
        if value not in schema["enum"]:
            raise CommandRejected(f"argument {key!r} must be one of "
                                  f"{', '.join(schema['enum'])}")
    elif not re.fullmatch(schema["pattern"], value):
        raise CommandRejected(f"argument {key!r} does not match the pattern of {name!r}")

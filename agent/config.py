"""The agent's configuration: YAML in, frozen dataclasses out, every value checked.

Rules:

* Strict: an unknown key, a wrong type or an out-of-range value is a
  :class:`ConfigError` naming the dotted key path (``server.url``); nothing is
  guessed or silently ignored.
* Relative paths are resolved against the directory of the config file, so a
  config means the same thing whatever the working directory.
* The token is not read here: ``cli.load_config(check_files=True)`` reads it
  once to check it (``auth.read_token``), and the transport reads it again on
  every connect, so provisioning can rotate it. ``check_state_dir`` checks
  that ``state_dir`` can be written.
* The allow-list's rules and its entry type live in ``commands.py``, which
  imports nothing from here.

``config/agent.example.yaml`` documents every key; keep it in step with ``_SPEC``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from .commands import CommandSpec, parse_allow_list
from .errors import ConfigError
from .inputs import check_sections

MAX_CONFIG_CHARS = 1 << 20  # a real config is a few KB
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class ServerConfig:
    url: str
    token_file: Optional[str] = None
    auth: str = "header"
    ca_file: Optional[str] = None
    proxy: Optional[str] = None  # http://host:port; absent: https_proxy/http_proxy/no_proxy
    proxy_auth_file: Optional[str] = None  # "user:password", mode 0600; read at each connect
    client_cert: Optional[str] = None  # PEM; with client_key, mTLS (a token is then optional)
    client_key: Optional[str] = None  # PEM, mode 0600 (checked at each connect)
    client_key_passphrase_file: Optional[str] = None  # one line, mode 0600
    connect_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 10.0
    ack_timeout_s: float = 30.0
    ack_window: int = 16
    max_messages_per_minute: int = 90


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    max_bytes: int = 50_000_000
    durability: str = "normal"  # or "full": see agent/outbox.py and docs/design.md
    sync_interval_s: float = 10.0
    lock: str = "exclusive"  # or "shared": other processes may read outbox.db meanwhile


@dataclass(frozen=True)
class ReconnectConfig:
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0


@dataclass(frozen=True)
class CommandsConfig:
    allow: Mapping[str, CommandSpec] = field(default_factory=dict)
    max_concurrent: int = 2
    max_queued: int = 16
    max_output_bytes: int = 65536


@dataclass(frozen=True)
class Config:
    device_id: str
    state_dir: str
    server: ServerConfig
    telemetry: TelemetryConfig = TelemetryConfig()
    queue: QueueConfig = QueueConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    commands: CommandsConfig = CommandsConfig()
    log_level: str = "info"
    source: str = ""  # the file it was loaded from
    # The top-level ``inputs`` mapping: "inputs.<kind>" -> that input's checked section,
    # checked by its own module (``inputs.check_sections``); empty: today's inputs only.
    inputs: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks

Check = Callable[[Any, str], Any]


def _kind(*kinds: type) -> Check:
    def check(value: Any, key: str) -> Any:
        if isinstance(value, bool) and bool not in kinds:  # YAML yes/no is not a number
            raise ConfigError(key, f"must be {_names(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(key, f"must be {_names(kinds)}, not {type(value).__name__}")
        return float(value) if float in kinds and isinstance(value, (int, float)) else value
    return check


def _names(kinds: Tuple[type, ...]) -> str:
    return " or ".join({str: "a string", int: "an integer", float: "a number",
                        dict: "a mapping", list: "a list", bool: "a boolean"}[k]
                       for k in kinds if k is not int or float not in kinds)


def _number(low: float, high: float, integer: bool = False) -> Check:
    base = _kind(int) if integer else _kind(int, float)

    def check(value: Any, key: str) -> Any:
        value = base(value, key)
        if not low <= value <= high:
            raise ConfigError(key, f"must be between {low:g} and {high:g}, not {value:g}")
        return value
    return check


def _choice(*options: str) -> Check:
    def check(value: Any, key: str) -> Any:
        if value not in options:
            raise ConfigError(key, f"must be one of {', '.join(options)}, not {value!r}")
        return value
    return check


def _device_id(value: Any, key: str) -> str:
    value = _kind(str)(value, key)
    if not DEVICE_ID.fullmatch(value):  # match() would take a final newline
        raise ConfigError(key, "must be 1 to 128 letters, digits or . _ : - "
                          "(starting with a letter or digit)")
    return str(value)


def _url(value: Any, key: str) -> str:
    value = _kind(str)(value, key)
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(key, f"must be a ws:// or wss:// URL, not {parts.scheme or value!r}")
    if not parts.hostname:
        raise ConfigError(key, "has no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(key, "must not carry a query, fragment or credentials "
                          "(the token goes in server.token_file)")
    return str(value)


def _proxy(value: Any, key: str) -> str:
    """An HTTP proxy for CONNECT: http://host:port, nothing else (credentials go in a file:
    a URL is logged, on reload for one)."""
    value = _kind(str)(value, key)
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise ConfigError(key, "must be an http:// URL (an HTTP proxy that allows CONNECT), "
                          f"not {parts.scheme + '://' if parts.scheme else repr(value)}")
    if parts.username or parts.password:
        raise ConfigError(key, "must not carry credentials: put user:password in "
                          "server.proxy_auth_file")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, "has a port that is not a number from 1 to 65535") from None
    if not parts.hostname or not port:
        raise ConfigError(key, "must name a host and a port, e.g. http://proxy.example:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, "must be only http://host:port")
    return str(value)


def _check_client_cert(server: Dict[str, Any]) -> None:
    """A client certificate (mTLS): a wss:// URL, a cert and a key together, the key (and
    its passphrase file) 0600 like a token. Files are checked again at every connect."""
    keys = ("client_cert", "client_key", "client_key_passphrase_file")
    given = [key for key in keys if key in server]
    if not given:
        return
    if not server["url"].startswith("wss://"):
        raise ConfigError(f"server.{given[0]}", "only applies to a wss:// server.url")
    for key in ("client_cert", "client_key"):
        if key not in server:
            raise ConfigError(f"server.{key}", "is required with a client certificate "
                              f"(server.{given[0]} is set)")
    if not os.access(server["client_cert"], os.R_OK):
        raise ConfigError("server.client_cert", f"cannot read {server['client_cert']}")


_SPEC: Dict[str, Dict[str, Tuple[Check, bool]]] = {
    # section -> key -> (check, required)
    "": {"device_id": (_device_id, True), "state_dir": (_kind(str), True),
         "log_level": (_choice("debug", "info", "warning", "error"), False)},
    "server": {
        "url": (_url, True), "token_file": (_kind(str), False), "ca_file": (_kind(str), False),
        "auth": (_choice("header", "query"), False),
        "proxy": (_proxy, False), "proxy_auth_file": (_kind(str), False),
        "client_cert": (_kind(str), False), "client_key": (_kind(str), False),
        "client_key_passphrase_file": (_kind(str), False),
        "connect_timeout_s": (_number(0.1, 300), False),
        "ping_interval_s": (_number(0.1, 3600), False),
        "ping_timeout_s": (_number(0.1, 600), False),
        "ack_timeout_s": (_number(0.5, 3600), False),
        "ack_window": (_number(1, 1000, integer=True), False),
        "max_messages_per_minute": (_number(2, 10_000_000, integer=True), False),
    },
    "telemetry": {"interval_s": (_number(0.05, 86400), False)},
    "queue": {"max_bytes": (_number(65536, 10**12, integer=True), False),
              "durability": (_choice("normal", "full"), False),
              "sync_interval_s": (_number(0.01, 300), False),
              "lock": (_choice("exclusive", "shared"), False)},
    "reconnect": {"base_delay_s": (_number(0.01, 3600), False),
                  "max_delay_s": (_number(0.1, 86400), False)},
    "inputs": {},  # passed as it is to inputs.check_sections: each kind checks its own
    "commands": {"allow": (_kind(dict), False),
                 "max_concurrent": (_number(1, 64, integer=True), False),
                 "max_queued": (_number(0, 1000, integer=True), False),
                 # a result must fit in one message (protocol.MAX_MESSAGE_BYTES)
                 "max_output_bytes": (_number(1024, 65536, integer=True), False)},
}


def _section(raw: Any, name: str) -> Dict[str, Any]:
    spec = _SPEC[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(name or "(top level)", "must be a mapping")
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{name}.{key}" if name else str(key)
        if name == "" and key in _SPEC:
            continue  # a section, checked on its own
        if key not in spec:
            known = ", ".join(sorted(k for k in spec) + ([] if name else sorted(
                k for k in _SPEC if k)))
            raise ConfigError(path, f"unknown key (known keys: {known})")
        check, _ = spec[key]
        out[key] = check(value, path)
    for key, (_, required) in spec.items():
        if required and key not in out:
            raise ConfigError(f"{name}.{key}" if name else key, "is required")
    return out


def changes(old: Config, new: Config) -> List[str]:
    """``key.path: old -> new`` for every setting that differs (for the reload log line)."""
    def flat(value: Any, prefix: str) -> Dict[str, Any]:
        if is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        if isinstance(value, Mapping):
            out: Dict[str, Any] = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
            return out
        return {prefix: value}

    a, b = flat(old, ""), flat(new, "")
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and key != "source"]


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def build(raw: Any, source: str = "") -> Config:
    """A checked Config from parsed YAML; ``source`` anchors relative paths."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "the config must be a YAML mapping")
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    top = _section(raw, "")
    server = _section(raw.get("server"), "server") if "server" in raw else None
    if server is None:
        raise ConfigError("server", "is required")
    for key in ("token_file", "ca_file", "proxy_auth_file", "client_cert", "client_key",
                "client_key_passphrase_file"):
        if key in server:
            server[key] = _resolve(server[key], base_dir)
    _check_client_cert(server)
    if "ca_file" in server:
        if not server["url"].startswith("wss://"):
            raise ConfigError("server.ca_file", "only applies to a wss:// server.url")
        if not os.access(server["ca_file"], os.R_OK):
            raise ConfigError("server.ca_file", f"cannot read {server['ca_file']}")
    reconnect = ReconnectConfig(**_section(raw.get("reconnect"), "reconnect"))
    if reconnect.base_delay_s > reconnect.max_delay_s:
        raise ConfigError("reconnect.base_delay_s", "must not exceed reconnect.max_delay_s")
    commands_raw = _section(raw.get("commands"), "commands")
    allow = parse_allow_list(commands_raw.pop("allow", {}), "commands.allow")
    return Config(
        device_id=top["device_id"],
        state_dir=_resolve(top["state_dir"], base_dir),
        server=ServerConfig(**server),
        telemetry=TelemetryConfig(**_section(raw.get("telemetry"), "telemetry")),
        queue=QueueConfig(**_section(raw.get("queue"), "queue")),
        reconnect=reconnect,
        commands=CommandsConfig(allow=allow, **commands_raw),
        log_level=top.get("log_level", "info"),
        source=source,
        inputs=check_sections(raw.get("inputs"), base_dir),
    )


def pace_warning(cfg: Config) -> Optional[str]:
    """A warning when the sample rate leaves too little of the message budget to drain a
    backlog with single messages (None when an outage drains at least as fast as it grew)."""
    live = 60.0 / cfg.telemetry.interval_s  # messages a minute for live samples alone
    budget = cfg.server.max_messages_per_minute
    spare = budget - live
    if spare >= live:
        return None
    if spare <= 0:
        drain = "so a backlog never drains and the queue only grows"
    else:
        drain = (f"so a backlog drains at {spare:.0f} messages a minute: a day offline takes "
                 f"{24 * live / spare:.0f} hours to arrive")
    return (f"telemetry.interval_s {cfg.telemetry.interval_s:g} makes {live:.0f} messages a "
            f"minute against server.max_messages_per_minute {budget}, {drain} with single "
            "messages. A server that offers telemetry.batch (nexus-server does) takes the "
            "backlog in batches instead, in minutes; or sample less often.")


def check_state_dir(state_dir: str) -> None:
    """ConfigError unless this user can create or write ``state_dir`` and its queue files."""
    probe = state_dir
    while not os.path.exists(probe):  # it will be created: the nearest existing parent counts
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError("state_dir", f"{probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("state_dir", f"{probe} is not writable by this user (uid "
                          f"{os.geteuid()})")
    for name in ("outbox.db", "commands.db"):
        path = os.path.join(state_dir, name)
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError("state_dir", f"{path} is not readable and writable by this user")


def load(path: str) -> Config:
    """Read, parse and check the config file at ``path``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_CHARS + 1)  # never a whole runaway file into memory
    except OSError as exc:
        raise ConfigError(path, f"cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "the config file is not UTF-8 text") from None
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigError(path, f"the config file is larger than {MAX_CONFIG_CHARS} characters; "
                          "is it the right file?")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, f"not valid YAML{where}") from None
    return build(raw, path)

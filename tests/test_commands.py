"""The allow-list: config-time errors name the entry; requests resolve to argv or a reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.commands import parse_allow_list, resolve
from agent.errors import CommandRejected, ConfigError

ALLOW = {
    "restart-app": {"argv": ["/usr/bin/systemctl", "restart", "nexus-app.service"],
                    "timeout_s": 30},
    "set-log-level": {"argv": ["/usr/local/bin/app-ctl", "log-level", "{level}"],
                      "args": {"level": {"enum": ["debug", "info", "warning", "error"]}}},
    "ping-host": {"argv": ["/bin/ping", "-c", "3", "{host}"],
                  "args": {"host": {"pattern": "^[a-z0-9.-]{1,253}$"}}},
}


@pytest.fixture
def allow():
    return parse_allow_list(ALLOW, "commands.allow")


def test_allowed_commands_resolve_to_whole_argv_items(allow):
    assert resolve(allow, "restart-app", {})[1] == ["/usr/bin/systemctl", "restart",
                                                    "nexus-app.service"]
    spec, argv = resolve(allow, "ping-host", {"host": "gw.local"})
    assert argv == ["/bin/ping", "-c", "3", "gw.local"] and spec.timeout_s == 30.0


@pytest.mark.parametrize("name, args, reason", [
    ("rm-rf", {}, "not on this device's allow-list"),
    ("restart-app", {"unit": "x"}, "not declared"),
    ("set-log-level", {}, "is required"),
    ("set-log-level", {"level": "verbose"}, "must be one of"),
    ("ping-host", {"host": "gw; rm -rf /"}, "does not match"),
    ("ping-host", {"host": "$(reboot)"}, "does not match"),
    ("ping-host", {"host": "a|b"}, "does not match"),
    ("ping-host", {"host": "-f"}, "starts with '-'"),
    ("ping-host", {"host": "a\nb"}, "control character"),
    ("ping-host", {"host": "a" * 300}, "max_length"),
])
def test_rejections_say_why(allow, name, args, reason):
    with pytest.raises(CommandRejected) as info:
        resolve(allow, name, args)
    assert reason in info.value.reason


@pytest.mark.parametrize("entry, key, words", [
    ({"argv": ["systemctl", "restart"]}, "commands.allow.x.argv[0]", "absolute path"),
    ({"argv": []}, "commands.allow.x.argv", "non-empty"),
    ({"argv": ["/bin/ping", 3]}, "commands.allow.x.argv[1]", "must be a string"),
    ({"argv": ["/bin/echo", "pre-{v}"], "args": {"v": {"enum": ["a"]}}},
     "commands.allow.x.argv[1]", "whole argv item"),
    ({"argv": ["/bin/echo", "{v}"]}, "commands.allow.x.argv", "does not declare"),
    ({"argv": ["/bin/echo"], "args": {"v": {"enum": ["a"]}}}, "commands.allow.x.args.v",
     "not used"),
    ({"argv": ["/bin/echo", "{v}"], "args": {"v": {"pattern": "("}}},
     "commands.allow.x.args.v.pattern", "regular expression"),
    ({"argv": ["/bin/echo", "{v}"], "args": {"v": {"enum": ["a"], "pattern": "a"}}},
     "commands.allow.x.args.v", "exactly one"),
    ({"argv": ["/bin/echo"], "timeout_s": 0}, "commands.allow.x.timeout_s", "between"),
    ({"argv": ["/bin/echo"], "shell": True}, "commands.allow.x.shell", "unknown key"),
    ({"argv": ["/bin/echo"], "run_as": "no-such-user-here"}, "commands.allow.x.run_as",
     "no such user"),
])
def test_config_errors_name_the_entry(entry, key, words):
    with pytest.raises(ConfigError) as info:
        parse_allow_list({"x": entry}, "commands.allow")
    assert info.value.key == key
    assert words in info.value.reason


def test_no_shell_true_anywhere_in_agent():
    root = Path(__file__).resolve().parent.parent / "agent"
    hits = [f"{path}:{n}" for path in root.rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"shell\s*=\s*True", line)]
    assert hits == []

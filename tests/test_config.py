"""Config loading: every bad input names its key path; nexus-agent --check-config exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import REPO, child_env, mint, write_config

from agent import config
from agent.errors import ConfigError


def load_with(tmp_path, **changes):
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(raw))
    return config.load(str(path))


DELETE = object()


def test_example_and_local_configs_are_valid():
    for name in ("agent.example.yaml", "agent.local.yaml"):
        cfg = config.load(str(REPO / "config" / name))
        assert cfg.device_id and cfg.server.url.startswith("ws")


def test_the_examples_commented_inputs_section_is_valid_when_uncommented(tmp_path):
    import yaml

    text = (REPO / "config" / "agent.example.yaml").read_text()
    block = text[text.index("# inputs:"):]
    raw = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:]
                                   for line in block.splitlines()))
    cfg = config.build({"device_id": "d", "state_dir": str(tmp_path),
                        "server": {"url": "ws://127.0.0.1:9/v1/ws"}, **raw})
    assert cfg.inputs["inputs.socket"].mode == 0o660
    assert cfg.inputs["inputs.exec"][0].name == "line3"


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "agent.yaml"
    path.write_text("device_id: d1\nstate_dir: ../state\nserver: {url: 'ws://h:1/v1/ws', "
                    "token_file: tok}\n")
    cfg = config.load(str(path))
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.server.token_file == str(tmp_path / "conf" / "tok")
    assert (cfg.server.auth, cfg.telemetry.interval_s, cfg.queue.max_bytes) == ("header", 5.0,
                                                                                50_000_000)
    assert (cfg.reconnect.base_delay_s, cfg.reconnect.max_delay_s) == (1.0, 60.0)


@pytest.mark.parametrize("changes, key, words", [
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"server__tokenfile": "x"}, "server.tokenfile", "unknown key"),
    ({"device_id": DELETE}, "device_id", "required"),
    ({"device_id": "bad id!"}, "device_id", "letters"),
    ({"server__url": "http://x/v1/ws"}, "server.url", "ws:// or wss://"),
    ({"server__url": "ws://x/v1/ws?token=abc"}, "server.url", "query"),
    ({"server__auth": "cookie"}, "server.auth", "header, query"),
    ({"telemetry__interval_s": "fast"}, "telemetry.interval_s", "a number"),
    ({"telemetry__interval_s": True}, "telemetry.interval_s", "boolean"),
    ({"telemetry__interval_s": 0}, "telemetry.interval_s", "between"),
    ({"queue__max_bytes": 1.5}, "queue.max_bytes", "an integer"),
    ({"queue__max_bytes": 10}, "queue.max_bytes", "between"),
    ({"reconnect__base_delay_s": 100, "reconnect__max_delay_s": 10}, "reconnect.base_delay_s",
     "must not exceed"),
    ({"telemetry": [1, 2]}, "telemetry", "mapping"),
    ({"server__ca_file": "/etc/hostname"}, "server.ca_file", "wss://"),
    ({"server__url": "wss://x/v1/ws", "server__ca_file": "/nonexistent/ca.pem"},
     "server.ca_file", "cannot read"),
])
def test_bad_values_name_the_key(tmp_path, changes, key, words):
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, **changes)
    assert info.value.key == key
    assert words in info.value.reason


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: d1\nserver: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert "line" in str(info.value)


def run_check(path, env=None):
    return subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config",
                           str(path)], env=env or child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=30)


def test_check_config_ok_and_one_line_errors(tmp_path):
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    ok = run_check(path)
    assert ok.returncode == 0, ok.stderr
    path.write_text(path.read_text().replace("interval_s: 0.2", "interval_s: -1"))
    bad = run_check(path)
    assert bad.returncode == 78
    assert bad.stderr.strip().count("\n") == 0
    assert "telemetry.interval_s" in bad.stderr


def test_token_file_permissions_and_presence(tmp_path):
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    token = tmp_path / "token"
    token.chmod(0o644)
    out = run_check(path)
    assert out.returncode == 78 and "chmod 600" in out.stderr and str(token) in out.stderr
    token.unlink()
    out = run_check(path)
    assert out.returncode == 78 and "No such file" in out.stderr
    assert "eyJ" not in out.stderr


def test_token_from_environment_when_no_file(tmp_path):
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws")
    raw = yaml.safe_load(path.read_text())
    del raw["server"]["token_file"]
    path.write_text(yaml.safe_dump(raw))
    env = child_env()
    env.pop("NEXUS_TOKEN", None)
    assert "NEXUS_TOKEN" in run_check(path, env).stderr
    env["NEXUS_TOKEN"] = "abc.def.ghi"
    out = run_check(path, env)
    assert out.returncode == 78 and "NEXUS_TOKEN: the token is not a JWT" in out.stderr
    env["NEXUS_TOKEN"] = mint("device-001")
    assert run_check(path, env).returncode == 0


@pytest.mark.parametrize("token, words", [
    ("garbage", "is not a JWT"),
    (None, "expired at"),
    ("other", "is for sub 'gw-other', not device_id 'device-001'"),
])
def test_check_config_checks_what_the_token_claims(tmp_path, token, words):
    """Not a JWT, expired, or another device's: each named, exit 78, the token not shown."""
    text = {"garbage": "garbage", None: mint("device-001", ttl=-60),
            "other": mint("gw-other")}[token]
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", token=text)
    out = run_check(path)
    assert out.returncode == 78 and words in out.stderr, out.stderr
    assert f"token file {tmp_path / 'token'}" in out.stderr
    assert text not in out.stderr


@pytest.mark.parametrize("proxy, words", [
    ("https://proxy.example:3128", "must be an http:// URL"),
    ("http://user:pw@proxy.example:3128", "must not carry credentials"),
    ("http://proxy.example", "must name a host and a port"),
    ("http://proxy.example:99999", "port that is not a number"),
    ("http://proxy.example:3128/path", "must be only http://host:port"),
    (3128, "must be a string"),
])
def test_bad_proxy_names_the_key(tmp_path, proxy, words):
    path = write_config(tmp_path, "ws://127.0.0.1:1/v1/ws", server={"proxy": proxy})
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert info.value.key == "server.proxy" and words in info.value.reason
    assert "pw" not in str(info.value)


def test_proxy_and_its_auth_file(tmp_path):
    path = write_config(tmp_path, "wss://nexus.example/v1/ws",
                        server={"proxy": "http://proxy.example:3128",
                                "proxy_auth_file": "proxy-auth"})
    cfg = config.load(str(path))
    assert cfg.server.proxy == "http://proxy.example:3128"
    assert cfg.server.proxy_auth_file == str(tmp_path / "proxy-auth")
    out = run_check(path)  # the credentials file is checked like the token file
    assert out.returncode == 78 and "proxy auth file" in out.stderr and "No such file" in \
        out.stderr
    auth = tmp_path / "proxy-auth"
    auth.write_text("agent:s3cret-pw\n")
    auth.chmod(0o644)
    out = run_check(path)
    assert out.returncode == 78 and "chmod 600" in out.stderr
    auth.chmod(0o600)
    out = run_check(path)
    assert out.returncode == 0, out.stderr
    assert "s3cret-pw" not in out.stdout + out.stderr
    auth.write_text("no colon here\n")
    out = run_check(path)
    assert out.returncode == 78 and "user:password" in out.stderr


@pytest.mark.parametrize("argv", [["status", "-h"], ["provision", "-h"], ["privileges", "-h"],
                                  ["-h"]])
def test_help_texts_read_as_text(argv):
    """No RST double backticks, no internal module names (statusfile.py) in --help."""
    out = subprocess.run([sys.executable, "-m", "agent", *argv], env=child_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage:")
    assert "``" not in out.stdout and ".py" not in out.stdout, out.stdout

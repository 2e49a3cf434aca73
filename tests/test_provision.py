"""nexus-agent provision: atomic 0600 files, idempotent, a distinct exit code per failure."""

from __future__ import annotations

import functools
import stat
import subprocess
import sys

import pytest
from helpers import REPO, ServerProcess, child_env, free_port, mint

from agent import config
from agent.provision import owners


def provision(tmp_path, server, *extra, token=None, device="gw-0042"):
    src = tmp_path / "incoming.token"
    src.write_text((token or mint(device)) + "\n")
    src.chmod(0o600)
    out = subprocess.run([sys.executable, "-m", "agent", "provision", "--device-id", device,
                          "--server", server, "--token-file", str(src),
                          "--config", str(tmp_path / "etc" / "agent.yaml"),
                          "--state-dir", str(tmp_path / "state"), *extra],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess()
    yield srv
    srv.stop()


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_twice_gives_identical_0600_files(tmp_path, server):
    token = mint("gw-0042")
    assert provision(tmp_path, server.url, token=token) == (0, "")
    etc = tmp_path / "etc"
    first = {p.name: p.read_bytes() for p in etc.iterdir()}
    assert set(first) == {"agent.yaml", "token"}
    # 0640 root:nexus-agent when root runs it where the service user exists (a package)
    assert mode(etc / "agent.yaml") == (0o600 if owners()[1] is None else 0o640)
    assert mode(etc / "token") == 0o600
    assert provision(tmp_path, server.url, token=token) == (0, "")
    assert {p.name: p.read_bytes() for p in etc.iterdir()} == first
    cfg = config.load(str(etc / "agent.yaml"))
    assert (cfg.device_id, cfg.server.url, cfg.server.token_file) == (
        "gw-0042", server.url, str(etc / "token"))


def test_conflicting_config_is_refused_unless_forced(tmp_path, server):
    assert provision(tmp_path, server.url)[0] == 0
    before = (tmp_path / "etc" / "agent.yaml").read_text()
    code, err = provision(tmp_path, server.url, device="gw-9999", token=mint("gw-9999"))
    assert code == 3 and "--force" in err
    assert (tmp_path / "etc" / "agent.yaml").read_text() == before
    code, _ = provision(tmp_path, server.url, "--force", device="gw-9999",
                        token=mint("gw-9999"))
    assert code == 0 and "gw-9999" in (tmp_path / "etc" / "agent.yaml").read_text()


@pytest.mark.parametrize("device, url, code, words", [
    ("bad id!", None, 2, "--device-id"),
    ("gw-1", "http://example/v1/ws", 2, "--server"),
])
def test_bad_input_is_exit_2(tmp_path, server, device, url, code, words):
    got, err = provision(tmp_path, url or server.url, device=device)
    assert got == code and words in err
    assert not (tmp_path / "etc").exists()


def test_unreachable_server_is_exit_4(tmp_path):
    code, err = provision(tmp_path, f"ws://127.0.0.1:{free_port()}/v1/ws")
    assert code == 4 and "cannot reach" in err
    assert not (tmp_path / "etc" / "agent.yaml").exists()


def test_refused_token_is_exit_5(tmp_path, server):
    code, err = provision(tmp_path, server.url, token="not.a.token")
    assert code == 5 and "refused" in err
    assert "not.a.token" not in err


def test_unwritable_destination_is_exit_6(tmp_path, server):
    (tmp_path / "etc").write_text("a file where the directory should be")
    code, err = provision(tmp_path, server.url)
    assert code == 6, err
    assert "Not a directory" in err or "cannot write" in err


def test_the_packaged_example_is_replaced_without_force(tmp_path, server):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.yaml").write_text((REPO / "config" / "agent.example.yaml").read_text())
    code, err = provision(tmp_path, server.url, "--no-check")
    assert (code, err) == (0, "")
    assert config.load(str(etc / "agent.yaml")).device_id == "gw-0042"
    # an edited example is someone's config: refused as before
    (etc / "agent.yaml").write_text((REPO / "config" / "agent.example.yaml").read_text()
                                    + "# edited\n")
    code, err = provision(tmp_path, server.url, "--no-check")
    assert code == 3 and "--force" in err


def test_commands_file_writes_an_allow_list(tmp_path, server):
    allow = tmp_path / "commands.yaml"
    allow.write_text("allow:\n  uptime:\n    argv: [/usr/bin/uptime]\n    timeout_s: 5\n"
                     "max_concurrent: 1\n")
    code, err = provision(tmp_path, server.url, "--no-check", "--commands", str(allow))
    assert (code, err) == (0, "")
    cfg = config.load(str(tmp_path / "etc" / "agent.yaml"))
    assert list(cfg.commands.allow) == ["uptime"]
    assert cfg.commands.allow["uptime"].argv == ("/usr/bin/uptime",)
    assert cfg.commands.max_concurrent == 1
    # the same input again changes nothing (the YAML is written deterministically)
    before = (tmp_path / "etc" / "agent.yaml").read_bytes()
    assert provision(tmp_path, server.url, "--no-check", "--commands", str(allow)) == (0, "")
    assert (tmp_path / "etc" / "agent.yaml").read_bytes() == before


def test_bad_commands_file_is_exit_2_naming_the_key(tmp_path, server):
    allow = tmp_path / "commands.yaml"
    allow.write_text("allow:\n  uptime:\n    argv: uptime\n")
    code, err = provision(tmp_path, server.url, "--no-check", "--commands", str(allow))
    assert code == 2 and "--commands: commands.allow.uptime" in err, err
    assert not (tmp_path / "etc" / "agent.yaml").exists()


def test_a_client_certificate_and_a_key_that_do_not_match_are_refused_before_writing(
        tmp_path):
    # --no-check skips the server, not the files: a pair that cannot make a TLS handshake
    # is known locally (ssl.load_cert_chain) and must not be written.
    import shutil as _shutil

    if _shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "k1.pem"), "-out", str(tmp_path / "c1.pem"),
         "-days", "2", "-subj", "/CN=gw-1"])
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(tmp_path / "k2.pem")])
    (tmp_path / "k2.pem").chmod(0o600)
    out = subprocess.run([sys.executable, "-m", "agent", "provision", "--device-id", "gw-1",
                          "--server", "wss://127.0.0.1:1/", "--client-cert",
                          str(tmp_path / "c1.pem"), "--client-key", str(tmp_path / "k2.pem"),
                          "--config", str(tmp_path / "etc" / "agent.yaml"), "--state-dir",
                          str(tmp_path / "state"), "--no-check"], env=child_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stderr
    assert "--client-key" in out.stderr
    assert not (tmp_path / "etc" / "agent.yaml").exists()

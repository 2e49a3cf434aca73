"""nexus-agent provision: atomic 0600 files, idempotent, a distinct exit code per failure."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from helpers import REPO, ServerProcess, child_env, free_port, mint

from agent import config


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
    assert mode(etc / "agent.yaml") == mode(etc / "token") == 0o600
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

"""make install into a DESTDIR lays out the files; the unit stays hardened."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    dest = tmp_path_factory.mktemp("destdir")
    out = subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/usr",
                          f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return dest


def test_layout(installed):
    expected = ["usr/bin/nexus-agent", "usr/bin/nexus-ctl",
                "usr/lib/nexus-agent/agent/__main__.py", "usr/lib/nexus-agent/agent/outbox.py",
                "usr/lib/systemd/system/nexus-agent.service",
                "usr/lib/sysusers.d/nexus-agent.conf", "etc/nexus/agent.example.yaml",
                "usr/share/nexus-agent/50-nexus-agent.rules.example",
                "usr/share/doc/nexus-agent/deploy.md", "usr/share/doc/nexus-agent/protocol.md"]
    for rel in expected:
        assert (installed / rel).is_file(), rel
    wrapper = installed / "usr/bin/nexus-agent"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert 'sys.path.insert(0, "/usr/lib/nexus-agent")' in wrapper.read_text()
    unit = (installed / "usr/lib/systemd/system/nexus-agent.service").read_text()
    assert "ExecStart=/usr/bin/nexus-agent --config /etc/nexus/agent.yaml" in unit
    # the status file goes to $RUNTIME_DIRECTORY (a tmpfs), not the SD card
    assert "\nRuntimeDirectory=nexus-agent\n" in unit
    rule = (installed / "usr/share/nexus-agent/50-nexus-agent.rules.example").read_text()
    assert 'unit === "nexus-app.service" && verb === "restart"' in rule


def test_installed_package_runs_from_its_private_lib(installed):
    lib = installed / "usr/lib/nexus-agent"
    out = subprocess.run([sys.executable, "-I", "-c",
                          f"import sys; sys.path.insert(0, {str(lib)!r}); "
                          "from agent.__main__ import main; "
                          f"sys.exit(main(['--check-config', '--config', "
                          f"{str(installed / 'etc/nexus/agent.example.yaml')!r}]))"],
                         capture_output=True, text=True, timeout=30)
    # the example points at /etc/nexus/token, which does not exist here: a clean config error
    assert out.returncode == 78 and "token file /etc/nexus/token" in out.stderr


def test_uninstall_removes_what_install_put(installed, tmp_path):
    before = sorted(p for p in installed.rglob("*") if p.is_file())
    assert before
    subprocess.run(["make", "-s", "uninstall", f"DESTDIR={installed}", "PREFIX=/usr"],
                   cwd=REPO, check=True, timeout=60)
    assert sorted(p for p in installed.rglob("*") if p.is_file()) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_unit_exposure_is_at_most_2():
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                          str(REPO / "systemd" / "nexus-agent.service")],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {out.stderr[:200]}")
    assert float(match.group(1)) <= 2.0, out.stdout[-3000:]

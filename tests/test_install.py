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
                "usr/lib/sysusers.d/nexus-agent.conf", "usr/lib/tmpfiles.d/nexus-agent.conf",
                "etc/nexus/agent.example.yaml", "usr/share/nexus-agent/agent.example.yaml",
                "usr/share/nexus-agent/50-nexus-agent.rules.example",
                "usr/share/doc/nexus-agent/deploy.md", "usr/share/doc/nexus-agent/protocol.md",
                "usr/share/man/man1/nexus-agent.1", "usr/share/man/man1/nexus-ctl.1"]
    for rel in expected:
        assert (installed / rel).is_file(), rel
    wrapper = installed / "usr/bin/nexus-agent"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert 'sys.path.insert(0, "/usr/lib/nexus-agent")' in wrapper.read_text()
    unit = (installed / "usr/lib/systemd/system/nexus-agent.service").read_text()
    assert "ExecStart=/usr/bin/nexus-agent --config /etc/nexus/agent.yaml" in unit
    # the status file goes to $RUNTIME_DIRECTORY (a tmpfs), not the SD card
    assert "\nRuntimeDirectory=nexus-agent\n" in unit
    # enabled by a package before provisioning: skipped, not failed, until a token or a
    # client key (provision --client-key) exists
    assert "\nConditionPathExists=|/etc/nexus/token\n" in unit
    assert "\nConditionPathExists=|/etc/nexus/device.key\n" in unit
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


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_make_deb_builds_the_package(tmp_path):
    out = subprocess.run(["make", "-s", "deb", f"PYTHON={sys.executable}",
                          "DEB_VERSION=0.0.1+test"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    deb = REPO / out.stdout.strip().splitlines()[-1]
    try:
        assert deb.name == "nexus-agent_0.0.1+test_all.deb"
        info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True,
                              check=True).stdout
        depends = re.search(r"^Depends: (.*)$", info, re.M)
        assert depends is not None
        for dep in ("python3 (>= 3.9)", "python3-websocket", "python3-psutil", "python3-yaml"):
            assert dep in depends.group(1)
        files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                               check=True).stdout
        assert "./etc/nexus/agent.yaml" in files and "./usr/lib/tmpfiles.d/nexus-agent.conf" \
            in files
        assert ".pyc" not in files  # compiled by postinst on the device's own python3
        control = tmp_path / "control"
        subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
        assert (control / "conffiles").read_text() == "/etc/nexus/agent.yaml\n"
        for script in ("postinst", "prerm", "postrm"):
            assert subprocess.run(["sh", "-n", str(control / script)]).returncode == 0
        if shutil.which("lintian"):
            lint = subprocess.run(["lintian", str(deb)], capture_output=True, text=True,
                                  timeout=120)
            assert not re.search(r"^E: ", lint.stdout, re.M), lint.stdout
    finally:
        deb.unlink()

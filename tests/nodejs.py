"""Node.js for the interop tests: the guide's own JavaScript, run for real.

Skips (with the reason) where node or npm is missing or the npm registry cannot be
reached; the packages are installed once per session in a temporary folder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INTEROP = Path(__file__).resolve().parent / "interop"


def node_modules(tmp_root: Path) -> Path:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js and npm are not installed: the guide's JavaScript cannot run")
    out = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                          "--prefix", str(tmp_root), "ws@8", "jsonwebtoken@9"],
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        pytest.skip(f"npm could not install ws and jsonwebtoken: {out.stderr.strip()[:300]}")
    return tmp_root / "node_modules"

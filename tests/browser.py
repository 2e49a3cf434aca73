"""Headless Chromium for the fleet page's tests, driven over the DevTools protocol.

No selenium or playwright: Chromium's own ``--remote-debugging-port`` speaks JSON over a
WebSocket, and websocket-client (a dependency of the agent) is enough to send
``Page.navigate``, ``Runtime.evaluate`` and ``Page.captureScreenshot``. Skips with the
reason where no Chromium binary exists (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import websocket
from helpers import CHILDREN, terminate, wait_for

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_binary() -> str:
    """The browser to run ($CHROMIUM, else the first of NAMES on PATH); skips without one."""
    found = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)
    if not found:
        pytest.skip("no Chromium binary (apt-get install chromium; .ci/run does): the fleet "
                    "page cannot be driven in a real browser here")
    return found


class Browser:
    """One headless Chromium process with one page, 1200x800; ``close()`` ends it."""

    def __init__(self, folder: Path, width: int = 1200, height: int = 800) -> None:
        self._stderr = tempfile.NamedTemporaryFile("w+", prefix="chromium-", suffix=".log")
        args = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--user-data-dir={folder}", f"--window-size={width},{height}", "about:blank"]
        # stderr to a file: a pipe nobody reads would block a chatty browser
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._stderr)
        CHILDREN.append(self.proc)
        browser_url = wait_for(self._devtools_url, timeout=30, what="DevTools to listen")
        port = browser_url.split("//", 1)[1].split("/", 1)[0]
        target = wait_for(lambda: self._page_target(port), timeout=10, what="a page target")
        self.ws = websocket.create_connection(target, timeout=30, suppress_origin=True)
        self._next = 0
        self.console: List[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def _devtools_url(self) -> Optional[str]:
        if self.proc.poll() is not None:
            raise AssertionError(f"chromium exited with {self.proc.returncode}: {self.log()}")
        match = LISTENING.search(self.log())
        return match.group(1) if match else None

    @staticmethod
    def _page_target(port: str) -> Optional[str]:
        with urllib.request.urlopen(f"http://{port}/json/list", timeout=5) as answer:
            targets = json.load(answer)
        pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
        return pages[0] if pages else None

    def log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        """Send one DevTools command and return its result; events read meanwhile are kept
        (console messages and exceptions, for failure reports) or dropped."""
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._next:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self._note(msg)

    def _note(self, event: Dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                         for a in params.get("args", [])))
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append("exception: " + str(details.get("exception", {})
                                                    .get("description", details.get("text"))))

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close(timeout=0.5)
        except Exception:  # noqa: BLE001 - closing a browser that may already be gone
            pass
        terminate(self.proc)
        self._stderr.close()

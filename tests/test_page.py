"""The fleet page (agent/server/page.py): static files and their headers, what a bad token gets,
the events channel, and the page itself driven in headless Chromium against a real
nexus-server and a real agent.

``NEXUS_PAGE_SCREENSHOT=docs/fleet-page.png`` makes the browser test save its screenshot
there (the README's picture); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SECRET,
    AgentProcess,
    Peer,
    ServerProcess,
    connected,
    mint,
    wait_for,
    write_config,
)

from agent.server import page, tokens


def get(url: str) -> tuple:
    """(status, headers, body) of a plain HTTP GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def http_base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


# ---------------------------------------------------------------- static files


@pytest.mark.parametrize("path, content_type, needle", [
    ("/", "text/html; charset=utf-8", b'<script src="/app.js"'),
    ("/index.html", "text/html; charset=utf-8", b"<title>Nexus fleet</title>"),
    ("/app.js", "text/javascript; charset=utf-8", b"telemetry.update"),
    ("/style.css", "text/css; charset=utf-8", b"#results"),
    ("/?token=whatever", "text/html; charset=utf-8", b"<!doctype html>"),
])
def test_static_files_are_served_with_strict_headers(server, path, content_type, needle):
    status, headers, body = get(http_base(server) + path)
    assert status == 200
    assert headers["Content-Type"] == content_type
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert int(headers["Content-Length"]) == len(body)
    assert needle in body


@pytest.mark.parametrize("path", ["/favicon.ico", "/static/app.js", "/page.py", "/..%2fpage.py",
                                  "/../page.py", "/%2e%2e/hub.py", "/app.js/", "//app.js",
                                  "/v1", "/v1/ws/"])
def test_anything_else_is_404(server, path):
    status, _, body = get(http_base(server) + path)
    assert status == 404
    assert b"import" not in body and b"<html" not in body


def test_raw_traversal_request_line_is_404(server):
    # urllib normalises nothing here, but a raw request line proves it whatever the client.
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /../../agent/server/page.py HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 404")


def test_a_bad_token_gets_nothing_beyond_the_static_files(server):
    status, _, _ = get(http_base(server) + "/?token=bad")
    assert status == 200  # the page itself holds no data
    peer = Peer(server.url, "bad", header=False)  # /v1/ws?token=bad, as the page sends it
    error = peer.recv()
    assert error["type"] == "error" and error["error"]["code"] == "AUTH_FAILED"
    assert peer.close_code() == 4000


def test_page_url_carries_the_token_in_the_fragment():
    assert page.page_url("ws://127.0.0.1:8765/v1/ws", "T") == "http://127.0.0.1:8765/#token=T"
    assert page.page_url("wss://fleet.example:443/v1/ws", "T") == \
        "https://fleet.example:443/#token=T"


def test_nexus_server_prints_the_page_url_after_the_listening_line():
    # stdout is a pipe here: the token is printed only when asked
    srv = ServerProcess(0, "--print-page-token")  # the first line is unchanged: "listening on"
    assert srv.proc.stdout is not None
    line = srv.proc.stdout.readline().strip()
    prefix = f"page: http://127.0.0.1:{srv.port}/#token="
    assert line.startswith(prefix)
    token = line[len(prefix):]
    identity = tokens.verify(token, SECRET.encode())
    assert (identity.role, identity.subject) == ("operator", "page")
    operator = Peer(srv.url, token)
    assert operator.recv()["type"] == "connected"
    operator.close()
    assert srv.stop() == 0
    assert token not in srv.log()


def test_a_missing_static_folder_is_a_404_that_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(page, "STATIC", tmp_path)
    page._read.cache_clear()
    try:
        answer = page.response("/")
        assert answer is not None and answer.status_code == 404
        assert b"not installed" in answer.body
    finally:
        page._read.cache_clear()


# ---------------------------------------------------------------- events channel


def test_device_online_and_offline_are_broadcast_on_events(server):
    operator = connected(server.url, "page", "operator")
    assert operator.request({"type": "subscribe", "id": "s1",
                             "payload": {"channel": "events"}})["type"] == "subscribed"
    first = connected(server.url, "device-007")
    assert operator.recv_type("events.update")["payload"] == {"event": "device.online",
                                                              "device_id": "device-007"}
    second = connected(server.url, "device-007")  # a reconnect that overtook the first
    assert operator.recv_type("events.update")["payload"]["event"] == "device.online"
    first.close()
    # Still connected through the second: no offline. The ping's answer comes after any.
    assert operator.request({"type": "ping", "id": "p1"})["type"] == "pong"
    second.close()
    assert operator.recv_type("events.update")["payload"] == {"event": "device.offline",
                                                              "device_id": "device-007"}
    connected(server.url, "ops-2", "operator").close()  # operators are not announced
    assert operator.request({"type": "ping", "id": "p2"})["type"] == "pong"


# ---------------------------------------------------------------- the page in a browser


ROW = "document.querySelector('tr[data-device=\"{device}\"]')"


@pytest.fixture
def browser(tmp_path):
    from browser import Browser

    chrome = Browser(tmp_path / "chromium")
    try:
        yield chrome
    finally:
        if chrome.console:
            print("browser console:", *chrome.console, sep="\n  ")
        chrome.close()


def _cell(device: str, field: str) -> str:
    return ROW.format(device=device) + f"?.querySelector('td[data-field=\"{field}\"]')" \
        "?.textContent"


def _result(browser, command_id_index: int) -> dict:
    return browser.eval(
        "(() => { const li = [...document.querySelectorAll('#results li')]"
        f"[{command_id_index}]; return li ? {{status: li.dataset.status, "
        "text: li.textContent, stdout: li.querySelector('pre.stdout')?.textContent, "
        "stderr: li.querySelector('pre.stderr')?.textContent} : {}; })()")


def _run_command(browser, name: str, args: str = "") -> None:
    browser.eval(f"""(() => {{
        document.getElementById('command-name').value = {json.dumps(name)};
        document.getElementById('command-args').value = {json.dumps(args)};
        document.querySelector('#command-form button[type=submit]').click();
    }})()""")


def test_fleet_page_in_headless_chromium(tmp_path, browser):
    srv = ServerProcess(0, "--print-page-token")
    assert srv.proc.stdout is not None
    line = srv.proc.stdout.readline()  # the line after "listening on"
    assert line.startswith("page: http://127.0.0.1:")
    url = line.split("page: ", 1)[1].strip()
    assert "/#token=" in url

    browser.navigate(url)
    wait_for(lambda: browser.eval("document.getElementById('conn')?.dataset.state") == "open",
             timeout=15, what="the page to connect as an operator")
    assert browser.eval("location.hash") == ""  # the token left the address bar

    folder = tmp_path / "agent"
    folder.mkdir()
    agent = AgentProcess(write_config(folder, srv.url, device_id="pi-kitchen",
                                      telemetry={"interval_s": 0.5},
                                      commands={"allow": {"hello": {"argv": ["/bin/echo",
                                                                             "hi"]}}}))
    wait_for(lambda: browser.eval(ROW.format(device="pi-kitchen") + "?.dataset.state")
             == "online", timeout=10, what="the device row to appear online")

    seen = set()

    def values_changed() -> bool:
        seen.add((browser.eval(_cell("pi-kitchen", "cpu")),
                  browser.eval(_cell("pi-kitchen", "mem"))))
        return len({v for v in seen if "%" in v[0]}) >= 2

    wait_for(values_changed, timeout=20, interval=0.2, what=f"CPU or memory to change: {seen}")
    assert browser.eval(_cell("pi-kitchen", "queued")) not in (None, "", "—")
    assert browser.eval(_cell("pi-kitchen", "offset")).endswith(" s")
    wait_for(lambda: browser.eval("document.querySelectorAll('#chart polyline.cpu')[0]"
                                  "?.getAttribute('points')?.split(' ').length") >= 2,
             timeout=10, what="the chart to draw CPU history")

    _run_command(browser, "hello")
    wait_for(lambda: _result(browser, 0).get("status") == "succeeded", timeout=20,
             what=f"the allowed command's result: {_result(browser, 0)}")
    assert _result(browser, 0)["stdout"] == "hi\n" and "exit 0" in _result(browser, 0)["text"]

    _run_command(browser, "rm-everything")
    wait_for(lambda: _result(browser, 0).get("status") == "rejected", timeout=20,
             what=f"the refused command's result: {_result(browser, 0)}")
    assert "allow-list" in _result(browser, 0)["stderr"]

    shot = Path(os.environ.get("NEXUS_PAGE_SCREENSHOT") or tmp_path / "fleet-page.png")
    browser.eval("document.getElementById('results').scrollTop = 0")
    browser.screenshot(shot if shot.is_absolute() else REPO / shot)

    assert agent.stop() == 0
    wait_for(lambda: browser.eval(ROW.format(device="pi-kitchen") + "?.dataset.state")
             == "offline", timeout=10, what="the device to turn offline")
    assert browser.eval(_cell("pi-kitchen", "state")) == "offline"  # and it stays listed
    srv.stop()


def test_page_without_a_token_asks_for_one(server, browser):
    browser.navigate(http_base(server) + "/")
    wait_for(lambda: browser.eval("document.getElementById('login')?.hidden === false"), timeout=15,
             what="the token form")
    browser.eval("document.getElementById('token-input').value = 'not-a-token';"
                 "document.querySelector('#login-form button').click()")
    wait_for(lambda: "refused" in browser.eval("document.getElementById('login-reason')"
                                               ".textContent"), timeout=15,
             what="the bad token to be refused")
    # only the token form shows: not the empty table, chart and command form under it
    assert browser.eval("getComputedStyle(document.getElementById('fleet')).display") == "none"
    # no request for /favicon.ico (a 404 in the console): the page names its own icon
    assert browser.eval("document.querySelector('link[rel=icon]')?.getAttribute('href')") \
        == "data:,"
    good = mint("page", "operator")
    browser.eval(f"document.getElementById('token-input').value = {json.dumps(good)};"
                 "document.querySelector('#login-form button').click()")
    wait_for(lambda: browser.eval("document.getElementById('conn')?.dataset.state") == "open",
             timeout=15, what="the page to connect with the typed token")


def test_command_arguments_are_split_as_a_shell_does(server, browser):
    browser.navigate(http_base(server) + "/")
    wait_for(lambda: browser.eval("typeof parseArgs") == "function", timeout=15,
             what="the page's script")
    cases = {
        'text="hello world"': {"text": "hello world"},
        "text='it''s' n=1": {"text": "its", "n": "1"},
        r'a=one\ two b="say \"hi\"" c=\'x\'': {"a": "one two", "b": 'say "hi"', "c": "'x'"},
        "  k=v   k2=  ": {"k": "v", "k2": ""},
        "": {},
    }
    for text, expected in cases.items():
        got = browser.eval(f"JSON.stringify(parseArgs({json.dumps(text)}))")
        assert json.loads(got) == expected, text
    for text, words in (('text="open', "quote is not closed"),
                        ("world", 'argument "world" is not key=value')):
        got = browser.eval(f"(() => {{ try {{ parseArgs({json.dumps(text)}); return 'ok'; }} "
                           "catch (e) { return e.message; } })()")
        assert words in got, got


def test_nexus_server_prints_the_page_token_only_on_a_terminal_or_when_asked():
    """Under systemd stdout goes to the journal, where the adm group reads it: no token
    there. On a terminal (a person started it) the page's URL comes with its token."""
    import pty
    import select
    import subprocess
    import sys
    import time

    from helpers import REPO, child_env, free_port

    srv = ServerProcess()  # stdout is a pipe
    assert srv.proc.stdout is not None
    line = srv.proc.stdout.readline()
    assert line.startswith(f"page: http://127.0.0.1:{srv.port}/ ") and "token=" not in line
    assert "--print-page-token" in line
    assert srv.stop() == 0
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "agent.server", "--port", str(free_port())],
                            stdout=child, stderr=subprocess.DEVNULL, env=child_env(), cwd=REPO)
    os.close(child)
    out = b""
    deadline = time.monotonic() + 20
    try:
        while b"page: " not in out or not out.split(b"page: ", 1)[1].count(b"\n"):
            assert time.monotonic() < deadline, out
            if select.select([main], [], [], 0.5)[0]:
                out += os.read(main, 4096)
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(main)
    page_line = out.split(b"page: ", 1)[1].split(b"\n", 1)[0].decode()
    assert "/#token=ey" in page_line, out


def test_the_picked_devices_sources_show_their_latest_values_and_tags(server, browser):
    browser.navigate(http_base(server) + "/#token=" + mint("page", "operator"))
    wait_for(lambda: browser.eval("document.getElementById('conn')?.dataset.state") == "open",
             timeout=15, what="the page to connect")
    device = connected(server.url, "pi-line")
    samples = [{"device_id": "pi-line", "metrics": {"cpu_usage": 12.5, "memory_usage": 40.0}},
               {"device_id": "pi-line", "source": "line3", "metrics": {"count": 12},
                "tags": {"shift": "a"}},
               {"device_id": "pi-line", "source": "line3", "metrics": {"count": 13,
                                                                        "temp_c": 41.5},
                "tags": {"shift": "b"}},
               {"device_id": "pi-line", "source": "<b>kiln</b>", "metrics": {"t": 1}}]
    for i, payload in enumerate(samples):
        assert device.request({"type": "telemetry", "id": f"s-{i}",
                               "payload": payload})["type"] == "ack"
    source = "document.querySelector('#source-table tr[data-source=\"{}\"] " \
             "td[data-field=\"{}\"]')?.textContent"
    wait_for(lambda: browser.eval(source.format("line3", "values")) == "count=13  temp_c=41.5",
             timeout=10, what="the latest values of source line3")
    assert browser.eval(source.format("line3", "tags")) == "shift=b"
    # a name is text, never markup; the device's own row keeps its own readings
    assert browser.eval(source.format("<b>kiln</b>", "values")) == "t=1"
    assert browser.eval("document.querySelectorAll('#source-table b').length") == 0
    assert browser.eval(_cell("pi-line", "cpu")) == "12.5 %"
    assert browser.eval("document.getElementById('no-sources').hidden") is True

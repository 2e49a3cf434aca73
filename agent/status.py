"""``nexus-agent status``: the running agent's health, read from its status file.

The daemon rewrites that file atomically at once when a fact in it changes
(connected, last error, set aside, storing, healthy), its counters every ten
samples (2 to 30 s), and at least every 30 s (no network port, nothing to
connect to). The file is ``status.json`` in the runtime directory under
systemd (``/run/nexus-agent``), else in ``state_dir``.
Exit status: 0 healthy (running, fresh, connected); 1 running but unhealthy
(disconnected, a thread stuck, or samples cannot be stored); 3 not running (no
file, a stopped agent, a process that is gone, or a file older than
``STALE_S``); 78 a bad config.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from . import cli, statusfile

EXIT_OK, EXIT_UNHEALTHY, EXIT_NOT_RUNNING, EXIT_CONFIG = 0, 1, 3, cli.EXIT_CONFIG
STALE_S = statusfile.STALE_S


TOKEN_WARN_S = 7 * 86400  # a token this close to its expiry is shown as a warning


def _expiry_note(exp: float, now: float, certificate: bool = False) -> str:
    """Says so, well before the token (or the client certificate) runs out: a server that
    renews tokens replaces one while the device is connected; a certificate is renewed
    where it was issued."""
    what = "certificate" if certificate else "token"
    if exp < now:
        return f" (EXPIRED: the server refuses it; provision a new {what})"
    if exp - now < TOKEN_WARN_S:
        how = "renew it where it was issued" if certificate else \
            "a server that renews tokens replaces it while connected, else provision a new one"
        return f" (WARNING: expires in {(exp - now) / 86400:.1f} days; {how})"
    return ""


def _ago(ts: Optional[float], now: float) -> str:
    return "never" if ts is None else f"{now - ts:.1f} s ago"


def evaluate(data: Optional[Dict[str, Any]], now: float) -> Dict[str, Any]:
    """The report: the file's facts plus ``state`` and ``exit_code``."""
    if not data:
        return {"state": "not running", "exit_code": EXIT_NOT_RUNNING}
    report = dict(data)
    if data.get("stopped") or now - data.get("updated", 0) > STALE_S or not _pid_alive(
            data.get("pid")):
        report.update(state="not running", exit_code=EXIT_NOT_RUNNING)
    elif not data.get("connected") or not data.get("healthy") or not data.get("storing", True):
        report.update(state="unhealthy", exit_code=EXIT_UNHEALTHY)
    else:
        report.update(state="healthy", exit_code=EXIT_OK)
    return report


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _drain(report: Dict[str, Any]) -> str:
    rate, eta = report.get("drain_per_min"), report.get("drain_eta_s")
    if rate is None:
        return "not measured yet"
    if not report.get("queue_depth"):
        return f"{rate:.0f} messages a minute acked; the queue is empty"
    if not rate or eta is None:
        return "nothing acked in the last minute"
    return f"{rate:.0f} messages a minute acked; empty in about {eta / 60:.1f} min"


def render(report: Dict[str, Any], now: float) -> str:
    if "device_id" not in report:
        return f"nexus-agent: {report['state']} (no status file)"
    exp = report.get("token_expires")
    offset = report.get("clock_offset_s")
    lines = [
        f"state:            {report['state']}",
        f"device:           {report['device_id']}  ->  {report['server']}",
        f"connected:        {'yes' if report.get('connected') else 'no'}"
        + (f"  (last error: {report['last_error']})" if report.get("last_error") else ""),
        f"last ack:         {_ago(report.get('last_ack_at'), now)}",
        f"queue:            {report['queue_depth']} messages, {report['queue_bytes']} bytes",
        f"oldest queued:    {_ago(report.get('oldest_queued_at'), now)}",
        f"drain:            {_drain(report)}",
        f"dropped:          {report['dropped']}  (the queue was full)",
        f"set aside:        {report.get('set_aside', 0)}  (unreadable, or refused by the server "
        "for good; kept in the outbox's set_aside table)"
        + (f"\n  the latest:     {report['last_set_aside']}" if report.get("last_set_aside")
           else ""),
        f"not stored:       {report.get('unstored', 0)}"
        + ("" if report.get("storing", True) else "  (STORING FAILS NOW: disk full or failing?)"),
        f"reconnects:       {report['reconnects']}",
        "token expires:    " + ("unknown" if exp is None else
                                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
                                + _expiry_note(exp, now)),
        *([] if report.get("certificate_expires") is None else [
            "certificate ends: " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(
                report["certificate_expires"])) + _expiry_note(report["certificate_expires"],
                                                                now, certificate=True)]),
        "clock offset:     " + ("unknown" if offset is None else f"{offset:+.3f} s to the server"),
        f"status file:      {_ago(report.get('updated'), now)}",
    ]
    for item in report.get("inputs") or []:
        lines.append(f"input {item['source']}:".ljust(18) + f"{item['samples']} samples, last "
                     f"{_ago(item.get('last_success'), now)}; {item['failures']} not stored, "
                     f"{item.get('refused', 0)} refused, {item.get('timeouts', 0)} timed out")
    lines += _devices(report, now)
    lines += [f"RESTART NEEDED:   {what} (reloaded, not yet in effect: systemctl restart "
              "nexus-agent)" for what in report.get("restart_needed") or []]
    return "\n".join(lines)


def _devices(report: Dict[str, Any], now: float) -> List[str]:
    """One line per device an input reads (``Input.report``: the Modbus input's meters),
    and one per failing point."""
    lines = []
    for source, facts in sorted((report.get("input_details") or {}).items()):
        for name, d in sorted((facts.get("devices") or {}).items()):
            errors = ", ".join(f"{kind}={n}" for kind, n in sorted(d.get("errors", {}).items()))
            lines.append(f"{source} {name}: {d.get('condition')}; last good read "
                         f"{_ago(d.get('last_good'), now)}; errors: {errors or 'none'}")
            lines += [f"  failing point {point}: {why}"
                      for point, why in sorted((d.get("failing") or {}).items())]
    return lines


def main(argv: List[str]) -> int:
    ap = cli.parser("nexus-agent status", __doc__)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    cfg = cli.load_config(args.config)
    if cfg is None:
        return EXIT_CONFIG
    data = statusfile.read(cfg.state_dir)
    now = time.time()
    report = evaluate(data, now)
    print(json.dumps(report, sort_keys=True) if args.json else render(report, now))
    return int(report["exit_code"])

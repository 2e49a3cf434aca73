"""``nexus-agent send``: hand the running agent samples through its ingest socket.

    nexus-agent send --source line3 [--tag shift=b] count=12 temp_c=41.5
    some-program | nexus-agent send          (lines: JSON or line protocol, one sample each)

For shell scripts and cron jobs. Prints the message id of each sample once the
agent has stored it (``ok <id>`` on the socket: committed to the outbox as
``queue.durability`` promises), one a line.

Exit status: 0 every sample stored; 65 (EX_DATAERR) a sample is malformed (the
reason on stderr, naming the field); 75 (EX_TEMPFAIL) no agent is listening, or
it could not store a sample now (over a rate or its queue share, a full disk):
try again later; 78 (EX_CONFIG) a bad config, or no ``inputs.socket`` in it.

Which socket: ``--socket PATH``, else the config's ``inputs.socket.path``, else
the first that exists of ``$RUNTIME_DIRECTORY/ingest.sock``,
``/run/nexus-agent/ingest.sock`` and ``state_dir/ingest.sock`` (where the agent
makes it by default). A user who may not read the config (an application's)
gets ``/run/nexus-agent/ingest.sock``, the packaged unit's place.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from typing import Dict, List, Optional

from . import cli
from .inputs import Sample, _lines

EXIT_OK, EXIT_DATAERR, EXIT_TEMPFAIL, EXIT_CONFIG = 0, 65, 75, cli.EXIT_CONFIG
ANSWER_TIMEOUT_S = 30.0
TEMPORARY = ("error rate:", "error queue:", "error store:", "error clients:")
_INT = re.compile(r"^[+-]?[0-9]+$")


class DataError(ValueError):
    """A sample given on the command line that is not one."""


def _number(name: str, text: str) -> float:
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{name}: {text!r} is not a number") from None


def _pairs(items: List[str], what: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DataError(f"{what} {item!r} is not name=value")
        out[key] = value
    return out


def argv_line(source: str, tags: List[str], metrics: List[str], now: float) -> str:
    """The JSON line for a sample given as arguments; DataError when it is not one."""
    values = {k: _number(k, v) for k, v in _pairs(metrics, "metric").items()}
    sample = Sample(source, now, values, _pairs(tags, "tag"))
    line = _lines.to_json(sample)
    try:
        _lines.parse(line, now)  # the agent's own checks, before anything is sent
    except _lines.LineError as exc:
        raise DataError(f"{exc.field}: {exc.reason}") from None
    return line


def socket_paths(cfg_path: str, explicit: Optional[str]) -> List[str]:
    """Where to look for the socket, in order (see the module docstring)."""
    if explicit:
        return [explicit]
    from . import config as config_mod
    from .inputs.socket import FILENAME, SECTION, default_path

    if not os.access(cfg_path, os.R_OK):
        # An application's user may not read the agent's config (/etc/nexus is the
        # agent's): the packaged unit's socket, then, and say so.
        print(f"nexus-agent send: cannot read {cfg_path}; trying the packaged unit's "
              "socket", file=sys.stderr)
        return [os.path.join("/run/nexus-agent", FILENAME)]
    cfg = config_mod.load(cfg_path)
    section = cfg.inputs.get(SECTION)
    if section is None:
        from .errors import ConfigError

        raise ConfigError(SECTION, f"is not in {cfg_path}: the agent has no ingest socket")
    if section.path:
        return [section.path]
    return [default_path(cfg.state_dir), os.path.join("/run/nexus-agent", FILENAME),
            os.path.join(cfg.state_dir, FILENAME)]


def connect(paths: List[str]) -> Optional[socket.socket]:
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            continue
        sock.settimeout(ANSWER_TIMEOUT_S)
        return sock
    return None


def exchange(sock: socket.socket, lines: List[str]) -> List[str]:
    """Send every line and read one answer for each (a thread writes while this one
    reads, so neither side's buffers can fill up and stop the other)."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    writer = threading.Thread(target=_write, args=(sock, data), daemon=True)
    writer.start()
    answers: List[str] = []
    buffered = b""
    with sock:
        while len(answers) < len(lines):
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            buffered += chunk
            *done, buffered = buffered.split(b"\n")
            answers += [a.decode("utf-8", "replace") for a in done]
    writer.join(1.0)
    return answers


def _write(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the agent closed: the reader sees it


def report(lines: List[str], answers: List[str]) -> int:
    """Print the ids (stdout) and the reasons (stderr); the exit status: 65 if any line was
    refused as malformed, else 75 if any could not be stored now, else 0."""
    codes = {EXIT_OK}
    for number in range(1, len(lines) + 1):
        answer = answers[number - 1] if number <= len(answers) else None
        if answer is not None and answer.startswith("ok "):
            print(answer[3:])
            continue
        where = f"line {number}: " if len(lines) > 1 else ""
        if answer is None:
            answer = "no answer (the agent stopped?): not known to be stored"
        print(f"nexus-agent send: {where}{answer}", file=sys.stderr)
        temporary = answer.startswith(TEMPORARY) or answer.startswith("no answer")
        codes.add(EXIT_TEMPFAIL if temporary else EXIT_DATAERR)
    return EXIT_DATAERR if EXIT_DATAERR in codes else max(codes)


def main(argv: List[str]) -> int:
    ap = cli.parser("nexus-agent send", __doc__)
    ap.add_argument("--socket", help="the agent's ingest socket (default: see above)")
    ap.add_argument("--source", help="the samples' source (with metrics as arguments)")
    ap.add_argument("--tag", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("metrics", nargs="*", metavar="NAME=NUMBER")
    args = ap.parse_args(argv)
    try:
        if args.metrics:
            if not args.source:
                raise DataError("--source is required with metrics as arguments")
            lines = [argv_line(args.source, args.tag, args.metrics, time.time())]
        else:
            if args.source or args.tag:
                raise DataError("--source and --tag go with metrics as arguments; lines on "
                                "stdin carry their own")
            lines = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
            if not lines:
                raise DataError("no sample: give NAME=NUMBER arguments or lines on stdin")
    except DataError as exc:
        print(f"nexus-agent send: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    from .errors import ConfigError

    try:
        paths = socket_paths(args.config, args.socket)
    except ConfigError as exc:
        print(f"nexus-agent send: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sock = connect(paths)
    if sock is None:
        print(f"nexus-agent send: no agent is listening on {' or '.join(paths)}",
              file=sys.stderr)
        return EXIT_TEMPFAIL
    return report(lines, exchange(sock, lines))

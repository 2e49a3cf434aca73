"""What the agent can tell of its own client certificate, for ``--check-config`` and
``nexus-agent status``: the device it names and when it expires.

Rules: the agent has no X.509 parser (no ``cryptography`` on a device), so this asks the
``openssl`` command, once per certificate file (cached by path, size and modification
time), never on the send path. Without the command, or for a file it cannot read, the
answer is "unknown" (None), never an error: the TLS handshake is the real check. The
device is named as the server names it (docs/protocol.md, section 1): the SAN URI
``urn:nexus:device:<id>`` when there is exactly one, else the one common name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

DEVICE_URI = "urn:nexus:device:"


@dataclass(frozen=True)
class CertFacts:
    device_id: Optional[str]  # None: no single name the server would take
    expires: Optional[float]  # notAfter, seconds since the epoch
    by_uri: bool = False  # device_id is the SAN URI's (not the common name's)


_cache: Dict[Tuple[str, int, int, int], Optional[CertFacts]] = {}


def read(path: str) -> Optional[CertFacts]:
    """The facts of the PEM certificate at ``path``, or None when they cannot be had."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)  # a replaced file is read again
    if key not in _cache:
        _cache.clear()  # one certificate per agent: no growth
        _cache[key] = _ask_openssl(path)
    return _cache[key]


def _ask_openssl(path: str) -> Optional[CertFacts]:
    import subprocess  # here: the daemon loads this module only with a client certificate

    try:
        out = subprocess.run(
            ["openssl", "x509", "-in", path, "-noout", "-enddate", "-subject", "-nameopt",
             "sep_multiline,utf8", "-ext", "subjectAltName"],
            check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse(out)


def parse(text: str) -> CertFacts:
    """The facts in ``openssl x509 -noout -enddate -subject -nameopt sep_multiline,utf8
    -ext subjectAltName`` output."""
    import ssl  # cert_time_to_seconds; the daemon has ssl loaded anyway with a certificate

    expires = None
    names, uris = [], []
    in_san = False  # URIs only from the SAN's lines: a subject attribute may hold ", URI:"
    for line in text.splitlines():
        item = line.strip()
        if not line[:1].isspace():  # a section's first line; its items are indented
            in_san = item.startswith("X509v3 Subject Alternative Name")
        if item.startswith("notAfter="):
            try:
                expires = float(ssl.cert_time_to_seconds(item[len("notAfter="):]))
            except ValueError:
                expires = None
        elif not in_san and item.startswith("CN="):
            names.append(item[3:])
        elif in_san:
            uris += [part.strip()[4 + len(DEVICE_URI):] for part in item.split(",")
                     if part.strip().startswith("URI:" + DEVICE_URI)]
    device = uris[0] if len(uris) == 1 else names[0] if not uris and len(names) == 1 \
        else None
    return CertFacts(device, expires, len(uris) == 1)


def problem(path: str, device_id: str, now: float) -> Optional[str]:
    """What the certificate says is wrong for this device, or None (also when unknown)."""
    facts = read(path)
    if facts is None:
        return None
    if facts.expires is not None and facts.expires <= now:
        return "the client certificate has expired"
    if facts.device_id is not None and facts.device_id != device_id:
        return (f"the client certificate names device {facts.device_id!r}, not device_id "
                f"{device_id!r} (the server takes the certificate's word and refuses "
                "telemetry for another device)")
    return None

"""Where the device's token comes from, and what the agent may read of it.

Rules:

* The token comes from ``server.token_file`` or, when that key is absent, from
  ``$NEXUS_TOKEN``. It is re-read on every connect, so provisioning can rotate
  it without restarting the agent.
* A token file must be a regular file that group and others cannot read or
  write (``chmod 600``); anything else is refused, like ssh does with keys.
* The token is never logged. The agent does not verify its signature (the
  server does); it only reads ``exp`` to report expiry, without PyJWT, which
  would drag in ``ssl`` and ``urllib`` for nothing.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from typing import Any, Dict, Optional

from .errors import AuthError

MAX_TOKEN_BYTES = 8192


def check_token_file(path: str) -> None:
    """AuthError unless ``path`` is a regular file only its owner can read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AuthError(f"token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"token file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise AuthError(f"token file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                        f"others read it; run: chmod 600 {path}")
    if not os.access(path, os.R_OK):
        raise AuthError(f"token file {path}: not readable by this user (uid {os.geteuid()})")


def read_token(token_file: Optional[str]) -> str:
    """The current token; AuthError with the reason when there is none to use."""
    if token_file is None:
        token = os.environ.get("NEXUS_TOKEN", "").strip()
        if not token:
            raise AuthError("no token: set server.token_file or the NEXUS_TOKEN environment "
                            "variable")
        return token
    check_token_file(token_file)
    try:
        with open(token_file, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise AuthError(f"token file {token_file}: {exc.strerror}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise AuthError(f"token file {token_file}: larger than {MAX_TOKEN_BYTES} bytes")
    token = data.decode("ascii", "replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise AuthError(f"token file {token_file}: empty, or not a single token")
    return token


def unverified_claims(token: str) -> Dict[str, Any]:
    """The JWT's claims without checking the signature; {} if it is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def expiry(token: str) -> Optional[float]:
    exp = unverified_claims(token).get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None

"""Where the device's token comes from, and what the agent may read of it.

Rules:

* The token comes from ``server.token_file`` or, when that key is absent, from
  ``$NEXUS_TOKEN``. It is re-read on every connect, so provisioning can rotate
  it without restarting the agent.
* A token the server renewed is kept in ``state_dir/renewed-token``, never over
  the provisioned one: under the shipped unit ``/etc/nexus`` is read-only to the
  agent (ProtectSystem=strict, a root-owned 0750 directory), and a config
  directory the agent could write would let it rewrite its own allow-list.
  :func:`current_token` presents the renewed token while it is usable (a JWT
  for this device, not expired) and issued no earlier (``iat``) than the provisioned
  one, so a token that provisioning writes later wins again.
* A token file must be a regular file that group and others cannot read or
  write (``chmod 600``); anything else is refused, like ssh does with keys.
* ``server.proxy_auth_file`` holds the HTTP proxy's ``user:password``, under
  the same file rules, also re-read on every connect and never logged.
* The token is never logged. The agent does not verify its signature (the
  server does); it only reads ``exp`` to report expiry, without PyJWT, which
  would drag in ``ssl`` and ``urllib`` for nothing.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from typing import Any, Dict, Optional, Tuple

from .errors import AuthError

MAX_TOKEN_BYTES = 8192


def check_token_file(path: str, what: str = "token file") -> None:
    """AuthError unless ``path`` is a regular file only its owner can read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise AuthError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o077:
        raise AuthError(f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                        f"others read it; run: chmod 600 {path}")
    if not os.access(path, os.R_OK):
        raise AuthError(f"{what} {path}: not readable by this user (uid {os.geteuid()})")


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """The bytes of ``path``, at most ``limit``; AuthError naming ``what`` and the file when
    it cannot be read or is larger (the server's key and deny files use it too)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise AuthError(f"{what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise AuthError(f"{what} {path}: larger than {limit} bytes")
    return data


def _read_secret(path: str, what: str) -> bytes:
    """The bytes of a 0600 secret file, at most MAX_TOKEN_BYTES; never logged."""
    check_token_file(path, what)
    return read_bounded(path, MAX_TOKEN_BYTES, what)


def read_secret_line(path: str, what: str) -> str:
    """The one line of a 0600 secret file (a key's passphrase); never logged."""
    data = _read_secret(path, what)
    lines = data.decode("utf-8", "replace").splitlines()
    if len(lines) != 1 or not lines[0]:
        raise AuthError(f"{what} {path}: must hold one line")
    return lines[0]


def read_proxy_auth(path: str) -> Tuple[str, str]:
    """``(user, password)`` from a proxy credentials file holding ``user:password``."""
    what = "proxy auth file"
    data = _read_secret(path, what)
    line = data.decode("utf-8", "replace").strip()
    user, colon, password = line.partition(":")
    if len(data) > MAX_TOKEN_BYTES or "\n" in line or not colon or not user:
        raise AuthError(f"{what} {path}: must hold one line, user:password")
    return user, password


def check_credentials(token_file: Optional[str], client_key: Optional[str]) -> Optional[str]:
    """What the agent will present, checked as at a connect: the token (None when a client
    certificate stands in for it: a key and neither a token file nor $NEXUS_TOKEN), and
    the client key's file rules. AuthError with the reason."""
    if client_key is not None:
        check_token_file(client_key, "client key")
        if token_file is None and not os.environ.get("NEXUS_TOKEN", "").strip():
            return None
    return read_token(token_file)


def read_token(token_file: Optional[str]) -> str:
    """The current token; AuthError with the reason when there is none to use."""
    if token_file is None:
        token = os.environ.get("NEXUS_TOKEN", "").strip()
        if not token:
            raise AuthError("no token: set server.token_file or the NEXUS_TOKEN environment "
                            "variable")
        return token
    data = _read_secret(token_file, "token file")
    token = data.decode("ascii", "replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise AuthError(f"token file {token_file}: empty, or not a single token")
    return token


RENEWED_TOKEN = "renewed-token"  # in state_dir


def renewed_token_path(state_dir: str) -> str:
    return os.path.join(state_dir, RENEWED_TOKEN)


def current_token(token_file: Optional[str], client_key: Optional[str], state_dir: str,
                  device_id: str, now: float) -> Optional[str]:
    """The token to present (None: a client certificate stands in for it): the provisioned
    one (:func:`check_credentials`), or the renewal in ``state_dir`` when it is usable and
    issued no earlier. AuthError when there is no usable provisioned token or certificate."""
    token = check_credentials(token_file, client_key)
    if token is None:
        return None
    try:
        renewed = read_token(renewed_token_path(state_dir))
    except AuthError:
        return token  # none yet (the usual case), or unreadable: the provisioned one
    if token_problem(renewed, device_id, now) is not None:
        return token
    # A tie goes to the renewal: the server sent it in answer to the provisioned token.
    return renewed if _issued(renewed) >= _issued(token) else token


def _issued(token: str) -> float:
    iat = _time_claim(token, "iat")
    return float("-inf") if iat is None else iat


def store_token(path: str, token: str) -> None:
    """Replace (or create) the token file ``path`` with ``token``, atomically and durably:
    a new file beside it (mode 0600, the old file's owner and group), written and
    fsynced, renamed over the old one, then the directory fsynced. On any error (a full
    disk, a read-only directory) the old file is left as it was and OSError says why."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        old: Optional[os.stat_result] = os.stat(path)
    except FileNotFoundError:
        old = None  # the first renewal: the file is ours
    if not token.isascii() or len(token) >= MAX_TOKEN_BYTES:
        raise OSError(f"not a token this agent can read back ({len(token)} characters)")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.new-{os.getpid()}")
    try:
        os.unlink(tmp)  # a leftover of a crash: never reuse its mode or owner
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, (token + "\n").encode("ascii"))
            if old is not None and os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


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
    return _time_claim(token, "exp")


def _time_claim(token: str, name: str) -> Optional[float]:
    """A numeric date claim (``exp``, ``iat``) of the token, or None (absent, not a number)."""
    value = unverified_claims(token).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def token_problem(token: str, device_id: str, now: float) -> Optional[str]:
    """What is wrong with the token for this device, from its claims alone (the secret is
    the server's), or None: not a JWT, expired, or issued to another ``sub``."""
    claims = unverified_claims(token)
    if not claims:
        return "the token is not a JWT (three base64url parts, the middle one JSON claims)"
    exp = expiry(token)
    if exp is not None and exp <= now:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
        return f"the token expired at {when}"
    if claims.get("sub") != device_id:
        return (f"the token is for sub {claims.get('sub')!r}, not device_id {device_id!r} "
                "(the server refuses telemetry for another device)")
    return None

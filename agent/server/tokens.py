"""JWT handling for the companion server: verify on connect, mint for local use.

Rules: HS256 only (the algorithm is pinned, so a token cannot pick ``none`` or
an asymmetric one); ``exp`` is required; ``sub`` and ``role`` (``device`` or
``operator``) are required. The secret comes from ``NEXUS_JWT_SECRET`` or a
file, never from the command line (it would show in ``ps``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import jwt

from ..errors import AuthError

ALGORITHM = "HS256"
ROLES = ("device", "operator")
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class Identity:
    """Who is on a connection, from its verified token."""

    subject: str
    role: str
    expires: float

    @property
    def is_device(self) -> bool:
        return self.role == "device"


def load_secret(secret_file: str | None) -> bytes:
    """The signing secret from ``secret_file`` or ``$NEXUS_JWT_SECRET``; AuthError if neither."""
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise AuthError(f"secret file {secret_file}: {exc.strerror}") from None
    else:
        secret = os.environ.get("NEXUS_JWT_SECRET", "").encode()
        if not secret:
            raise AuthError("no JWT secret: set NEXUS_JWT_SECRET or pass --secret-file")
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def verify(token: str, secret: bytes) -> Identity:
    """The identity in ``token``; AuthError with a reason a client may read otherwise."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("Token expired") from None
    except jwt.PyJWTError:
        raise AuthError("Invalid token") from None
    exp = claims["exp"]
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        # PyJWT accepts "exp": "9999999999" (it calls int() on it); RFC 7519 says a number.
        raise AuthError("Token exp must be a number")
    role = claims.get("role")
    if role not in ROLES:
        raise AuthError("Token role must be device or operator")
    sub = claims["sub"]
    if not isinstance(sub, str) or not 0 < len(sub) <= 128:
        raise AuthError("Token subject must be a string of 1 to 128 characters")
    return Identity(sub, role, float(exp))


def mint(secret: bytes, subject: str, role: str, ttl_s: float, now: float | None = None) -> str:
    """A signed token for ``subject`` in ``role`` that expires ``ttl_s`` from now."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    issued = int(time.time() if now is None else now)
    claims = {"sub": subject, "role": role, "iat": issued, "exp": issued + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)

"""JWT handling for the companion server: verify on connect, mint for local use.

Rules:

* The algorithm is pinned by configuration, never taken from a token: HS256 with a
  shared secret (the guide's; from ``NEXUS_JWT_SECRET`` or a file, never the command
  line, where ``ps`` shows it), or EdDSA (an Ed25519 key) or RS256 (an RSA key of at
  least 2048 bits) with a PEM key file. The kind of key file decides which, and only
  that one is accepted (so a token cannot pick ``none``, nor HS256 keyed with the
  public key).
* With a public key only (``--public-key``) a node verifies and cannot mint: it holds
  nothing that makes a token, so it offers no renewal (docs/design.md, "Tokens").
  A private key (``--signing-key``, and ``nexus-server token --private-key``) mints,
  and verifies with its public half.
* ``exp``, ``sub`` and ``role`` (``device`` or ``operator``) are required; ``exp`` and
  ``iat`` must be numbers. ``iat`` gives a token's lifetime, which renewal keeps.
* A device identity may also come from a client certificate (``certs.py``); such an
  identity has no token and is never renewed (its certificate's ``notAfter`` is its
  expiry).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, cast

import jwt

from ..auth import read_bounded
from ..errors import AuthError

HS256, EDDSA, RS256 = "HS256", "EdDSA", "RS256"
ALGORITHM = HS256  # the guide's, and the default
ROLES = ("device", "operator")
# A claim token (provisioning by claim, certs.py): it may only ask for one device
# certificate per connection, for an id starting with its ``prefix``, at most ``max`` ids.
CLAIM = "claim"
ALL_ROLES = ROLES + (CLAIM,)
MAX_CLAIMS = 1_000_000
MAX_CLAIM_PREFIX = 64
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
# How far in the future a token's iat may be: the nodes of a fleet and the minter never
# share one clock, and PyJWT's own check (no leeway) would refuse a renewal minted by a
# node a second ahead of this one. exp is checked with no leeway.
IAT_SKEW_S = 60.0
MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Identity:
    """Who is on a connection, from its verified token (or client certificate)."""

    subject: str
    role: str
    expires: float
    issued: Optional[float] = None  # the token's iat: with exp, its lifetime (renewal)
    certificate: bool = False  # from a client certificate: no token, never renewed
    claim_prefix: str = ""  # a claim token's: the ids it may claim start with this
    claim_max: int = 0  # a claim token's: how many ids it may claim in all

    @property
    def is_device(self) -> bool:
        return self.role == "device"

    def renew_time(self, share: float) -> Optional[float]:
        """When a token of this identity has passed ``share`` of its lifetime (wall clock);
        None when it cannot be renewed (a certificate, an operator, no ``iat``)."""
        if self.certificate or not self.is_device or self.issued is None:
            return None
        if self.expires <= self.issued:
            return None
        return self.issued + share * (self.expires - self.issued)


class TokenKeys:
    """What verifies tokens, with the one algorithm it accepts, and what mints them when
    this process holds it (``can_mint``)."""

    def __init__(self, algorithm: str, verify_key: Any, signing_key: Any = None) -> None:
        self.algorithm = algorithm
        self._verify_key = verify_key
        self._signing_key = signing_key

    @property
    def can_mint(self) -> bool:
        return self._signing_key is not None

    @classmethod
    def from_secret(cls, secret: bytes) -> TokenKeys:
        if len(secret) < MIN_SECRET_BYTES:
            raise AuthError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        return cls(HS256, secret, secret)

    def verify(self, token: str) -> Identity:
        """The identity in ``token``; AuthError with a reason a client may read otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._verify_key, algorithms=[self.algorithm],
                options={"require": ["exp", "sub"], "verify_iat": False})
        except jwt.ExpiredSignatureError:
            raise AuthError("Token expired") from None
        except jwt.PyJWTError:
            raise AuthError("Invalid token") from None
        exp = claims["exp"]
        if not _is_number(exp):
            # PyJWT accepts "exp": "9999999999" (it calls int() on it); RFC 7519 says a number.
            raise AuthError("Token exp must be a number")
        iat = claims.get("iat")
        if iat is not None and not _is_number(iat):
            raise AuthError("Token iat must be a number")
        if iat is not None and (not math.isfinite(iat) or iat > time.time() + IAT_SKEW_S):
            raise AuthError("Token iat is in the future")
        role = claims.get("role")
        if role not in ALL_ROLES:
            raise AuthError("Token role must be device or operator")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 128 or not sub.isprintable():
            raise AuthError("Token subject must be 1 to 128 printable characters")
        issued = None if iat is None else float(iat)
        if role == CLAIM:
            prefix, most = claims.get("prefix"), claims.get("max")
            problem = claim_limits_problem(prefix, most)
            if problem:
                raise AuthError(f"Claim token {problem}")
            return Identity(sub, role, float(exp), issued, claim_prefix=cast(str, prefix),
                            claim_max=cast(int, most))  # both checked just above
        return Identity(sub, role, float(exp), issued)

    def mint(self, subject: str, role: str, ttl_s: float, now: Optional[float] = None,
             **extra: Any) -> str:
        """A signed token for ``subject`` in ``role`` that expires ``ttl_s`` from now;
        ``extra`` claims beside (a claim token's ``prefix`` and ``max``)."""
        if role not in ALL_ROLES:
            raise ValueError(f"role must be one of {ALL_ROLES}")
        if self._signing_key is None:
            raise AuthError("this server holds a public key only: it cannot mint tokens")
        issued = int(time.time() if now is None else now)
        claims = {"sub": subject, "role": role, "iat": issued, "exp": issued + int(ttl_s),
                  **extra}
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)


def claim_limits_problem(prefix: Any, most: Any) -> Optional[str]:
    """What is wrong with a claim token's ``prefix`` and ``max``, or None: minting checks
    them as verifying does, so no token is minted that every claim would be refused."""
    if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_CLAIM_PREFIX:
        return (f"prefix must be a string of 1 to {MAX_CLAIM_PREFIX} characters (an empty one "
                "would reach every device's id)")
    if not isinstance(most, int) or isinstance(most, bool) or not 0 < most <= MAX_CLAIMS:
        return f"max must be an integer from 1 to {MAX_CLAIMS}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_secret_keys(secret_file: str | None) -> TokenKeys:
    """HS256 keys from the secret in ``secret_file`` or ``$NEXUS_JWT_SECRET``; AuthError if
    neither, or if it is too short (:meth:`TokenKeys.from_secret`)."""
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
    return TokenKeys.from_secret(secret)


def load_public_key(path: str) -> TokenKeys:
    """Verify-only keys from a PEM public key (Ed25519: EdDSA; RSA: RS256)."""
    from cryptography.hazmat.primitives import serialization  # the 'server' extra

    try:
        key = serialization.load_pem_public_key(_read_key(path))
    except ValueError as exc:
        raise AuthError(f"public key {path}: not a PEM public key ({exc})") from None
    return TokenKeys(_algorithm_of(key, path), key)


def load_private_key(path: str) -> TokenKeys:
    """Keys that mint (and verify with the public half) from a PEM private key, unencrypted
    (a service reads it unattended; its file mode is what protects it)."""
    from cryptography.hazmat.primitives import serialization  # the 'server' extra

    try:
        key = serialization.load_pem_private_key(_read_key(path), password=None)
    except (ValueError, TypeError) as exc:
        raise AuthError(f"private key {path}: not an unencrypted PEM private key "
                        f"({exc})") from None
    public = key.public_key()
    return TokenKeys(_algorithm_of(public, path), public, key)


def _read_key(path: str) -> bytes:
    return read_bounded(path, MAX_KEY_FILE_BYTES, "key file")


def _algorithm_of(public_key: Any, path: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return EDDSA
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise AuthError(f"key {path}: an RSA key of {public_key.key_size} bits; at least "
                            f"{MIN_RSA_BITS} are required")
        return RS256
    raise AuthError(f"key {path}: {type(public_key).__name__} is not supported; use an "
                    "Ed25519 key (EdDSA) or an RSA key (RS256)")


def verify(token: str, secret: bytes) -> Identity:
    """``token`` checked with an HS256 ``secret`` (TokenKeys.verify)."""
    return TokenKeys(HS256, secret).verify(token)


def mint(secret: bytes, subject: str, role: str, ttl_s: float, now: float | None = None) -> str:
    """An HS256 token signed with ``secret`` (TokenKeys.mint)."""
    return TokenKeys(HS256, secret, secret).mint(subject, role, ttl_s, now)

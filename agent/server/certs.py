"""Device identity from a client certificate (mTLS), the companion server's side.

Rules:

* Only a certificate that was verified is read here: by this node's TLS (``--client-ca``:
  the chain up to that CA, its validity dates, its key usage for a TLS client), or by a
  TLS terminator in front (nginx) that passes the verified certificate in a header that
  this node takes only from the terminator's addresses (``--client-cert-header`` and
  ``--trusted-proxy``). Whatever else a client sends never names it.
* The device id is, in this order: a subjectAltName URI ``urn:nexus:device:<id>``
  (exactly one), else the subject's commonName (exactly one). It follows the rules of a
  token's ``sub`` (1 to 128 characters) and has no control characters.
* A certificate identity is always a device (operators use tokens); it expires at the
  certificate's ``notAfter``, when the server closes the connection as for a token.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Iterable, List, Optional, Union
from urllib.parse import unquote

from ..auth import read_bounded
from ..certinfo import DEVICE_URI  # the agent names its own certificate the same way
from ..errors import AuthError
from .tokens import Identity

MAX_PEM_FILE_BYTES = 1 << 20  # a CA bundle, a CA certificate or key
TRUSTED_PROXIES = ("127.0.0.1", "::1")  # --trusted-proxy's default: a terminator on this host
# An escaped PEM certificate (P-256: ~0.7 KiB, RSA 4096: ~2.6 KiB). The handshake reads
# header lines of at most app.MAX_HEADER_LINE (4 KiB, name included) anyway: a longer
# one is refused there with 431.
MAX_HEADER_CERT_CHARS = 4096
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def identity_from_der(der: bytes) -> Identity:
    """The device identity of a DER certificate (already verified, see the module)."""
    from cryptography import x509  # the 'server' extra

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise AuthError(f"Client certificate cannot be read: {exc}") from None
    return _identity(cert)


def load_bundle(path: str) -> List[Any]:
    """The CA certificates of a PEM bundle (``--client-ca``); AuthError naming the file."""
    from cryptography import x509

    data = read_bounded(path, MAX_PEM_FILE_BYTES, "client CA")
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise AuthError(f"client CA {path}: {exc}") from None


def identity_from_header(value: str, issuers: Optional[List[Any]] = None) -> Identity:
    """The device identity of a URL-escaped PEM certificate (nginx's
    ``$ssl_client_escaped_cert``), passed by a trusted TLS terminator; with ``issuers``
    (``--client-ca``) it must be issued directly by one of them, too."""
    from cryptography import x509  # the 'server' extra

    if len(value) > MAX_HEADER_CERT_CHARS:
        raise AuthError("Client certificate header too long")
    try:
        cert = x509.load_pem_x509_certificate(unquote(value).encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuthError(f"Client certificate header cannot be read: {exc}") from None
    # The terminator checked the dates; checked again here because an identity that is
    # already past them would be welcomed, and what it pipelined stored, until the expiry
    # timer closes it (TLS on this node refuses such a certificate in the handshake).
    now = time.time()
    if cert.not_valid_after_utc.timestamp() <= now:
        raise AuthError("Client certificate expired")
    if cert.not_valid_before_utc.timestamp() > now:
        raise AuthError("Client certificate not valid yet")
    if issuers is not None and not any(_issued_by(cert, ca) for ca in issuers):
        # Certificates are public, so this does not replace --trusted-proxy; it stops a
        # process at a trusted address from making one up.
        raise AuthError("Client certificate is not issued by the client CA")
    return _identity(cert)


def _issued_by(cert: Any, ca: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _identity(cert: object) -> Identity:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    assert isinstance(cert, x509.Certificate)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith(DEVICE_URI)]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) > 1:
        raise AuthError(f"Client certificate names {len(uris)} devices ({DEVICE_URI}...)")
    if uris:
        device = uris[0][len(DEVICE_URI):]
    else:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            raise AuthError(f"Client certificate has {len(names)} common names and no "
                            f"{DEVICE_URI} name: which device is it?")
        device = str(names[0].value)
    if not 0 < len(device) <= 128 or not device.isprintable():
        raise AuthError("Client certificate's device id must be 1 to 128 printable characters")
    return Identity(device, "device", cert.not_valid_after_utc.timestamp(), certificate=True)


def parse_networks(values: Iterable[str]) -> List[Network]:
    """``--trusted-proxy`` values (an address or a network); ValueError names a bad one."""
    out: List[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxy {value!r} is not an address or a network") \
                from None
    return out


def trusted(address: object, networks: List[Network]) -> bool:
    """Whether a peer address (``(host, port, ...)`` from the transport) is a trusted proxy."""
    host = address[0] if isinstance(address, tuple) and address else None
    if not isinstance(host, str):
        return False  # a Unix socket, or nothing: not an address we were told to trust
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


# ------------------------------------------------------------------ provisioning by claim


class ClaimCA:
    """The device CA of provisioning by claim: it signs a claimed device's certificate
    request. Only the request's public key is used (its signature must verify: the device
    holds the private key); the name, the SAN URI and the key usage are the server's."""

    def __init__(self, cert_path: str, key_path: str, days: int) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert_pem = read_bounded(cert_path, MAX_PEM_FILE_BYTES, "claim CA certificate")
        key_pem = read_bounded(key_path, MAX_PEM_FILE_BYTES, "claim CA key")
        try:
            self.cert = x509.load_pem_x509_certificate(cert_pem)
            self.key = serialization.load_pem_private_key(key_pem, None)
        except (ValueError, TypeError) as exc:
            raise AuthError(f"claim CA {cert_path} / {key_path}: {exc}") from None
        if key_id(self.key.public_key()) != key_id(self.cert.public_key()):
            raise AuthError(f"claim CA: {key_path} is not the key of {cert_path}")
        self.days = days

    def request_key(self, csr_pem: str) -> Any:
        """The public key of a certificate request whose signature verifies (the device holds
        the private key) and whose key is one this CA signs; ValueError says what is wrong
        (a client may read it). Cheap beside :meth:`sign`: it runs before the claim is
        checked, the signature after."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError("not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise ValueError("the request's signature does not verify")
        public = csr.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
            raise ValueError("an RSA key must have at least 2048 bits")
        if not isinstance(public, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                                   rsa.RSAPublicKey)):
            raise ValueError("the key must be P-256, P-384, Ed25519 or RSA")
        # Not any curve: a weak one (P-192), or one TLS 1.3 cannot use (secp256k1), would
        # spend the id, once and for all, on a certificate that protects or opens nothing.
        if isinstance(public, ec.EllipticCurvePublicKey) and \
                not isinstance(public.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise ValueError(f"the curve {public.curve.name} is not taken: use P-256 or P-384")
        return public

    def sign(self, public: Any, device_id: str, now: float) -> str:
        """A PEM certificate for ``device_id`` with ``public`` (from :meth:`request_key`)."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        start = datetime.datetime.fromtimestamp(now - 300, datetime.timezone.utc)
        # A CN holds at most 64 characters (RFC 5280), an id up to 128: a longer id is named
        # by the SAN URI alone, under an empty subject (the SAN is then critical).
        named = len(device_id) <= 64
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)] if named else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=self.days, seconds=300))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(DEVICE_URI + device_id)]), critical=not named)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        digest = None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        cert = builder.sign(self.key, digest)  # type: ignore[arg-type]
        return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_id(public: Any) -> str:
    """The SHA-256 of a public key's SubjectPublicKeyInfo, hex: what a claim records, so the
    same device (the same key) may repeat a claim whose answer it lost."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()

"""Throw-away PKI for the TLS tests, made with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1 signed by it, and client certificates (a device's, an expired
one, one from another CA). Nothing here is a mock: real keys, real X.509."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, Optional, Tuple


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str = "ca") -> Tuple[Path, Path]:
    """(cert, key) of a self-signed CA."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-keyout", str(key), "-out", str(cert),
             "-subj", f"/CN=test {name}")
    return cert, key


def make_cert(folder: Path, ca: Tuple[Path, Path], name: str, cn: str,
              san: Optional[str] = None, days: int = 1, expired: bool = False,
              passphrase: Optional[str] = None) -> Tuple[Path, Path]:
    """(cert, key) signed by ``ca``; ``expired``: valid only in the past. The key file is
    0600, as the agent requires; with ``passphrase`` it is encrypted."""
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    if expired:  # x509 -req cannot set a start date in the past; openssl ca can
        _backdate(cert, csr, ca, ext)
    else:
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                 "-CAcreateserial", "-out", str(cert), "-extfile", str(ext),
                 "-days", str(days))
    if passphrase:
        plain = key.read_bytes()
        tmp = folder / f"{name}.plain.key"
        tmp.write_bytes(plain)
        _openssl("pkey", "-in", str(tmp), "-out", str(key), "-aes256",
                 "-passout", f"pass:{passphrase}")
        tmp.unlink()
    key.chmod(0o600)
    return cert, key


def _backdate(cert: Path, csr: Path, ca: Tuple[Path, Path], ext: Path) -> None:
    """Re-sign ``cert`` valid from 3 days ago to 2 days ago (openssl ca -startdate)."""
    folder = cert.parent
    db, serial = folder / "index.txt", folder / "serial"
    db.write_text("")
    serial.write_text("1000\n")
    conf = folder / "ca.cnf"
    conf.write_text(
        "[ca]\ndefault_ca=this\n[this]\n"
        f"database={db}\nserial={serial}\nnew_certs_dir={folder}\n"
        "default_md=sha256\npolicy=any\nunique_subject=no\n"
        "[any]\ncommonName=supplied\n")
    _openssl("ca", "-batch", "-config", str(conf), "-in", str(csr), "-out", str(cert),
             "-cert", str(ca[0]), "-keyfile", str(ca[1]), "-extfile", str(ext),
             "-startdate", _ago(3), "-enddate", _ago(2), "-notext")


def _ago(days: int) -> str:
    import time

    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() - days * 86400))


def make_keypair(folder: Path, name: str, kind: str = "ed25519") -> Tuple[Path, Path]:
    """(private, public) PEM keys for signing tokens: ``ed25519``, ``rsa2048``, ``rsa1024``
    or ``p256`` (the last two for the refusals)."""
    private, public = folder / f"{name}.key", folder / f"{name}.pub.pem"
    algorithm = {"ed25519": ["-algorithm", "ed25519"],
                 "rsa2048": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                 "rsa1024": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                 "p256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]}[kind]
    _openssl("genpkey", *algorithm, "-out", str(private))
    private.chmod(0o600)
    _openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
    return private, public


def shared_pki(folder: Path, **more: Tuple[str, Optional[str]]) -> Dict[str, Tuple[Path, Path]]:
    """What the TLS tests share: ``ca`` and its ``server`` certificate for 127.0.0.1, a
    ``device`` certificate (CN device-001) and a ``stranger`` one from another CA; plus
    ``more`` certificates of ``ca``, name=(CN, SAN or None)."""
    ca = make_ca(folder)
    other = make_ca(folder, "other-ca")
    out = {"ca": ca,
           "server": make_cert(folder, ca, "server", "127.0.0.1", san="IP:127.0.0.1"),
           "device": make_cert(folder, ca, "device", "device-001"),
           "stranger": make_cert(folder, other, "stranger", "device-001")}
    for name, (cn, san) in more.items():
        out[name] = make_cert(folder, ca, name, cn, san=san)
    return out

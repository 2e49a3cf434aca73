"""certinfo: the agent reads its client certificate with the real ``openssl`` command and
must name the device as the server does (agent/server/certs.py)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from agent import certinfo
from agent.server import certs

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def self_signed(folder, subject, *extra, key=("ec", "-pkeyopt", "ec_paramgen_curve:P-256")):
    key_file, cert = folder / "k.pem", folder / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", *key, "-nodes", "-keyout",
                    str(key_file), "-out", str(cert), "-days", "2", "-subj", subject, *extra],
                   check=True, capture_output=True)
    return cert


def test_a_subject_attribute_that_reads_like_a_san_uri_does_not_name_the_device(tmp_path):
    # openssl prints the subject one attribute a line; only the SAN section holds URIs.
    cert = self_signed(tmp_path, "/O=Plant 3, URI:urn:nexus:device:evil/CN=gw-1")
    server = certs.identity_from_der(ssl.PEM_cert_to_DER_cert(cert.read_text())).subject
    assert server == "gw-1"
    facts = certinfo.read(str(cert))
    assert facts is not None and facts.device_id == server


def test_a_certificate_replaced_with_the_same_size_and_time_is_read_again(tmp_path):
    """The cache is keyed by inode too: provisioning renames a new certificate in."""
    import os

    # Ed25519: signatures of one size, so the two files are the same size (ECDSA's vary)
    first = self_signed(tmp_path, "/CN=gw-0001", key=("ed25519",))
    (tmp_path / "second").mkdir()
    second = self_signed(tmp_path / "second", "/CN=gw-0002", key=("ed25519",))
    assert certinfo.read(str(first)).device_id == "gw-0001"
    stat = first.stat()
    assert second.stat().st_size == stat.st_size
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(second, first)
    assert certinfo.read(str(first)).device_id == "gw-0002"

"""``nexus-agent provision``: write a device's config and token, for fleet scripts.

    nexus-agent provision --device-id ID --server URL --token-file PATH
                          [--client-cert PEM --client-key KEY]
                          [--claim TOKEN | --claim-file FILE]
                          [--config /etc/nexus/agent.yaml] [--state-dir DIR]
                          [--ca-file PEM] [--commands FILE] [--proxy URL]
                          [--proxy-auth-file FILE] [--force] [--no-check]

Order: check the input (as the agent would), check that the server accepts
the token (unless ``--no-check``), then write the token (``token`` beside the
config) and the config, each atomically (temporary file, fsync, rename, fsync
of the directory). Nothing is written when a check fails.

Modes: 0600 for both, owned by whoever runs this; run as root where the
``nexus-agent`` user exists (a package or ``make install`` and sysusers), the
token goes to that user (0600) and the config to root, group ``nexus-agent``
(0640), so the service can read both and nobody else can.

``--client-cert`` and ``--client-key``: a device certificate and its unencrypted key
(mode 0600), copied like the token to ``device.pem`` and ``device.key`` beside the
config (``server.client_cert``/``client_key``, a ``wss://`` server); the token is then
optional, and the check presents the certificate.

``--claim TOKEN`` or ``--claim-file FILE`` (provisioning by claim): a factory image
carries one claim token and no device secret. A key is made here (P-256, with the
``openssl`` command), a certificate for ``--device-id`` is asked for with it
(``device.claim``, docs/protocol.md section 10), and the key and the certificate the
server signs are written as with ``--client-cert``. A device id is claimed once: run
again on a provisioned device, it changes nothing (exit 0); a refused claim is exit 5.
``--claim`` shows in ``ps`` while this runs: prefer ``--claim-file``.

``--proxy`` and ``--proxy-auth-file``: the HTTP proxy (``server.proxy``) and a
file with its credentials, copied like the token to ``proxy-auth`` beside the
config (``server.proxy_auth_file``); both are used for the check. Without
``--proxy`` the check uses ``https_proxy``/``http_proxy`` from the environment,
as the agent would.

``--commands FILE``: a YAML mapping in the form of the config's ``commands:``
section (``allow:`` and its limits), copied into the config; without it the
device takes no remote commands.

Idempotent: the same input gives byte-identical files and exit 0. An existing
config with other content is refused unless ``--force``, except the example
config a package installs (still unedited), which is simply replaced; the token
file is always replaced (that is how tokens are rotated).

Exit codes: 0 done; 2 bad input; 3 an existing config differs (use --force);
4 the server cannot be reached; 5 the server refused the token; 6 a file
system error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from . import config as config_mod
from .auth import check_token_file, read_bounded, read_proxy_auth, read_token
from .errors import AuthError, ConfigError

EXIT_OK, EXIT_INPUT, EXIT_CONFLICT, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_FS = 0, 2, 3, 4, 5, 6
SERVICE_USER = "nexus-agent"  # systemd/nexus-agent.sysusers
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The example config as installed (PREFIX/share/nexus-agent, beside PREFIX/lib/nexus-agent)
# or in a checkout: a config still equal to it was never provisioned.
EXAMPLES = (os.path.join(_PACKAGE_DIR, "..", "..", "..", "share", "nexus-agent",
                         "agent.example.yaml"),
            os.path.join(_PACKAGE_DIR, "..", "config", "agent.example.yaml"))


class ProvisionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def render_config(device_id: str, server: str, token_path: Optional[str], state_dir: str,
                  ca_file: Optional[str] = None, commands: Optional[Any] = None,
                  proxy: Optional[str] = None, proxy_auth_file: Optional[str] = None,
                  client: Optional[Tuple[str, str]] = None) -> str:
    """The config text: deterministic, so re-running with the same input changes nothing."""
    q = json.dumps  # a JSON string is a YAML double-quoted scalar: nothing can break out
    text = (
        "# Written by 'nexus-agent provision'. Every key: agent.example.yaml.\n"
        f"device_id: {q(device_id)}\n"
        f"state_dir: {q(state_dir)}\n"
        "server:\n"
        f"  url: {q(server)}\n"
        + (f"  token_file: {q(token_path)}\n" if token_path else "")
        + (f"  client_cert: {q(client[0])}\n  client_key: {q(client[1])}\n" if client else "")
        + (f"  ca_file: {q(os.path.abspath(ca_file))}\n" if ca_file else "")
        + (f"  proxy: {q(proxy)}\n" if proxy else "")
        + (f"  proxy_auth_file: {q(os.path.abspath(proxy_auth_file))}\n"
           if proxy_auth_file else "")
    )
    if commands is not None:
        text += yaml.safe_dump({"commands": commands}, sort_keys=True,
                               default_flow_style=False)
    return text


def read_commands(path: Optional[str]) -> Optional[Any]:
    """The ``--commands`` file's mapping (checked later with the whole config), or None."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ProvisionError(EXIT_INPUT, f"--commands: cannot read {path}: {exc.strerror}"
                             ) from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ProvisionError(EXIT_INPUT, f"--commands: {path} is not valid YAML") from None
    if isinstance(raw, dict) and set(raw) == {"commands"}:
        raw = raw["commands"]  # a config's whole section, pasted as it is
    if not isinstance(raw, dict):
        raise ProvisionError(EXIT_INPUT, f"--commands: {path} must hold a mapping with "
                             "allow: (the config's commands: section)")
    return raw


def owners() -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
    """(token owner, config owner) as (uid, gid): the service user's when root runs this and
    the user exists, else None (files stay with whoever runs this, mode 0600)."""
    if os.geteuid() != 0:
        return None, None
    import pwd

    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None, None
    return (user.pw_uid, user.pw_gid), (0, user.pw_gid)


def is_example(text: str) -> bool:
    """True when ``text`` is the unedited example config a package installs."""
    for path in EXAMPLES:
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    return True
        except OSError:
            continue
    return False


def write_atomic(path: str, data: str, owner: Optional[Tuple[int, int]] = None,
                 mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file; ``owner``
    (uid, gid) and ``mode`` are set before the rename, so it is never readable by others."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".provision-")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def check_server(url: str, token: Optional[str], ca_file: Optional[str] = None,
                 timeout: float = 10.0, proxy: Optional[str] = None,
                 proxy_auth_file: Optional[str] = None,
                 client: Optional[Tuple[str, str, Optional[str]]] = None) -> None:
    """ProvisionError unless the server at ``url`` welcomes ``token`` (or the client
    certificate ``client``)."""
    from .transport import AuthRefused, open_welcomed

    try:
        open_welcomed(url, token, ca_file, timeout, proxy, proxy_auth_file, client).close()
    except AuthRefused as exc:
        raise ProvisionError(EXIT_AUTH, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS and timeouts all mean "unreachable"
        raise ProvisionError(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}") from None


def provision(args: argparse.Namespace) -> str:
    config_path = os.path.abspath(args.config)
    folder = os.path.dirname(config_path)
    claiming = bool(args.claim or args.claim_file)
    if claiming and (args.token_file or args.client_cert or args.client_key):
        raise ProvisionError(EXIT_INPUT, "--claim takes no --token-file, --client-cert or "
                             "--client-key: the claim gives the device its certificate")
    if claiming and not args.server.startswith("wss://"):
        # Checked before the claim: the config check below cannot see the certificate yet,
        # and a claimed id is spent for good.
        raise ProvisionError(EXIT_INPUT, "--server: a claim needs a wss:// server (the "
                             "claimed certificate is presented in TLS)")
    if bool(args.client_cert) != bool(args.client_key):
        raise ProvisionError(EXIT_INPUT, "--client-cert and --client-key go together")
    if not args.token_file and not args.client_cert and not claiming:
        raise ProvisionError(EXIT_INPUT, "--token-file, or --client-cert with --client-key, "
                             "is required")
    token_path = os.path.join(folder, "token") if args.token_file else None
    client = (os.path.join(folder, "device.pem"), os.path.join(folder, "device.key")) \
        if args.client_cert or claiming else None
    proxy_auth_path = os.path.join(folder, "proxy-auth") if args.proxy_auth_file else None
    text = render_config(args.device_id, args.server, token_path, args.state_dir, args.ca_file,
                         read_commands(args.commands), args.proxy, proxy_auth_path, client)
    # Checked with the certificate and key where they are now (the checks read them);
    # written with where they are copied to.
    checked = text if client is None else render_config(
        args.device_id, args.server, token_path, args.state_dir, args.ca_file,
        read_commands(args.commands), args.proxy, proxy_auth_path,
        None if claiming else (os.path.abspath(args.client_cert),
                               os.path.abspath(args.client_key)))
    try:
        config_mod.build(yaml.safe_load(checked), config_path)
    except ConfigError as exc:
        option = {"device_id": "--device-id", "server.url": "--server",
                  "state_dir": "--state-dir", "server.ca_file": "--ca-file",
                  "server.proxy": "--proxy",
                  "server.client_cert": "--client-cert"}.get(exc.key, exc.key)
        if exc.key.startswith("commands"):
            option = f"--commands: {exc.key}"
        raise ProvisionError(EXIT_INPUT, f"{option}: {exc.reason}") from None
    if claiming:
        assert client is not None
        return _provision_by_claim(args, config_path, text, client)
    secrets: Dict[str, str] = {}
    if token_path:
        secrets[token_path] = _read_secret(read_token, args.token_file, "--token-file")
    if client:
        secrets[client[0]] = _read_pem(args.client_cert, "--client-cert", "CERTIFICATE")
        _read_secret(check_token_file, args.client_key, "--client-key")  # 0600, like a token
        secrets[client[1]] = _read_pem(args.client_key, "--client-key", "PRIVATE KEY")
        _check_pair(args.client_cert, args.client_key)
    if proxy_auth_path:
        creds = _read_secret(read_proxy_auth, args.proxy_auth_file, "--proxy-auth-file")
        secrets[proxy_auth_path] = ":".join(creds)
    existing = _existing_config(config_path, text, args.force)
    if not args.no_check:
        check_server(args.server, secrets[token_path] if token_path else None, args.ca_file,
                     proxy=args.proxy, proxy_auth_file=args.proxy_auth_file,
                     client=(args.client_cert, args.client_key, None) if client else None)
    _write_files(config_path, text, existing, secrets)
    return config_path


_PEM_BEGIN = {"CERTIFICATE": ("-----BEGIN CERTIFICATE-----",),
              "PRIVATE KEY": ("-----BEGIN PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----",
                              "-----BEGIN RSA PRIVATE KEY-----")}


def _read_pem(path: str, option: str, kind: str) -> str:
    """A PEM file's text (a certificate, or an unencrypted key), stripped; ProvisionError
    naming the option when it is not one."""
    try:
        text = read_bounded(path, 64 * 1024, option).decode("ascii")
    except AuthError as exc:  # unreadable, or too large for a PEM file
        raise ProvisionError(EXIT_INPUT, str(exc)) from None
    except UnicodeDecodeError:
        text = ""
    if "ENCRYPTED" in text:
        raise ProvisionError(EXIT_INPUT, f"{option}: {path} is encrypted; provision an "
                             "unencrypted key (the service reads it unattended; mode 0600 "
                             "protects it)")
    if not any(b in text for b in _PEM_BEGIN[kind]):
        raise ProvisionError(EXIT_INPUT, f"{option}: {path} is not a PEM {kind.lower()}")
    return text.strip()


def _check_pair(cert: str, key: str) -> None:
    """ProvisionError unless ``key`` is the private key of ``cert``: local (no server), so
    --no-check does not write a pair that no TLS handshake can use."""
    why = _pair_problem(cert, key)
    if why:
        raise ProvisionError(EXIT_INPUT, f"--client-key: {key} is not the key of "
                             f"--client-cert {cert} ({why})")


def _pair_problem(cert: str, key: str) -> Optional[str]:
    """Why ``key`` and ``cert`` cannot be used together in TLS (ssl's own check), or None."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        return str(exc.reason or exc)
    return None


def _existing_config(config_path: str, text: str, force: bool) -> Optional[str]:
    """The config now at ``config_path`` (None: none); ProvisionError when it has other
    settings and may not be replaced."""
    try:
        with open(config_path, encoding="utf-8") as f:
            existing: Optional[str] = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProvisionError(EXIT_FS, f"{config_path}: {exc.strerror}") from None
    if existing is not None and existing != text and not force and not is_example(existing):
        raise ProvisionError(EXIT_CONFLICT, f"{config_path} exists with other settings; "
                             "re-run with --force to replace it")
    return existing


def _provision_by_claim(args: argparse.Namespace, config_path: str, text: str,
                        client: Tuple[str, str]) -> str:
    """A key made here, a certificate claimed with it, both written beside the config, then
    the config. Already provisioned the same way (the same config, the files there): done."""
    existing = _existing_config(config_path, text, args.force)
    if existing == text and all(os.path.exists(path) for path in client):
        return config_path  # claimed before: a device id is claimed once
    token = args.claim or _read_secret(read_token, args.claim_file, "--claim-file")
    with tempfile.TemporaryDirectory(prefix="nexus-claim-") as work:  # 0700
        key_path = _claim_key(os.path.dirname(config_path), work)
        csr = _request(key_path, work)
        certificate = claim(args.server, token, args.device_id, csr, args.ca_file,
                            proxy=args.proxy, proxy_auth_file=args.proxy_auth_file)
        cert_path = os.path.join(work, "device.pem")
        with open(cert_path, "w", encoding="ascii") as f:
            f.write(certificate)
        _check_claimed(cert_path, key_path, args.device_id)
        if not args.no_check:  # the new certificate opens a connection, as the agent's will
            check_server(args.server, None, args.ca_file, proxy=args.proxy,
                         proxy_auth_file=args.proxy_auth_file,
                         client=(cert_path, key_path, None))
        with open(key_path, encoding="ascii") as f:
            key = f.read().strip()
    _write_files(config_path, text, existing, {client[0]: certificate.strip(), client[1]: key})
    try:
        os.unlink(key_path)  # now device.key
    except OSError:
        pass
    return config_path


CLAIM_KEY = ".claim.key"  # beside the config until the claim is answered


def _claim_key(folder: str, work: str) -> str:
    """The key a claim is made with: ``folder/.claim.key``, made by the ``openssl`` command
    (P-256, 0600) the first time and kept until the claim succeeds, so a device whose
    answer was lost (a dropped connection, a power cut) repeats its claim with the same
    key, which the server accepts, instead of finding its id spent."""
    path = os.path.join(folder, CLAIM_KEY)
    if not os.path.exists(path):
        new = os.path.join(work, "new.key")
        if _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", new) is None:
            raise ProvisionError(EXIT_FS, "openssl could not make a key")
        with open(new, encoding="ascii") as f:
            write_atomic(path, f.read())  # 0600, fsynced: it must outlive a power cut
    try:
        check_token_file(path, "claim key")
    except AuthError as exc:
        raise ProvisionError(EXIT_FS, str(exc)) from None
    return path


def _request(key_path: str, work: str) -> str:
    """A certificate request signed with ``key_path``. Its name is a placeholder: the
    server names the certificate after the claimed device id."""
    csr = os.path.join(work, "device.csr")
    if _openssl("req", "-new", "-key", key_path, "-out", csr, "-subj", "/CN=nexus-claim") \
            is None:
        raise ProvisionError(EXIT_FS, f"openssl could not make a request with {key_path} "
                             "(delete it to start over with a new key)")
    with open(csr, encoding="ascii") as f:
        return f.read()


def _check_claimed(cert_path: str, key_path: str, device_id: str) -> None:
    """ProvisionError (exit 4) unless the certificate at ``cert_path`` holds the public key
    of ``key_path`` and names ``device_id`` by its SAN URI (certinfo): a server that
    answers with anything else would lock the device into files a re-run keeps (a device
    id is claimed once)."""
    from . import certinfo

    facts = certinfo.read(cert_path)
    if _pair_problem(cert_path, key_path) or facts is None or facts.device_id != device_id \
            or not facts.by_uri:  # a claimed certificate names its device by SAN URI
        raise ProvisionError(EXIT_UNREACHABLE, "the server's certificate is not this "
                             f"device's (its key, named {device_id}): nothing written")


def _openssl(*argv: str) -> Optional[str]:
    """What ``openssl argv`` prints; None when it fails. Without the command: exit 2."""
    import subprocess

    try:
        return subprocess.run(["openssl", *argv], check=True, capture_output=True, text=True,
                              timeout=60).stdout
    except FileNotFoundError:
        raise ProvisionError(EXIT_INPUT, "provisioning by claim needs the openssl command "
                             "(Debian package openssl)") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None


def claim(url: str, token: str, device_id: str, csr: str, ca_file: Optional[str] = None,
          timeout: float = 10.0, proxy: Optional[str] = None,
          proxy_auth_file: Optional[str] = None) -> str:
    """The certificate the server signs for ``device_id`` (``device.claim``); ProvisionError
    with the server's reason (exit 5) or why it could not be asked (exit 4)."""
    from . import protocol as p
    from .transport import AuthRefused, open_welcomed

    try:
        ws = open_welcomed(url, token, ca_file, timeout, proxy, proxy_auth_file)
    except AuthRefused as exc:
        raise ProvisionError(EXIT_AUTH, f"the claim token was refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS and timeouts: "unreachable"
        raise ProvisionError(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}") from None
    try:
        msg = p.make(p.DEVICE_CLAIM, time.time(), {"device_id": device_id, "csr": csr})
        ws.send(p.encode(msg))
        reply = p.decode(ws.recv())
    except Exception as exc:  # noqa: BLE001 - a close, a timeout, a bad frame
        raise ProvisionError(EXIT_UNREACHABLE, f"no answer to the claim: {exc}") from None
    finally:
        ws.close()
    if reply.type == "error":
        error = p.parse_error(reply)
        raise ProvisionError(EXIT_AUTH, f"the server refused the claim: {error.message}")
    payload = reply.payload if isinstance(reply.payload, dict) else {}
    certificate = payload.get("certificate")
    if reply.type != p.DEVICE_CLAIMED or not isinstance(certificate, str) or \
            "-----BEGIN CERTIFICATE-----" not in certificate or len(certificate) > 64 * 1024:
        raise ProvisionError(EXIT_UNREACHABLE, f"unexpected answer to the claim: {reply.type}")
    return certificate


def _read_secret(read: Callable[[str], Any], path: str, option: str) -> Any:
    try:
        return read(path)
    except AuthError as exc:
        raise ProvisionError(EXIT_INPUT, f"{option}: {exc}") from None


def _write_files(config_path: str, text: str, existing: Optional[str],
                 secrets: Dict[str, str]) -> None:
    """The secrets (token, proxy credentials) for the agent's user, then the config."""
    secret_owner, config_owner = owners()
    config_mode = 0o600 if config_owner is None else 0o640
    try:
        for path, secret in secrets.items():
            write_atomic(path, secret + "\n", secret_owner)
        if existing != text:
            write_atomic(config_path, text, config_owner, config_mode)
        else:
            if config_owner is not None:
                os.chown(config_path, *config_owner)
            os.chmod(config_path, config_mode)
    except OSError as exc:
        raise ProvisionError(EXIT_FS, f"cannot write {exc.filename or config_path}: "
                             f"{exc.strerror}") from None


def main(argv: List[str]) -> int:
    from .cli import plain

    ap = argparse.ArgumentParser(prog="nexus-agent provision", description=plain(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-id", required=True)
    ap.add_argument("--server", required=True, help="ws:// or wss:// URL of /v1/ws")
    ap.add_argument("--token-file", help="file holding the device's token (mode 0600); it is "
                    "copied to 'token' beside the config (optional with --client-cert)")
    ap.add_argument("--client-cert", metavar="PEM", help="the device's certificate (mTLS); "
                    "copied to 'device.pem' beside the config")
    ap.add_argument("--client-key", metavar="KEY", help="its unencrypted private key (mode "
                    "0600); copied to 'device.key' beside the config")
    ap.add_argument("--config", default="/etc/nexus/agent.yaml")
    ap.add_argument("--state-dir", default="/var/lib/nexus-agent")
    claim = ap.add_mutually_exclusive_group()
    claim.add_argument("--claim", metavar="TOKEN", help="a claim token: claim a certificate "
                       "for --device-id with a key made here (shows in ps: prefer "
                       "--claim-file)")
    claim.add_argument("--claim-file", metavar="FILE", help="file holding the claim token "
                       "(mode 0600)")
    ap.add_argument("--ca-file", help="PEM CA file for a wss:// server with a private CA")
    ap.add_argument("--proxy", metavar="URL", help="HTTP proxy, http://host:port (written "
                    "as server.proxy; default: https_proxy/http_proxy from the environment)")
    ap.add_argument("--proxy-auth-file", metavar="FILE", help="file holding the proxy's "
                    "user:password (mode 0600); copied to 'proxy-auth' beside the config, "
                    "like the token")
    ap.add_argument("--commands", metavar="FILE", help="YAML file with the allow-list (the "
                    "config's commands: section) to write into the config; without it the "
                    "device takes no remote commands")
    ap.add_argument("--force", action="store_true", help="replace a config with other settings")
    ap.add_argument("--no-check", action="store_true",
                    help="do not check the token against the server (offline provisioning)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return EXIT_INPUT if exc.code else EXIT_OK
    start = time.monotonic()
    try:
        path = provision(args)
    except ProvisionError as exc:
        print(f"nexus-agent provision: {exc}", file=sys.stderr)
        return exc.code
    print(f"nexus-agent provision: {path} ready for {args.device_id} "
          f"({time.monotonic() - start:.1f} s)")
    return EXIT_OK

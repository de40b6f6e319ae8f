"""TLS for the Flower transport of federated rounds: a private CA per server home and a certificate for its SuperLink.

Updates are signed and bundles signed and sealed end to end anyway (privacy/fedupdate.py); TLS adds that nobody
on the network reads the round's metadata (headers, DP-noised update vectors, ciphertexts) or its settings, and
that a device talks to the server whose CA it was given. No public CA is involved: the server device makes its
own CA once (home/federation/tls/ca.pem, its key never leaves that directory) and a certificate for the names and
addresses its SuperLink listens on; each device is given ca.pem out of band, like the signing keys it trusts:

    laptop$ ownlm federate server --user me --host 192.168.1.5 ...   # prints the CA file and its sha256
    phone$  ownlm federate join --user me --superlink 192.168.1.5:9091 --ca laptop-ca.pem

Written with `cryptography` (already a dependency for signing) rather than shelling out to openssl, which a
fresh machine may not have.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ownlm.errors import ConfigError

CERT_DAYS = 825  # the server certificate; re-issued whenever the names it must cover change
CA_DAYS = 3650


@dataclass(frozen=True)
class ServerTLS:
    ca: Path  # the CA certificate devices verify the SuperLink with (give this file to them)
    cert: Path  # the SuperLink's certificate, signed by the CA
    key: Path  # its private key (0600)

    def ca_sha256(self) -> str:
        return ca_fingerprint(self.ca)


def tls_dir(home: Path) -> Path:
    return Path(home) / "federation" / "tls"


def ca_fingerprint(ca: Path) -> str:
    """sha256 of the CA certificate's DER bytes, to compare over the phone before trusting the file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(Path(ca).read_bytes()).public_bytes(Encoding.DER)).hexdigest()


def _names(hosts: list[str]) -> list:
    from cryptography import x509

    out, seen = [], set()
    for h in ["127.0.0.1", "localhost", *hosts]:
        if h in seen or h in ("0.0.0.0", "::", ""):  # a wildcard listen address is not a name anyone dials
            continue
        seen.add(h)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    from ownlm.fsutil import atomic_write

    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # atomic_write: 0600


def _load_or_make_ca(d: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ownlm.fsutil import atomic_write

    if (d / "ca.pem").is_file() and (d / "ca.key").is_file():
        try:
            return (x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()),
                    serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None))
        except ValueError:
            raise ConfigError(f"the federation CA in {d} is damaged",
                              hint=f"remove {d} to make a new one, and give the new ca.pem to every device") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ownlm federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(d / "ca.key", key)
    atomic_write(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key


def server_tls(home: Path, hosts: list[str]) -> ServerTLS:
    """The CA (made once) and a SuperLink certificate covering 127.0.0.1, localhost and `hosts` (re-issued when
    they change); returns the three paths Flower's `--ssl-*` flags take."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ownlm.fsutil import atomic_write, mkdir_private

    d = tls_dir(home)
    mkdir_private(d)
    ca_cert, ca_key = _load_or_make_ca(d)
    names = _names(hosts)
    files = ServerTLS(d / "ca.pem", d / "server.pem", d / "server.key")
    if files.cert.is_file() and files.key.is_file():
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
            if set(san) == set(names) and cert.issuer == ca_cert.subject and fresh:
                return files
        except (ValueError, x509.ExtensionNotFound):
            pass  # damaged or not ours: issue a new one below
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ownlm federation server")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(files.key, key)
    atomic_write(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files


def check_ca_file(path: Path) -> Path:
    """A CA certificate file a device was given (PEM); ConfigError that says what to do for anything else."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        raise ConfigError(f"{path} is not a PEM certificate",
                          hint="pass the ca.pem the federation server printed (home/federation/tls/ca.pem there)") from None
    return Path(path).resolve()

"""privacy/fedtls.py: the federation CA is made once per home, the SuperLink certificate covers the names it must
and is re-issued when they change, and damaged or wrong files get an error that says what to do."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509

from ownlm.errors import ConfigError
from ownlm.privacy import fedtls


def _san(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {str(v.value) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def test_the_ca_is_kept_and_the_server_certificate_follows_the_hosts(tmp_path):
    first = fedtls.server_tls(tmp_path, ["192.168.1.5", "0.0.0.0"])
    assert _san(first.cert) == {"127.0.0.1", "localhost", "192.168.1.5"}  # a wildcard listen address is no name
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600 and stat.S_IMODE((first.ca.parent / "ca.key").stat().st_mode) == 0o600
    ca_sha, cert_bytes = first.ca_sha256(), first.cert.read_bytes()
    assert fedtls.server_tls(tmp_path, ["192.168.1.5"]).cert.read_bytes() == cert_bytes  # same names: kept
    again = fedtls.server_tls(tmp_path, ["laptop.local"])
    assert _san(again.cert) == {"127.0.0.1", "localhost", "laptop.local"} and again.ca_sha256() == ca_sha  # one CA
    ca = x509.load_pem_x509_certificate(again.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate(again.cert.read_bytes())
    leaf.verify_directly_issued_by(ca)


def test_damaged_files_say_what_to_do(tmp_path):
    tls = fedtls.server_tls(tmp_path, [])
    (tls.ca.parent / "ca.key").write_text("garbage")
    with pytest.raises(ConfigError, match="damaged") as e:
        fedtls.server_tls(tmp_path, [])
    assert "remove" in e.value.hint
    junk = tmp_path / "not-a-cert.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        fedtls.check_ca_file(junk)
    assert fedtls.check_ca_file(tls.ca) == tls.ca.resolve()

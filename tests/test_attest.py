"""Tier-2 attestation checks on real recorded Intel DCAP quotes (tests/data/dcap, see SOURCES.md), verified
offline with dcap-qvl at a pinned time; and the policy/binding logic on its own."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ownlm.privacy.attest import (
    AttestationPolicy, DcapVerifier, InsecureTestVerifier, report_data, verify_evidence,
)
from ownlm.errors import AttestationFailed, ConfigError

dcap_qvl = pytest.importorskip("dcap_qvl")

DATA = Path(__file__).parent / "data" / "dcap"
PINNED = 1750377600  # 2025-06-20 00:00 UTC, inside the recorded collateral's validity window
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
PUB = {"kem": "MLKEM768_X25519", "mlkem768": "AAAA", "x25519": "BBBB", "key_id": "0123456789abcdef"}


def evidence(name: str, quote: bytes | None = None) -> dict:
    raw = quote if quote is not None else (DATA / name).read_bytes()
    return {"type": "dcap", "quote": base64.b64encode(raw).decode(),
            "collateral": json.loads((DATA / f"{name}_collateral.json").read_text())}


def test_recorded_tdx_quote_verifies():
    claims = DcapVerifier().verify(evidence("tdx_quote"), PINNED)
    assert claims.tee == "TDX" and claims.tcb_status == "UpToDate" and claims.measurement == TDX_MRTD
    assert len(claims.report_data) == 64


def test_recorded_sgx_quote_verifies_with_its_advisories():
    claims = DcapVerifier().verify(evidence("sgx_quote"), PINNED)
    assert claims.tee == "SGX" and claims.report_data.startswith(b"Hello, world!")
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert set(claims.advisories) == {"INTEL-SA-00289", "INTEL-SA-00615"}


def test_tampered_quote_fails():
    raw = bytearray((DATA / "tdx_quote").read_bytes())
    raw[600] ^= 1  # a bit of the TD report (inside the signed body)
    with pytest.raises(AttestationFailed, match="does not verify"):
        DcapVerifier().verify(evidence("tdx_quote", bytes(raw)), PINNED)


def test_stale_collateral_fails():
    with pytest.raises(AttestationFailed, match="does not verify"):
        DcapVerifier().verify(evidence("tdx_quote"), PINNED + 365 * 86400)


def test_real_quote_that_does_not_bind_the_key_is_refused():
    """Genuine hardware evidence is not enough: its report data must be sha256(our trainer's key) || our nonce."""
    policy = AttestationPolicy(allowed_measurements=[TDX_MRTD], verification_time=PINNED)
    with pytest.raises(AttestationFailed, match="does not bind the trainer's public key"):
        verify_evidence(evidence("tdx_quote"), policy, DcapVerifier(), PUB, b"\x07" * 32)


def test_policy_checks_measurement_status_and_advisories():
    sgx = DcapVerifier().verify(evidence("sgx_quote"), PINNED)
    ev = evidence("sgx_quote")
    with pytest.raises(AttestationFailed, match="allow-list"):
        verify_evidence(ev, AttestationPolicy(allowed_measurements=[TDX_MRTD], verification_time=PINNED), DcapVerifier(), PUB, b"\0" * 32)
    with pytest.raises(AttestationFailed, match="TCB status ConfigurationAndSWHardeningNeeded"):
        verify_evidence(ev, AttestationPolicy(allowed_measurements=[sgx.measurement], verification_time=PINNED),
                        DcapVerifier(), PUB, b"\0" * 32)
    with pytest.raises(AttestationFailed, match="INTEL-SA-00615"):
        verify_evidence(ev, AttestationPolicy(allowed_measurements=[sgx.measurement], verification_time=PINNED,
                                              allowed_tcb_status=["ConfigurationAndSWHardeningNeeded"],
                                              reject_advisories=["INTEL-SA-00615"]), DcapVerifier(), PUB, b"\0" * 32)


def test_binding_and_nonce_with_the_test_verifier():
    nonce = bytes(range(32))
    ok = {"type": "insecure-test", "measurement": "aa" * 48, "report_data": report_data(PUB, nonce).hex()}
    policy = AttestationPolicy(allowed_measurements=["AA" * 48])
    assert verify_evidence(ok, policy, InsecureTestVerifier(), PUB, nonce).measurement == "aa" * 48
    with pytest.raises(AttestationFailed, match="nonce"):
        verify_evidence(ok, policy, InsecureTestVerifier(), PUB, b"\0" * 32)
    with pytest.raises(AttestationFailed, match="does not bind"):
        verify_evidence(ok, policy, InsecureTestVerifier(), {**PUB, "x25519": "CCCC"}, nonce)


def test_policy_file(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps({"allowed_measurements": [TDX_MRTD], "verification_time": PINNED}))
    assert AttestationPolicy.from_file(p).verifier == "dcap"
    p.write_text(json.dumps({"allowed_measurements": [TDX_MRTD], "verifier": "insecure-test"}))
    with pytest.raises(ConfigError, match="insecure-test"):
        AttestationPolicy.from_file(p)  # the test verifier cannot be chosen by configuration
    p.write_text(json.dumps({"allowed_measurements": []}))
    with pytest.raises(ConfigError, match="no measurement"):
        AttestationPolicy.from_file(p)

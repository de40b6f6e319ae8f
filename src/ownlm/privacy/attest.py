"""Attestation for privacy tier 2 (TEE): release training data only to a trainer whose hardware vouches for it.

The exchange, before any data leaves the node:
1. the node draws a fresh 32-byte nonce and asks the trainer for evidence (`GET /trainer/attestation?nonce=`);
2. the trainer returns evidence (for Intel TDX/SGX: a DCAP quote plus its collateral) whose 64-byte report
   data is `sha256(canonical JSON of its HPKE public key) || nonce` (`report_data`);
3. the node verifies the evidence with a `Verifier` (signature chain, TCB status), then checks it against its
   `AttestationPolicy` (allowed measurements, allowed TCB statuses, rejected advisories) and checks that the
   report data binds *this* public key and *this* nonce (`verify_evidence`);
4. only then does it seal the dataset to that key (HPKE), so only the attested code can open it.

Verifiers are pluggable (the `Verifier` protocol). `DcapVerifier` verifies Intel TDX/SGX DCAP quotes offline
with `dcap-qvl` against collateral carried in the evidence, at the policy's pinned time or now.
`InsecureTestVerifier` checks only the binding, measurement and nonce and trusts no hardware: it exists for
tests and can never be selected from a policy file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ownlm.errors import AttestationFailed, ConfigError

NONCE_BYTES = 32


def key_digest(pubkey_json: dict) -> bytes:
    """sha256 of the canonical JSON (sorted keys, no spaces) of an HPKE public key document."""
    return hashlib.sha256(json.dumps(pubkey_json, sort_keys=True, separators=(",", ":")).encode()).digest()


def report_data(pubkey_json: dict, nonce: bytes) -> bytes:
    """The 64 bytes a trainer's evidence must carry: sha256(public key JSON) || the node's nonce."""
    if len(nonce) != NONCE_BYTES:
        raise AttestationFailed(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}", hint="use a fresh random nonce")
    return key_digest(pubkey_json) + nonce


@dataclass(frozen=True)
class Claims:
    """What a verifier established from evidence."""

    tee: str  # "TDX", "SGX" or "insecure-test"
    measurement: str  # hex: MRTD for TDX, MRENCLAVE for SGX
    report_data: bytes  # 64 bytes
    tcb_status: str  # e.g. "UpToDate", "OutOfDate", "ConfigurationAndSWHardeningNeeded"
    advisories: tuple[str, ...] = ()


class Verifier(Protocol):
    """Turns evidence into claims, or raises AttestationFailed. `now` is the verification time (unix seconds)."""

    name: str

    def verify(self, evidence: dict, now: int) -> Claims: ...


@dataclass
class AttestationPolicy:
    """What the node accepts (a JSON file, `remote.attestation_policy` in settings)."""

    allowed_measurements: list[str] = field(
        default_factory=list, metadata={"help": "Hex MRTD (TDX) / MRENCLAVE (SGX) values of trainer builds you trust."})
    allowed_tcb_status: list[str] = field(
        default_factory=lambda: ["UpToDate"], metadata={"help": "TCB statuses accepted from the verifier."})
    reject_advisories: list[str] = field(
        default_factory=list, metadata={"help": "Intel advisory ids (INTEL-SA-...) that make evidence unacceptable."})
    verification_time: int | None = field(
        default=None, metadata={"help": "Pinned unix time for checking collateral validity (recorded evidence); None: now."})
    verifier: str = field(default="dcap", metadata={"help": "Verifier name: 'dcap' (Intel TDX/SGX via dcap-qvl)."})

    def __post_init__(self) -> None:
        if not self.allowed_measurements:
            raise ConfigError("attestation policy allows no measurement",
                              hint="list the trainer build's MRTD/MRENCLAVE in allowed_measurements")
        for m in self.allowed_measurements:
            try:
                bytes.fromhex(m)
            except ValueError:
                raise ConfigError(f"allowed measurement {m!r} is not hex", hint="copy it from the trainer build") from None
        self.allowed_measurements = [m.lower() for m in self.allowed_measurements]
        if not self.allowed_tcb_status:
            raise ConfigError("attestation policy allows no TCB status", hint='use ["UpToDate"]')

    @classmethod
    def from_file(cls, path: Path) -> "AttestationPolicy":
        try:
            doc = json.loads(Path(path).read_text())
            policy = cls(**doc)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read attestation policy {path} ({e})",
                              hint="a JSON object with allowed_measurements, allowed_tcb_status, ...") from None
        if policy.verifier not in VERIFIERS:
            raise ConfigError(f"attestation policy names verifier {policy.verifier!r}",
                              hint=f"use one of {', '.join(VERIFIERS)}")
        return policy


class DcapVerifier:
    """Intel TDX/SGX DCAP quotes, verified offline by `dcap-qvl` against the collateral in the evidence.

    Evidence: {"type": "dcap", "quote": base64 quote, "collateral": dcap-qvl QuoteCollateralV3 JSON (object or string)}.
    The collateral's own signatures chain to Intel's root CA (built into dcap-qvl); its validity window is
    checked at `now`.
    """

    name = "dcap"

    def verify(self, evidence: dict, now: int) -> Claims:
        try:
            import dcap_qvl
        except ImportError:
            raise AttestationFailed("the dcap-qvl package is not installed", hint="pip install dcap-qvl") from None
        try:
            quote = base64.b64decode(evidence["quote"], validate=True)
            coll = evidence["collateral"]
            collateral = dcap_qvl.QuoteCollateralV3.from_json(coll if isinstance(coll, str) else json.dumps(coll))
        except (KeyError, TypeError, ValueError) as e:
            raise AttestationFailed(f"DCAP evidence is malformed ({e})", hint="the trainer must send quote and collateral") from None
        try:
            verified = dcap_qvl.verify(quote, collateral, int(now))
        except (ValueError, RuntimeError) as e:
            raise AttestationFailed(f"the DCAP quote does not verify: {e}",
                                    hint="the evidence was altered, is stale, or comes from no genuine TEE") from None
        doc = json.loads(verified.to_json())
        (kind, rep), = doc["report"].items()
        if kind == "SgxEnclave":
            tee, measurement = "SGX", rep["mr_enclave"]
        elif kind.startswith("TD"):
            tee, measurement = "TDX", rep["mr_td"]
        else:
            raise AttestationFailed(f"unknown DCAP report kind {kind}", hint="upgrade dcap-qvl / ownlm")
        return Claims(tee, measurement.lower(), bytes.fromhex(rep["report_data"]), verified.status,
                      tuple(verified.advisory_ids))


class InsecureTestVerifier:
    """TEST ONLY: trusts the evidence's claims without any hardware signature.

    Evidence: {"type": "insecure-test", "measurement": hex, "report_data": hex, "tcb_status": str}. It still lets
    `verify_evidence` check the policy, the key binding and the nonce, so the tier-2 flow can be tested end to end
    on machines without a TEE. No policy file can select it.
    """

    name = "insecure-test"

    def verify(self, evidence: dict, now: int) -> Claims:
        if evidence.get("type") != "insecure-test":
            raise AttestationFailed(f"evidence type {evidence.get('type')!r} is not insecure-test evidence")
        try:
            return Claims("insecure-test", str(evidence["measurement"]).lower(), bytes.fromhex(evidence["report_data"]),
                          str(evidence.get("tcb_status", "UpToDate")))
        except (KeyError, ValueError) as e:
            raise AttestationFailed(f"test evidence is malformed ({e})") from None


VERIFIERS = {"dcap": DcapVerifier}  # selectable from a policy file (InsecureTestVerifier deliberately is not)


def verifier_for(policy: AttestationPolicy) -> Verifier:
    return VERIFIERS[policy.verifier]()


def verify_evidence(evidence: dict, policy: AttestationPolicy, verifier: Verifier, pubkey_json: dict, nonce: bytes) -> Claims:
    """Verify `evidence` and check it against `policy`, `pubkey_json` and `nonce`; AttestationFailed says why not."""
    if not isinstance(evidence, dict):
        raise AttestationFailed("the trainer sent no attestation evidence", hint="run the trainer in a TEE with attestation")
    now = policy.verification_time if policy.verification_time is not None else int(time.time())
    claims = verifier.verify(evidence, now)
    if claims.measurement not in policy.allowed_measurements:
        raise AttestationFailed(f"trainer measurement {claims.measurement[:24]}… is not in the policy's allow-list",
                                hint="add the trainer build's measurement to allowed_measurements if you trust it")
    if claims.tcb_status not in policy.allowed_tcb_status:
        raise AttestationFailed(f"trainer TCB status {claims.tcb_status} is not allowed (allowed: "
                                f"{', '.join(policy.allowed_tcb_status)})", hint="the trainer platform needs updates")
    bad = sorted(set(claims.advisories) & set(policy.reject_advisories))
    if bad:
        raise AttestationFailed(f"trainer platform is affected by rejected advisories {', '.join(bad)}",
                                hint="the trainer platform needs updates")
    expected = report_data(pubkey_json, nonce)
    if claims.report_data[:32] != expected[:32]:
        raise AttestationFailed("the evidence does not bind the trainer's public key (report data differs)",
                                hint="the key the trainer offered is not the attested one: refusing to seal data to it")
    if claims.report_data[32:64] != expected[32:]:
        raise AttestationFailed("the evidence does not carry this node's nonce (replayed or stale evidence)",
                                hint="ask the trainer for fresh evidence")
    return claims


class InsecureTestAttester:
    """TEST ONLY: the trainer side of InsecureTestVerifier: 'evidence' with the right binding and no hardware."""

    def __init__(self, measurement: str, tcb_status: str = "UpToDate"):
        self.measurement, self.tcb_status = measurement, tcb_status

    def evidence(self, pubkey_json: dict, nonce: bytes) -> dict:
        return {"type": "insecure-test", "measurement": self.measurement,
                "report_data": report_data(pubkey_json, nonce).hex(), "tcb_status": self.tcb_status}

"""Signing manifests: Ed25519 by default, ECDSA P-256 (the seed's choice) on request.

Keys are the `cryptography` objects; their public halves travel as PEM (SubjectPublicKeyInfo). A key id is
the first 16 hex digits of the sha256 of the DER public key, so a manifest names the key that signed it.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ownlm.artifact.manifest import signed_bytes
from ownlm.errors import ConfigError, SignatureError

ALGORITHMS = ("ed25519", "ecdsa-p256")


def generate(alg: str = "ed25519"):
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError(f"signing algorithm {alg!r} is not supported", hint=f"use one of {', '.join(ALGORITHMS)}")


def alg_of(key) -> str:
    pub = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1):
        return "ecdsa-p256"
    raise ConfigError(f"unsupported signing key type {type(pub).__name__}", hint=f"use one of {', '.join(ALGORITHMS)}")


def public_pem(key) -> str:
    pub = key.public_key() if hasattr(key, "private_bytes") else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id(key) -> str:
    pub = key.public_key() if hasattr(key, "private_bytes") else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def load_public(pem: str | bytes):
    try:
        pub = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key ({e})", hint="export it with `ownlm keys public`") from None
    alg_of(pub)
    return pub


def sign_manifest(manifest: dict, private_key) -> dict:
    """Return the manifest with its `signature` field set (the input is not changed)."""
    data = signed_bytes(manifest)
    alg = alg_of(private_key)
    sig = private_key.sign(data) if alg == "ed25519" else private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    return {**manifest, "signature": {"alg": alg, "key_id": key_id(private_key), "value": base64.b64encode(sig).decode()}}


def verify_manifest(manifest: dict, trusted: dict[str, object]) -> str:
    """Check the signature against `trusted` (key id -> public key). Returns the signer's key id."""
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or not {"alg", "key_id", "value"} <= set(sig) or not all(
            isinstance(sig[k], str) for k in ("alg", "key_id", "value")):
        raise SignatureError("the manifest is not signed", hint="sign it with `ownlm bundle` on the trainer")
    pub = trusted.get(sig["key_id"])
    if pub is None:
        raise SignatureError(
            f"the model was signed by key {sig['key_id']}, which this node does not trust",
            hint="trust the trainer's public key for the user: `ownlm trust add FILE --user NAME`",
        )
    if alg_of(pub) != sig["alg"]:
        raise SignatureError(f"signature algorithm {sig['alg']} does not match trusted key {sig['key_id']}")
    try:
        value = base64.b64decode(sig["value"], validate=True)
        data = signed_bytes(manifest)
        if sig["alg"] == "ed25519":
            pub.verify(value, data)
        else:
            pub.verify(value, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise SignatureError("the manifest's signature is invalid", hint="the manifest was altered after signing") from None
    return sig["key_id"]

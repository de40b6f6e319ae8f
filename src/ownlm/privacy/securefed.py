"""Tier-3 federated rounds: the devices' side of a round whose aggregator only ever adds CKKS ciphertexts.

The person's CKKS key pair (privacy/secure_agg.py) must be the same on every device of the round, and its secret
half must never reach the aggregator. It is made on one device and handed to the others sealed to each one's node
key (the bundle format: ML-KEM-768 + X25519 HPKE) and signed with the person's key on the exporting device:

    laptop$ ownlm federate key init --user me                                   # once: the pair is made here
    phone$  ownlm node pubkey > phone-node.json
    laptop$ ownlm federate key export --user me --to phone-node.json --out me.hekey
    phone$  ownlm federate key import me.hekey --user me      # checks the signature (a trusted key for me), stores it

In a secure round (RoundSpec.secure; `ownlm federate server --secure`):
  device:  fedupdate.make_update encrypts the weighted update under the person's public context;
  server:  secure_agg.SecureSum adds them (federation.server_round); it holds no secret key and sends each device
           the encrypted sum, the summed weight and what every device needs to build the same model;
  device:  `install_secure_sum` decrypts with its secret key, divides, re-quantizes to lora1, makes a bundle sealed to
           itself and signed with its own key for the person, and installs it through fedupdate.install_aggregate
           (the same round check and the same quality gate as any aggregate). Every device decrypts the same
           ciphertext with the same key and uses the server's `created` time, so every device installs the same
           model id with the same weights.
What the server sees: signed headers (counts, layout, the device's node key; no losses at tier 3), ciphertexts and
the person's public context; tests/test_federation.py checks the bytes it received.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ownlm.errors import ConfigError, CorruptArtifact, InvalidInput, UpdateRefused
from ownlm.privacy import secure_agg as sa
from ownlm.settings import Settings
from ownlm.store import Store, User

KEY_KIND = "ownlm.he_key"
KEY_FILES = ("he_key.json", "secret.ctx", "public.ctx")


def init_keys(store: Store, user: User) -> sa.Keys:
    """The person's CKKS key pair on this device, made now if this device has none (the first device only)."""
    return sa.person_keys(store, user.id)


def device_keys(store: Store, user: User) -> sa.Keys:
    """The person's key pair as this device holds it; ConfigError when it was never made or imported here."""
    return sa.device_keys(store, user.id, user.name)


def export_keys(store: Store, user: User, recipient: dict) -> bytes:
    """The person's key pair sealed to another device's node key (its `ownlm node pubkey` JSON), signed here."""
    from ownlm.artifact.manifest import canonical
    from ownlm.artifact.seal import load_public, seal
    from ownlm.artifact.sign import sign_manifest

    keys = device_keys(store, user)
    _, rid = load_public(recipient)  # a malformed recipient fails here, before anything is sealed
    doc = {"kind": KEY_KIND, "version": 1, "user": user.name, "key_id": keys.key_id, "recipient": rid,
           "params": store.he_key_params(user.id),
           "secret_sha256": hashlib.sha256(keys.secret).hexdigest(), "public_sha256": hashlib.sha256(keys.public).hexdigest()}
    signed = sign_manifest(doc, store.signing_key(user.id))
    data = seal({"he_key.json": canonical(signed), "secret.ctx": keys.secret, "public.ctx": keys.public}, recipient)
    with store.tx() as db:
        store.audit(db, user.id, "he_key_exported", key_id=keys.key_id, recipient=rid)
    return data


def import_keys(store: Store, user: User, data: bytes) -> str:
    """Open a key file `export_keys` sealed to this device, check who signed it, and keep the pair; returns its id.

    The signer must be a key this device trusts for the user (the same trust federated updates need). A device
    that already holds another pair keeps it: keys are never silently replaced."""
    from ownlm.artifact.seal import open_bundle
    from ownlm.artifact.sign import verify_manifest

    files = open_bundle(data, store.node_key())  # WrongRecipient / CorruptArtifact for a file not sealed to us
    if set(files) != set(KEY_FILES):
        raise CorruptArtifact("not an ownlm key file", hint="pass the file `ownlm federate key export` wrote")
    try:
        doc = json.loads(files["he_key.json"])
    except ValueError:
        raise CorruptArtifact("the key file's description is not JSON", hint="export the key again") from None
    if not isinstance(doc, dict) or doc.get("kind") != KEY_KIND or doc.get("user") != user.name:
        raise InvalidInput(f"this key file is not a tier-3 key for {user.name}", hint="export it for this user")
    verify_manifest(doc, store.signers_for(user.id))  # SignatureError: trust the exporting device's key first
    secret, public = files["secret.ctx"], files["public.ctx"]
    if (hashlib.sha256(secret).hexdigest(), hashlib.sha256(public).hexdigest()) != (doc["secret_sha256"], doc["public_sha256"]):
        raise CorruptArtifact("the key file's contexts do not match what was signed", hint="export the key again")
    sa.public_context(public)  # refuses a "public" context that carries a secret key
    if sa.public_id_of(secret) != doc["key_id"] or sa.context_id(public) != doc["key_id"]:
        raise CorruptArtifact("the key file's secret and public contexts are not one pair", hint="export the key again")
    held = store.he_keys(user.id)
    if held is not None:
        if sa.context_id(held[1]) == doc["key_id"]:
            return doc["key_id"]  # already here
        raise ConfigError(f"this device already holds another tier-3 key ({sa.context_id(held[1])}) for {user.name}",
                          hint="export the key from this device to the others instead, so every device has the same")
    params = doc.get("params")
    if not isinstance(params, dict):
        raise CorruptArtifact("the key file does not say which CKKS parameters its keys use",
                              hint="export the key again with this version of ownlm")
    store.save_he_keys(user.id, secret, public, doc["key_id"], {**params, "imported": True})
    with store.tx() as db:
        store.audit(db, user.id, "he_key_imported", key_id=doc["key_id"])
    return doc["key_id"]


def install_secure_sum(store: Store, settings: Settings, user: User, round_id: str, total: bytes, weight: float,
                       fed: dict, work: Path, base_name: str, *, gate: bool = True):
    """Decrypt the round's encrypted sum here, build the aggregate and install it; returns node.InstallResult.

    `fed` is what the server sends every device: {version, created, devices, weights, layout, dp (each device's
    signed DP budget)}. The round's own
    settings (method, r, alpha, base) and what this device sent (layout, dataset root) come from this device's
    record of the round, not from the server."""
    from ownlm.artifact.bundle import make_bundle
    from ownlm.bitdelta import save_delta
    from ownlm.privacy import aggregate as agg
    from ownlm.privacy import fedupdate as fu

    sent = fu.sent_round(settings, user, round_id)
    spec = fu.RoundSpec.from_json(sent["spec"])
    try:
        layout = agg.Layout.from_json(fed["layout"])
        version, created = int(fed["version"]), float(fed["created"])
        devices, weights, budgets = list(fed["devices"]), dict(fed["weights"]), dict(fed["dp"])
        dp = fu.combined_dp(budgets)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UpdateRefused(f"the server's description of round {round_id} is malformed ({e})",
                            hint="rerun the round with an ownlm federation server") from None
    asked = spec.dp_epsilon
    if set(budgets) != set(devices) or (asked is not None and not (dp and dp["epsilon"] is not None
                                                                    and dp["epsilon"] <= asked * (1 + 1e-9))):
        raise UpdateRefused(f"the server's privacy budgets of round {round_id} do not fit the round"
                            + (f" (ε ≤ {asked})" if asked is not None else ""),
                            hint="rerun the round with an ownlm federation server")
    if layout.sha256 != sent["layout_sha256"]:
        raise UpdateRefused("the encrypted sum is for another adapter layout than this device's update",
                            hint="every device of a round must train the same LoRA layout")
    if version <= store.max_version(user.id):
        raise UpdateRefused(f"the round's version {version} is not newer than this device's models",
                            hint="rerun the round: the server numbers it after every device's newest model")
    keys = device_keys(store, user)
    if sa.read_header(total).get("context") != keys.key_id:
        raise UpdateRefused("the sum was not encrypted under this person's key", hint="every device must import the same key")
    mean = sa.decrypt_mean(keys.secret, total, weight, layout.dim)
    factors = agg.to_factors(spec.method, layout.unflatten(mean), spec.r)
    save_delta(agg.to_delta(factors, spec.r, spec.alpha, spec.base_sha256), work / "delta")
    latest = store.models(user.id)
    report = {"samples": int(round(weight)), "heldout_loss_personal": None,
              "dataset": {"merkle_root": sent["merkle_root"]}, "dp": dp}
    data, _ = make_bundle(
        delta_dir=work / "delta", report=report, user_name=user.name, signing_key=store.signing_key(user.id),
        recipient=store.node_key().public_json(), base_name=base_name, version=version,
        previous=latest[0]["id"] if latest else None, created_at=created,
        federation={"round": round_id, "method": spec.method, "devices": devices, "weights": weights,
                    "secure": True, "key_id": keys.key_id})
    return fu.install_aggregate(store, settings, user, data, round_id, gate=gate)

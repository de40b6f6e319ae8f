"""The manifest of a personal model: the seed's storage-format fields, as canonical JSON.

The signature covers the canonical JSON of the manifest without its `signature` field. Canonical means:
keys sorted, no insignificant whitespace, UTF-8 — the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from ownlm.errors import CorruptArtifact

FORMAT = "ownlm-manifest/1"


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_bytes(manifest: dict) -> bytes:
    return canonical({k: v for k, v in manifest.items() if k != "signature"})


def model_id(when: float) -> str:
    """`pm_YYYY_MM_DD_HH_MM` (UTC), as in the seed."""
    return "pm_" + datetime.fromtimestamp(when, timezone.utc).strftime("%Y_%m_%d_%H_%M")


def build_manifest(
    *,
    user: str,
    base_name: str,
    base_sha256: str,
    files: dict[str, bytes],
    delta_meta: dict,
    training: dict,
    merkle_root: str,
    version: int,
    previous: str | None,
    created_at: float | None = None,
    merge: dict | None = None,
    federation: dict | None = None,
) -> dict:
    """A manifest for the payload `files` (name -> bytes). `delta_meta` is the bitdelta delta.json.

    `training`: samples, tokens, duration_s, loss, heldout_loss_base, heldout_loss_personal, resumed_from_step (from
    the report), and `dp` when the adapter was trained with differential privacy: the budget spent (epsilon, delta,
    noise multiplier, clip norm, accountant, steps, sample rate, unit; learn/dp.py Budget). Signed like the rest.
    `merge` (a merged model, node/merge.py): {"method", "weights", "density", "rank", ..., "sources": [one per
    source model], "data": [{"user_id", "merkle_root"}, ...]}; `merge["data"]` also becomes `dataset.sources`,
    the training data roots of every source (their own sources included), which the right to delete checks
    (store.models.training_roots).
    `federation`: for the aggregate of a federated round, {round, method, devices, weights} (signed with the rest).
    """
    now = created_at or time.time()
    scales = delta_meta.get("scales")
    train_fields = ("samples", "tokens", "duration_s", "loss", "heldout_loss_base", "heldout_loss_personal",
                    "resumed_from_step")
    manifest = {
        "format": FORMAT,
        "model": {"id": f"{model_id(now)}_v{version}", "user": user, "base": base_name, "base_sha256": base_sha256},
        "bitdelta": {
            "size": sum(len(b) for b in files.values()),
            "mode": delta_meta.get("mode"),
            "bits": delta_meta.get("bits", 1),
            "scales": scales,
            "target_modules": delta_meta.get("target_modules"),
        },
        "training": {k: training.get(k) for k in train_fields},
        "dataset": {"merkle_root": merkle_root},
        "versioning": {"version": version, "previous": previous},
        "created_at": now,
        "files": {name: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for name, b in sorted(files.items())},
    }
    if training.get("dp"):  # only then: a manifest without DP keeps the bytes it always had
        manifest["training"]["dp"] = dict(training["dp"])
    if merge is not None:
        manifest["dataset"]["sources"] = [dict(d) for d in merge.get("data", [])]
        manifest["merge"] = {k: v for k, v in merge.items() if k != "data"}
    if federation is not None:
        manifest["federation"] = federation
    return manifest


def dp_summary(manifest: dict) -> str:
    """'ε=2.00 δ=1e-05' for a model trained with differential privacy, 'ε=∞ …' without noise, '' without DP."""
    b = (manifest.get("training") or {}).get("dp")
    if not b:
        return ""
    eps = "∞" if b.get("epsilon") is None else f"{b['epsilon']:.2f}"
    return f"ε={eps} δ={b.get('delta'):.0e}"


def check_files(manifest: dict, files: dict[str, bytes]) -> None:
    """Every payload file is listed with its sha256 and size, and nothing else is there."""
    listed = manifest.get("files") or {}
    if set(listed) != set(files):
        raise CorruptArtifact(
            f"bundle files {sorted(files)} differ from the manifest's {sorted(listed)}",
            hint="rebuild the bundle; it was altered after signing",
        )
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"] or len(data) != listed[name]["size"]:
            raise CorruptArtifact(f"{name} does not match its sha256 in the signed manifest", hint="the bundle was altered")


def load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptArtifact(f"cannot read manifest {path}: {e}", hint="reinstall the model") from None

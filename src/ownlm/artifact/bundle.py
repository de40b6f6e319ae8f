"""Making a bundle on the trainer: delta files + manifest → sign with the user's key → seal to the node."""

from __future__ import annotations

import json
from pathlib import Path

from ownlm.artifact.manifest import build_manifest, canonical
from ownlm.artifact.seal import seal
from ownlm.artifact.sign import sign_manifest
from ownlm.bitdelta.format import METADATA, TENSORS, read_metadata

MANIFEST = "manifest.json"


def make_bundle(
    *, delta_dir: Path, report: dict, user_name: str, signing_key, recipient: dict,
    base_name: str, version: int, previous: str | None, created_at: float | None = None, merge: dict | None = None,
    federation: dict | None = None,
) -> tuple[bytes, dict]:
    """(sealed bundle bytes, signed manifest) for the delta in `delta_dir` and its training `report` (`merge`: what
    a merged model records of its sources, see build_manifest)."""
    delta_dir = Path(delta_dir)
    meta = read_metadata(delta_dir)  # checks the delta's own metadata before we sign anything
    files = {TENSORS: (delta_dir / TENSORS).read_bytes(), METADATA: (delta_dir / METADATA).read_bytes()}
    manifest = build_manifest(
        user=user_name, base_name=base_name, base_sha256=meta["base_sha256"], files=files, delta_meta=meta,
        training=report, merkle_root=(report.get("dataset") or {}).get("merkle_root", ""),
        version=version, previous=previous, created_at=created_at, merge=merge,
        federation=federation,
    )
    signed = sign_manifest(manifest, signing_key)
    return seal({MANIFEST: canonical(signed), **files}, recipient), signed


def manifest_from_files(files: dict[str, bytes]) -> dict:
    from ownlm.errors import CorruptArtifact

    try:
        return json.loads(files[MANIFEST])
    except (KeyError, ValueError) as e:
        raise CorruptArtifact(f"the bundle has no readable {MANIFEST} ({e})", hint="rebuild the bundle") from None

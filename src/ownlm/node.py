"""The node side of deployment: verify → open → check → install atomically → route; rollback; recovery.

Every check happens before anything is written. Installation writes the files into a temporary directory
(each fsynced), renames it into `home/models/<user id>/<model id>` (atomic on one filesystem), fsyncs the
parent, and only then commits the registry row and the routing switch in one store transaction. A process
killed at any point leaves the user routed to either the old or the new model, complete; leftovers of an
interrupted install (temporary or unregistered directories) are removed by `recover`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ownlm.artifact.bundle import MANIFEST, manifest_from_files
from ownlm.artifact.manifest import check_files
from ownlm.artifact.seal import open_bundle
from ownlm.artifact.sign import verify_manifest
from ownlm.basemodel import base_sha256, resolve_base
from ownlm.bitdelta.format import load_delta
from ownlm.fsutil import PRIVATE_DIR, fsync_dir, mkdir_private, write_private
from ownlm.errors import AuthError, CorruptArtifact, DeltaMismatch, NotFound, VersionConflict
from ownlm.settings import Settings
from ownlm.store import Store

# Failpoint for crash tests only: `OWNLM_FAULT_PAUSE=<stage>` makes an install stop at that stage (and wait to
# be killed), so a test can SIGKILL a real process at each point of the install. Unset in normal use.
FAULT_ENV = "OWNLM_FAULT_PAUSE"
STAGES = ("verified", "written", "renamed", "routed")


def _failpoint(stage: str) -> None:
    if os.environ.get(FAULT_ENV) == stage:
        print(f"failpoint: paused at {stage}", flush=True)
        time.sleep(600)


@dataclass
class InstallResult:
    model_id: str
    version: int
    user_id: str
    path: Path
    signer: str
    seconds: float


def models_root(settings: Settings, user_id: str) -> Path:
    return settings.home / "models" / user_id


def _write_dir(tmp: Path, files: dict[str, bytes]) -> None:
    """Write the model files into the new directory `tmp`: 0700, files 0600 (a model is derived from the user's data)."""
    mkdir_private(tmp.parent)
    os.mkdir(tmp, PRIVATE_DIR)  # fails if it exists: a temporary name is never reused
    os.chmod(tmp, PRIVATE_DIR)
    for name, data in files.items():
        write_private(tmp / name, data)
    fsync_dir(tmp)


@dataclass
class Verified:
    """An opened bundle whose signature, file hashes, user and base all checked out (nothing written yet)."""

    files: dict[str, bytes]
    manifest: dict
    signer: str
    user: object  # store.User
    model_id: str
    version: int
    node_base: str


def open_verified(store: Store, settings: Settings, bundle: bytes, *, expect_user_id: str | None = None) -> Verified:
    """Open a sealed bundle for this node and check it: signature, file hashes, user, base. Writes nothing."""
    files = open_bundle(bundle, store.node_key())
    manifest = manifest_from_files(files)
    signer = verify_manifest(manifest, store.trusted_signers())
    payload = {k: v for k, v in files.items() if k != MANIFEST}
    check_files(manifest, payload)
    try:
        user = store.get_user(manifest["model"]["user"])
        model_id, version = str(manifest["model"]["id"]), int(manifest["versioning"]["version"])
        delta_base = manifest["model"]["base_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptArtifact(f"the manifest lacks a field ({e})", hint="rebuild the bundle with `ownlm bundle`") from None
    if expect_user_id is not None and user.id != expect_user_id:
        raise AuthError(f"this bundle is for user {user.name}", hint="deploy it with that user's token")
    node_base = base_sha256(resolve_base(settings.base), settings.home)
    if delta_base != node_base:
        raise DeltaMismatch(
            f"the model was trained on base {delta_base[:16]}…, this node serves base {node_base[:16]}…",
            hint="train against the node's base model (`ownlm info` shows its sha256)",
        )
    return Verified(files, manifest, signer, user, model_id, version, node_base)


def install(store: Store, settings: Settings, bundle: bytes, *, expect_user_id: str | None = None,
            rollback: bool = False, keep: int = 5) -> InstallResult:
    """Verify and install a sealed bundle; route its user to it. Raises before writing anything if any check fails."""
    t0 = time.perf_counter()
    return install_verified(store, settings, open_verified(store, settings, bundle, expect_user_id=expect_user_id),
                            rollback=rollback, keep=keep, t0=t0)


def install_verified(store: Store, settings: Settings, v: Verified, *, rollback: bool = False, keep: int = 5,
                     t0: float | None = None) -> InstallResult:
    """Install a bundle `open_verified` already checked (a caller that judged it first need not open it twice)."""
    with _install_lock(settings):
        return _install_locked(store, settings, v.files, v.manifest, v.user, v.model_id, v.version, v.node_base,
                               v.signer, rollback, keep, time.perf_counter() if t0 is None else t0)


class _install_lock:
    """One install at a time per home, across processes (flock), so `recover` never removes a live install."""

    def __init__(self, settings: Settings):
        self.path = settings.home / "models" / ".lock"

    def __enter__(self):
        mkdir_private(self.path.parent)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _install_locked(store, settings, files, manifest, user, model_id, version, node_base, signer, rollback, keep, t0):
    recover(store, settings)
    try:
        existing = store.model(user.id, model_id)
    except NotFound:
        existing = None
    if existing is not None or version <= store.max_version(user.id):
        if not rollback:
            raise VersionConflict(
                f"version {version} ({model_id}) is not newer than the installed version {store.max_version(user.id)}",
                hint="a replayed old bundle is refused; use `ownlm rollback VERSION` (or deploy with --rollback) on purpose",
            )
        if existing is not None:  # an explicit rollback to a model still on disk: just route to it
            with store.tx() as db:
                store.route(db, user.id, model_id)
                store.audit(db, user.id, "rolled_back", model=model_id, version=version)
            return InstallResult(model_id, version, user.id, Path(existing["path"]), signer, time.perf_counter() - t0)
    _failpoint("verified")
    root = models_root(settings, user.id)
    tmp = root / f".tmp-{model_id}-{secrets.token_hex(4)}"
    final = root / model_id
    _write_dir(tmp, files)
    try:
        load_delta(tmp, expect_base_sha256=node_base)  # the delta's own integrity and base, as installed
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _failpoint("written")
    if final.exists():  # an unregistered leftover of an earlier interrupted install
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _failpoint("renamed")
    with store.tx() as db:
        store.register_model(db, user.id, manifest, str(final), sum(len(b) for b in files.values()), signer, activate=True)
    _failpoint("routed")
    prune(store, settings, user.id, keep)
    return InstallResult(model_id, version, user.id, final, signer, time.perf_counter() - t0)


def recover(store: Store, settings: Settings) -> list[Path]:
    """Remove what an interrupted install left: temporary directories and directories no registry row names."""
    registered = {Path(p) for (p,) in store.query("SELECT path FROM models")}
    removed = []
    base = settings.home / "models"
    for user_dir in base.glob("*") if base.exists() else []:
        if not user_dir.is_dir():
            continue
        for d in user_dir.iterdir():
            if d.is_dir() and d not in registered:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def prune(store: Store, settings: Settings, user_id: str, keep: int) -> None:
    """Keep the newest `keep` versions (and always the active one)."""
    for m in store.models(user_id)[keep:]:
        if m["active"]:
            continue
        with store.tx() as db:
            db.execute("DELETE FROM models WHERE id = ? AND user_id = ?", (m["id"], user_id))
            store.audit(db, user_id, "model_pruned", model=m["id"], version=m["version"])
        shutil.rmtree(m["path"], ignore_errors=True)


def rollback(store: Store, user_id: str, target: str | None = None) -> dict | None:
    """Route the user to `target` (a version or model id, or 'base'); default: the version before the active one.
    Returns the model now active (None for the base)."""
    if target == "base":
        with store.tx() as db:
            store.route(db, user_id, None)
            store.audit(db, user_id, "rolled_back", model=None)
        return None
    models = store.models(user_id)
    if target is None:
        active = next((m for m in models if m["active"]), None)
        older = [m for m in models if active is None or m["version"] < active["version"]]
        if not older:
            raise NotFound("there is no earlier version to roll back to", hint="`ownlm rollback base` serves the base model")
        chosen = older[0]
    else:
        chosen = store.model(user_id, target)
    with store.tx() as db:
        store.route(db, user_id, chosen["id"])
        store.audit(db, user_id, "rolled_back", model=chosen["id"], version=chosen["version"])
    return store.model(user_id, chosen["id"])

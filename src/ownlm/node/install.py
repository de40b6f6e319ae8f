"""The node side of deployment: verify → open → check → install atomically → route; rollback; recovery.

Every check happens before anything is written. Installation writes the files into a temporary directory
(each fsynced), renames it into `home/models/<user id>/<model id>` (atomic on one filesystem), fsyncs the
parent, and only then commits the registry row and the routing switch in one store transaction. A process
killed at any point leaves the user routed to either the old or the new model, complete; leftovers of an
interrupted install or removal are cleaned by `recover`, which never deletes a complete model it cannot
account for.

Nothing a bundle says becomes a path unchecked: the model id must match the pattern `make_bundle` produces
(`MODEL_ID_RE`), and every directory is resolved and checked to lie in home/models/<user id>. A bundle is
accepted only when signed by a key that may sign for its user (the user's own key, or a key trusted for that
user with `ownlm trust add FILE --user NAME`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ownlm.artifact.bundle import MANIFEST, manifest_from_files
from ownlm.artifact.manifest import check_files, load_manifest
from ownlm.artifact.seal import open_bundle
from ownlm.artifact.sign import verify_manifest
from ownlm.basemodel import base_sha256, resolve_base
from ownlm.bitdelta.format import load_delta
from ownlm.fsutil import PRIVATE_DIR, fsync_dir, mkdir_private, write_private
from ownlm.errors import AuthError, CorruptArtifact, DeltaMismatch, NotFound, TrainedOnDeletedData, VersionConflict
from ownlm.settings import Settings
from ownlm.store import Store
from ownlm.store.models import model_relpath, resolve_model_path, training_roots
from ownlm.store.users import NAME_RE

log = logging.getLogger(__name__)
# Exactly the ids make_bundle writes: pm_YYYY_MM_DD_HH_MM_v<version> (artifact.manifest.build_manifest).
MODEL_ID_RE = re.compile(r"^pm_[0-9]{4}(_[0-9]{2}){4}_v[0-9]{1,9}$")
MAX_VERSION = 2**31 - 1

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


def model_dir(settings: Settings, user_id: str, name: str) -> Path:
    """home/models/<user id>/<name>, checked to be a direct child of that directory (CorruptArtifact if not)."""
    return resolve_model_path(settings.home, user_id, model_relpath(user_id, name))


def _write_dir(tmp: Path, files: dict[str, bytes]) -> None:
    """Write the model files into the new directory `tmp`: 0700, files 0600 (a model is derived from the user's data)."""
    mkdir_private(tmp.parent)
    os.mkdir(tmp, PRIVATE_DIR)  # fails if it exists: a temporary name is never reused
    os.chmod(tmp, PRIVATE_DIR)
    for name, data in files.items():
        target = (tmp / name).resolve()
        if target.parent != tmp.resolve():  # unpack_files refuses such names already; never write outside
            raise CorruptArtifact(f"bundle file name {name!r} is not a plain file name", hint="rebuild the bundle")
        write_private(target, data)
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


def _manifest_fields(manifest: dict) -> tuple[str, str, int, str]:
    """(model id, user name, version, delta base sha256) from an unverified manifest, each checked for shape
    before it is used: the id becomes a directory name, the version a SQLite integer."""
    try:
        model, versioning = manifest["model"], manifest["versioning"]
        model_id, user_name, version = model["id"], model["user"], versioning["version"]
        delta_base, previous = model["base_sha256"], versioning["previous"]
    except (KeyError, TypeError) as e:
        raise CorruptArtifact(f"the manifest lacks a field ({e})", hint="rebuild the bundle with `ownlm bundle`") from None
    if not isinstance(model_id, str) or not MODEL_ID_RE.match(model_id):
        raise CorruptArtifact(f"the manifest's model id {str(model_id)[:80]!r} is not of the form pm_YYYY_MM_DD_HH_MM_vN",
                              hint="rebuild the bundle with `ownlm bundle`")
    if not isinstance(user_name, str) or not NAME_RE.match(user_name):
        raise CorruptArtifact(f"the manifest's user {str(user_name)[:80]!r} is not a user name",
                              hint="rebuild the bundle with `ownlm bundle --user NAME`")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise CorruptArtifact(f"the manifest's version {str(version)[:40]!r} is not a whole number from 1 to {MAX_VERSION}",
                              hint="rebuild the bundle with `ownlm bundle --version N`")
    if previous is not None and not (isinstance(previous, str) and MODEL_ID_RE.match(previous)):
        raise CorruptArtifact(f"the manifest's previous model {str(previous)[:80]!r} is not a model id",
                              hint="rebuild the bundle with `ownlm bundle`")
    if not isinstance(delta_base, str):
        raise CorruptArtifact("the manifest's base_sha256 is not a string", hint="rebuild the bundle with `ownlm bundle`")
    return model_id, user_name, version, delta_base


def open_verified(store: Store, settings: Settings, bundle: bytes, *, expect_user_id: str | None = None) -> Verified:
    """Open a sealed bundle for this node and check it: signature and signer's right to sign for the user,
    file hashes, id and version, user, base. Writes nothing."""
    files = open_bundle(bundle, store.node_key())
    manifest = manifest_from_files(files)
    if not isinstance(manifest, dict):
        raise CorruptArtifact("the bundle's manifest is not a JSON object", hint="rebuild the bundle with `ownlm bundle`")
    signer = verify_manifest(manifest, store.trusted_signers())  # authentic first: no field is trusted before
    payload = {k: v for k, v in files.items() if k != MANIFEST}
    check_files(manifest, payload)
    model_id, user_name, version, delta_base = _manifest_fields(manifest)
    user = store.get_user(user_name)
    if signer not in store.signers_for(user.id):
        # a key this node trusts, but not for this user (e.g. another user's own key): one user cannot
        # install a model into another's account by signing it
        raise AuthError(f"the model for user {user.name} is signed by key {signer}, which may not sign for {user.name}",
                        hint=f"sign it with {user.name}'s own key, or trust the trainer's key for that user: "
                             f"`ownlm trust add FILE --user {user.name}`")
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
    _check_not_trained_on_deleted(store, user, manifest, model_id)
    _failpoint("verified")
    root = models_root(settings, user.id)
    tmp = model_dir(settings, user.id, f".tmp-{model_id}-{secrets.token_hex(4)}")
    final = model_dir(settings, user.id, model_id)
    _write_dir(tmp, files)
    try:
        load_delta(tmp, expect_base_sha256=node_base)  # the delta's own integrity and base, as installed
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _failpoint("written")
    if final.exists():  # unregistered (checked above): a leftover of an interrupted install of this same model
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _failpoint("renamed")
    try:
        with store.tx() as db:
            # again inside the registering transaction: a delete commits either before it (then this refuses)
            # or after it (then the delete sees this model and removes it)
            _check_not_trained_on_deleted(store, user, manifest, model_id, db)
            store.register_model(db, user.id, manifest, sum(len(b) for b in files.values()), signer, activate=True)
    except TrainedOnDeletedData:
        shutil.rmtree(final, ignore_errors=True)
        raise
    _failpoint("routed")
    prune(store, settings, user.id, keep)
    return InstallResult(model_id, version, user.id, final, signer, time.perf_counter() - t0)


def _complete_manifest(d: Path) -> dict | None:
    """The manifest of `d` if it holds a whole installed model (the manifest names `d` and lists exactly the
    other files, each with its sha256: what a finished install leaves), else None."""
    try:
        manifest = load_manifest(d / MANIFEST)
        files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != MANIFEST}
        if not isinstance(manifest, dict) or manifest.get("model", {}).get("id") != d.name:
            return None
        check_files(manifest, files)
        return manifest
    except (OSError, CorruptArtifact, AttributeError, TypeError, KeyError):
        return None


def _holds_deleted(store: Store, user_id: str, manifest: dict, db=None) -> bool:
    """Whether a dataset the model learned from (its manifest's Merkle root, and for a merged model each of its
    sources' roots, whoever's data they are: store.models.training_roots) holds data that was deleted."""
    return any(store.dataset_has_deleted_data(uid, root, db) for uid, root in training_roots(manifest, user_id))


def _check_not_trained_on_deleted(store: Store, user, manifest: dict, model_id: str, db=None) -> None:
    """Refuse a model whose recorded dataset holds data the user deleted since: a round that was training
    while the user deleted, or an old bundle replayed after the delete, must not bring the data back."""
    if _holds_deleted(store, user.id, manifest, db):
        raise TrainedOnDeletedData(
            f"{model_id} was trained on conversations of {user.name} that were deleted since; it is not installed",
            hint="train a new model on the data that remains (`ownlm train`)")


def recover(store: Store, settings: Settings) -> list[Path]:
    """Clean what an interrupted install or removal left in home/models; returns the directories removed.

    Removed: `.tmp-*` directories (an install killed before its rename), unregistered directories that are not
    a complete model, and unregistered models that the audit log says were deleted or pruned, or whose dataset
    holds deleted data (a process killed between that commit and the removal of the files: the right to
    delete must finish). Kept, with a warning: a complete model no registry row names and nothing says was
    removed (say, a home restored from a store backup older than its models/). It is not served; deploying
    its bundle again replaces it.
    """
    registered = set()
    for uid, stored in store.query("SELECT user_id, path FROM models"):
        try:
            registered.add(resolve_model_path(settings.home, uid, stored))
        except CorruptArtifact:
            continue
    removed_on_purpose = store.removed_models()
    removed = []
    base = settings.home / "models"
    for user_dir in base.glob("*") if base.exists() else []:
        if not user_dir.is_dir():
            continue
        for d in user_dir.iterdir():
            if not d.is_dir() or d.resolve() in registered:
                continue
            manifest = None if d.name.startswith(".tmp-") else _complete_manifest(d)
            if manifest is None or (user_dir.name, d.name) in removed_on_purpose or _holds_deleted(store, user_dir.name, manifest):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            else:
                log.warning("kept %s: a complete model that no registry row names (not served)", d)
    return removed


def prune(store: Store, settings: Settings, user_id: str, keep: int) -> None:
    """Keep the newest `keep` versions (and always the active one)."""
    for m in store.models(user_id)[keep:]:
        if m["active"]:
            continue
        with store.tx() as db:
            db.execute("DELETE FROM models WHERE id = ? AND user_id = ?", (m["id"], user_id))
            store.audit(db, user_id, "model_pruned", model=m["id"], version=m["version"])
        shutil.rmtree(m["path"], ignore_errors=True)  # resolved inside home/models/<user id> by the store


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

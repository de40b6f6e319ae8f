"""The right to delete across a person's devices: retire notices for federated aggregates.

A federated round installs the same aggregate on every device (privacy/federation.py). When the person deletes
conversations on one device, `Store.delete_data` removes that device's copy (its manifest names this device's
dataset Merkle root), but the other devices cannot see the deleted data, so nothing there ties their copy to it.
The deleting device therefore writes a retire notice: the rounds whose aggregates learned from the deleted data,
signed with the person's key on this device. Each other device checks the signature against the keys it trusts
for the person (the same trust its federated updates need) and removes every model of those rounds:

    phone$  ownlm delete --conversation c_123 --yes     # prints: wrote retire notice .../retire/....json
    laptop$ ownlm federate retire phone-retire.json     # removes the laptop's copy of that round's aggregate

Every federated round also carries the notices (`pending_notices`, `apply_carried`), so a device that takes part
in a later round gets them even if the file was never copied.

A delete whose process dies after its commit but before the notice is written is finished later
(`finish_interrupted`: when `ownlm serve` starts, at the next delete, before a device's notices ride a round).

A notice holds round ids and the signer's device id, never data. Applying one twice changes nothing the second
time; a notice signed by a key the device does not trust, or for another person, is refused and changes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ownlm.errors import CorruptArtifact, InvalidInput
from ownlm.settings import Settings
from ownlm.store import Store, User

NOTICE_KIND = "ownlm.federation_retire"
MAX_NOTICE_BYTES = 1 << 20  # a notice is a few hundred bytes; anything near this is not one


def notice_dir(settings: Settings) -> Path:
    return settings.home / "federation" / "retire"


def make_notice(store: Store, user: User, rounds: list[str], reason: str = "deleted data") -> dict:
    """The signed notice {kind, version, user, rounds, device, reason, created_at, signature} for these rounds."""
    from ownlm.artifact.sign import sign_manifest

    if not rounds or not all(isinstance(r, str) and r for r in rounds):
        raise InvalidInput("a retire notice needs the ids of the federated rounds to retire")
    doc = {"kind": NOTICE_KIND, "version": 1, "user": user.name, "rounds": sorted(set(rounds)),
           "device": store.node_key().public_json()["key_id"], "reason": reason, "created_at": time.time()}
    return sign_manifest(doc, store.signing_key(user.id))


def after_delete(store: Store, settings: Settings, user: User, deleted: dict) -> Path | None:
    """After `Store.delete_data`: write the retire notice for the federated rounds it removed (None: there were
    none) under `notice_dir`, and audit it. The caller tells the person to take it to their other devices.
    Rounds of an earlier delete whose notice a crash kept from being written go into this notice too."""
    rounds = deleted.get("federation_rounds") or []
    if not rounds:
        return None
    return finish_interrupted(store, settings, user)  # this delete's rounds are in its audit row, not yet noticed


def _write_notice(store: Store, settings: Settings, user: User, rounds: list[str]) -> Path:
    from ownlm.fsutil import atomic_write, mkdir_private

    notice = make_notice(store, user, rounds)
    mkdir_private(notice_dir(settings))
    path = notice_dir(settings) / f"{time.strftime('%Y%m%d_%H%M%S')}_{user.id}_{len(notice['rounds'])}.json"
    atomic_write(path, json.dumps(notice, indent=1))
    with store.tx() as db:
        store.audit(db, user.id, "federation_retire_notice_written", rounds=notice["rounds"], file=path.name)
    return path


def finish_interrupted(store: Store, settings: Settings, user: User) -> Path | None:
    """Write the notice a crash kept `after_delete` from writing (None: nothing was missing).

    The delete's own transaction audits the federated rounds it removed ("deleted", `federation_rounds`) and every
    notice written is audited with its rounds, so rounds in the first and in none of the second are a notice
    that was never written: the right to delete must reach the other devices even then. Run when a node starts
    (cli/serve.py), before each delete's notice and before a device's notices ride a round (pending_notices)."""
    deleted, noticed = set(), set()
    for action, detail in store.query("SELECT action, detail FROM audit WHERE user_id = ? AND action IN "
                                      "('deleted', 'federation_retire_notice_written')", (user.id,)):
        rounds = json.loads(detail).get("federation_rounds" if action == "deleted" else "rounds") or []
        (deleted if action == "deleted" else noticed).update(r for r in rounds if isinstance(r, str) and r)
    missing = sorted(deleted - noticed)
    return _write_notice(store, settings, user, missing) if missing else None


def finish_all_interrupted(store: Store, settings: Settings) -> list[Path]:
    """finish_interrupted for every user of the store (a node starting): the notices written."""
    return [p for u in store.list_users() if (p := finish_interrupted(store, settings, u)) is not None]


def read_notice(data: bytes) -> dict:
    """Parse a notice file's bytes; CorruptArtifact for anything that is not one (nothing is checked for trust yet)."""
    if len(data) > MAX_NOTICE_BYTES:
        raise CorruptArtifact("this file is too large to be a retire notice", hint="pass the file `ownlm delete` wrote")
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptArtifact("the retire notice is not JSON", hint="copy the file `ownlm delete` wrote unchanged") from None
    if not isinstance(doc, dict) or doc.get("kind") != NOTICE_KIND or doc.get("version") != 1:
        raise CorruptArtifact("not an ownlm federation retire notice", hint="pass the file `ownlm delete` wrote")
    rounds = doc.get("rounds")
    if not isinstance(rounds, list) or not rounds or not all(isinstance(r, str) and r for r in rounds) \
            or not isinstance(doc.get("user"), str) or not isinstance(doc.get("device"), str):
        raise CorruptArtifact("the retire notice is malformed (user, device, rounds)", hint="write it again with `ownlm delete`")
    return doc


def apply_notice(store: Store, user: User, data: bytes, *, audit_noop: bool = True) -> dict:
    """Verify a retire notice for `user` and remove every model of its rounds from this device, in one
    transaction; a user routed to one is routed to the newest remaining model or the base.

    Returns {rounds, device, signer, models_removed, active_model}. Raises CorruptArtifact (not a notice),
    InvalidInput (another person's), SignatureError (a key this device does not trust for the user).
    `audit_noop=False` (notices carried by every round) audits only a notice that removed something."""
    from ownlm.artifact.sign import verify_manifest

    doc = read_notice(data)
    if doc["user"] != user.name:
        raise InvalidInput(f"this retire notice is for {doc['user']!r}, not {user.name!r}",
                           hint="apply it with --user set to the person it names")
    signer = verify_manifest(doc, store.signers_for(user.id))
    with store.tx() as db:
        removed = store.models_of_rounds(db, user.id, doc["rounds"])
        # with nothing to remove, drop_models changes nothing and returns the model routed now
        active = store.drop_models(db, user.id, removed, reason="federated round retired: the person deleted its "
                                   f"data on device {doc['device']}")
        if removed or audit_noop:
            store.audit(db, user.id, "federation_retired", rounds=doc["rounds"], device=doc["device"], signer=signer,
                        models=removed)
    store.remove_model_files(user.id, removed)  # after COMMIT, as delete_data does (node.recover finishes a crash)
    return {"rounds": doc["rounds"], "device": doc["device"], "signer": signer, "models_removed": removed,
            "active_model": active}


# --- carried by federated rounds (privacy/federation.py) ---------------------------------------------------------
# A device sends its notices with every update; the server checks and applies them to its own store and hands the
# verified ones to every device with the round's install message. So a notice reaches every device that takes
# part in any later round, even if the person never copies the file.

MAX_CARRIED = 100  # notices a device carries per round (the newest); older ones have reached the others by then


def pending_notices(store: Store, settings: Settings, user: User) -> list[str]:
    """The JSON texts of this device's notices for `user`, newest last (at most MAX_CARRIED), after writing any
    a crash kept from being written (finish_interrupted)."""
    finish_interrupted(store, settings, user)
    d = notice_dir(settings)
    out = []
    for path in sorted(d.glob(f"*_{user.id}_*.json"))[-MAX_CARRIED:] if d.is_dir() else []:
        try:
            out.append(path.read_text())
        except OSError:
            continue
    return out


def apply_carried(store: Store, user: User, texts: list[str]) -> tuple[list[str], list[dict]]:
    """Apply notices carried by a round on this node: (the texts that verified, [{rounds, models_removed}] of those
    that removed something). A notice that does not verify is audited as refused and otherwise ignored: a bad
    notice never stops a round."""
    from ownlm.errors import OwnlmError

    good, removed = [], []
    for text in texts[:MAX_CARRIED * 4]:
        try:
            res = apply_notice(store, user, text.encode() if isinstance(text, str) else bytes(text), audit_noop=False)
        except OwnlmError as e:
            with store.tx() as db:
                store.audit(db, user.id, "federation_retire_refused", reason=e.message[:300])
            continue
        good.append(text)
        if res["models_removed"]:
            removed.append({"rounds": res["rounds"], "models_removed": res["models_removed"]})
    return good, removed

"""Keys and installed models in the store: the node's HPKE key, users' signing keys, trusted signers (each
bound to the users it may sign for), the model registry and the routing table (which model answers each user).

A registry row's `path` is relative to the home (`models/<user id>/<model id>`): the home can be moved,
copied or restored and its models stay found. Every read resolves it against the store's home and checks that
it stays inside `home/models/<user id>`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ownlm.errors import CorruptArtifact, NotFound

MODELS_DIR = "models"


def model_relpath(user_id: str, model_id: str) -> str:
    """What a registry row stores: the model directory relative to the home."""
    return f"{MODELS_DIR}/{user_id}/{model_id}"


def adapter_dir(home: Path, user_id: str) -> Path:
    """Where the fp32 adapter behind the user's serving model is kept (learn/continual.py writes it)."""
    return Path(home) / "adapters" / user_id


def forget(home: Path, user_id: str) -> None:
    """Remove the kept adapter (after a delete of the user's data, or before keeping a newer one)."""
    shutil.rmtree(adapter_dir(home, user_id), ignore_errors=True)


def resolve_model_path(home: Path, user_id: str, stored: str) -> Path:
    """The absolute model directory for a stored (relative) path; it must be a direct child of
    home/models/<user id> (symlinks resolved), else CorruptArtifact: nothing outside is ever read or removed."""
    root = (Path(home) / MODELS_DIR / user_id).resolve()
    path = (Path(home) / stored).resolve()
    if path.parent != root:
        raise CorruptArtifact(f"model path {stored!r} of user {user_id} is outside {root}",
                              hint="the registry row was altered; roll the user back (`ownlm rollback base`)")
    return path


def training_roots(manifest: dict, owner_id: str) -> list[tuple[str, str]]:
    """(user id, dataset Merkle root) of every dataset a model learned from, by its manifest: its own
    `dataset.merkle_root` (a dataset of its owner), and for a merged model (node/merge.py) each of
    `dataset.sources` (the sources' data, theirs included, whoever's it was). The right to delete checks each."""
    dataset = manifest.get("dataset") if isinstance(manifest, dict) else None
    if not isinstance(dataset, dict):
        return []
    out = []
    root = dataset.get("merkle_root")
    if isinstance(root, str) and root:
        out.append((owner_id, root))
    for source in dataset.get("sources") or []:
        if isinstance(source, dict) and isinstance(source.get("user_id"), str) and isinstance(source.get("merkle_root"), str) \
                and source["merkle_root"]:
            pair = (source["user_id"], source["merkle_root"])
            if pair not in out:
                out.append(pair)
    return out


class ModelsMixin:
    # --- keys -------------------------------------------------------------------------------------------
    def node_key(self):
        """This node's HPKE key pair, created on first use."""
        from ownlm.artifact.seal import NodeKey

        rows = self.query("SELECT mlkem_seed, x25519 FROM node_key WHERE id = 1")
        if rows:
            return NodeKey(bytes(rows[0][0]), bytes(rows[0][1]))
        key = NodeKey.generate()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO node_key (id, mlkem_seed, x25519, created_at) VALUES (1, ?, ?, ?)",
                       (key.mlkem_seed, key.x25519_raw, time.time()))
            self.audit(db, None, "node_key_created", key_id=key.public_json()["key_id"])
        return self.node_key()

    def signing_key(self, user_id: str, alg: str = "ed25519"):
        """The user's signing key (private), created on first use and trusted by this node."""
        from ownlm.artifact import sign

        rows = self.query("SELECT private_der FROM signing_keys WHERE user_id = ?", (user_id,))
        if rows:
            return serialization.load_der_private_key(bytes(rows[0][0]), password=None)
        key = sign.generate(alg)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        with self.tx() as db:
            db.execute("INSERT INTO signing_keys (user_id, key_id, alg, public_pem, private_der, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (user_id, sign.key_id(key), alg, sign.public_pem(key), der, time.time()))
            db.execute("INSERT OR REPLACE INTO trusted_signers (key_id, alg, public_pem, label, added_at) VALUES (?, ?, ?, ?, ?)",
                       (sign.key_id(key), alg, sign.public_pem(key), f"own key of {user_id}", time.time()))
            self.audit(db, user_id, "signing_key_created", key_id=sign.key_id(key), alg=alg)
        return key

    def he_keys(self, user_id: str) -> tuple[bytes, bytes] | None:
        """(secret, public) serialized CKKS contexts of the user (privacy/secure_agg.py), or None."""
        rows = self.query("SELECT secret_context, public_context FROM he_keys WHERE user_id = ?", (user_id,))
        return (bytes(rows[0][0]), bytes(rows[0][1])) if rows else None

    def he_key_params(self, user_id: str) -> dict:
        """The CKKS parameters the user's key pair was made with (CKKSParams.to_dict()); {} when there is none."""
        rows = self.query("SELECT params FROM he_keys WHERE user_id = ?", (user_id,))
        return json.loads(rows[0][0]) if rows else {}

    def save_he_keys(self, user_id: str, secret: bytes, public: bytes, key_id: str, params: dict) -> None:
        """Keep the user's first CKKS key pair (a second call keeps the first: keys are never silently replaced)."""
        with self.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO he_keys (user_id, key_id, params, secret_context, public_context,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (user_id, key_id, json.dumps(params), secret, public, time.time()))
            if cur.rowcount:
                self.audit(db, user_id, "he_key_created", key_id=key_id, **params)

    def trust(self, public_pem: str, label: str | None = None, *, user_id: str) -> str:
        """Trust a signing key (a trainer's) for one user: it may then sign that user's models, no one else's."""
        from ownlm.artifact import sign

        pub = sign.load_public(public_pem)
        kid = sign.key_id(pub)
        now = time.time()
        with self.tx() as db:
            # an upsert, not INSERT OR REPLACE: the key's bindings to other users stay
            db.execute("INSERT INTO trusted_signers (key_id, alg, public_pem, label, added_at) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (key_id) DO UPDATE SET label = coalesce(excluded.label, label)",
                       (kid, sign.alg_of(pub), sign.public_pem(pub), label, now))
            db.execute("INSERT OR IGNORE INTO trusted_signer_users (key_id, user_id, added_at) VALUES (?, ?, ?)",
                       (kid, user_id, now))
            self.audit(db, user_id, "signer_trusted", key_id=kid, label=label)
        return kid

    def trusted_signers(self) -> dict[str, object]:
        """Every key this node knows (users' own keys and trusted keys), whoever they may sign for."""
        from ownlm.artifact import sign

        return {kid: sign.load_public(pem) for kid, pem in self.query("SELECT key_id, public_pem FROM trusted_signers")}

    def signers_for(self, user_id: str) -> dict[str, object]:
        """The keys that may sign `user_id`'s models: the user's own key and keys trusted for that user."""
        from ownlm.artifact import sign

        rows = self.query(
            "SELECT key_id, public_pem FROM signing_keys WHERE user_id = ? UNION"
            " SELECT t.key_id, t.public_pem FROM trusted_signers t JOIN trusted_signer_users b ON b.key_id = t.key_id"
            " WHERE b.user_id = ?", (user_id, user_id))
        return {kid: sign.load_public(pem) for kid, pem in rows}

    def list_trusted(self) -> list[dict]:
        """Trusted keys with the names of the users each may sign for (own keys: their owner)."""
        rows = self.query("SELECT key_id, alg, label, added_at FROM trusted_signers ORDER BY added_at")
        users: dict[str, list[str]] = {}
        for kid, name in self.query(
                "SELECT k.key_id, u.name FROM signing_keys k JOIN users u ON u.id = k.user_id UNION"
                " SELECT b.key_id, u.name FROM trusted_signer_users b JOIN users u ON u.id = b.user_id ORDER BY 2"):
            users.setdefault(kid, []).append(name)
        return [{**dict(zip(("key_id", "alg", "label", "added_at"), r)), "users": users.get(r[0], [])} for r in rows]

    # --- models and routing ---------------------------------------------------------------------------------
    def register_model(self, db, user_id: str, manifest: dict, size: int, signer: str, activate: bool) -> None:
        """Inside the caller's transaction: record a model installed in home/models/<user id>/<model id> and
        (optionally) route the user to it."""
        now = time.time()
        db.execute(
            "INSERT INTO models (id, user_id, version, previous, path, size_bytes, signer_key_id, manifest, installed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (manifest["model"]["id"], user_id, manifest["versioning"]["version"], manifest["versioning"]["previous"],
             model_relpath(user_id, manifest["model"]["id"]), size, signer, json.dumps(manifest), now),
        )
        if activate:
            self.route(db, user_id, manifest["model"]["id"])
        self.audit(db, user_id, "model_installed", model=manifest["model"]["id"], version=manifest["versioning"]["version"],
                   signer=signer, merkle_root=manifest.get("dataset", {}).get("merkle_root"))

    def route(self, db, user_id: str, model_id: str | None) -> None:
        db.execute("INSERT OR REPLACE INTO routing (user_id, model_id, updated_at) VALUES (?, ?, ?)", (user_id, model_id, time.time()))

    def active_model(self, user_id: str) -> dict | None:
        rows = self.query("SELECT m.id FROM routing r JOIN models m ON m.id = r.model_id AND m.user_id = r.user_id WHERE r.user_id = ?", (user_id,))
        return self.model(user_id, rows[0][0]) if rows else None

    def model(self, user_id: str, model_id_or_version: str) -> dict:
        rows = self.query(
            "SELECT id, version, previous, path, size_bytes, signer_key_id, manifest, installed_at FROM models"
            " WHERE user_id = ? AND (id = ? OR CAST(version AS TEXT) = ?)",
            (user_id, model_id_or_version, str(model_id_or_version)),
        )
        if not rows:
            raise NotFound(f"no model {model_id_or_version}", hint="list them with `ownlm models`")
        return self._model_row(user_id, rows[0])

    def models(self, user_id: str) -> list[dict]:
        rows = self.query(
            "SELECT id, version, previous, path, size_bytes, signer_key_id, manifest, installed_at FROM models"
            " WHERE user_id = ? ORDER BY version DESC",
            (user_id,),
        )
        return [self._model_row(user_id, r) for r in rows]

    def _model_row(self, user_id: str, r) -> dict:
        active = self.query("SELECT model_id FROM routing WHERE user_id = ?", (user_id,))
        # "path": absolute, resolved against the home this store is in now
        return {"id": r[0], "version": r[1], "previous": r[2], "path": str(resolve_model_path(self.home, user_id, r[3])),
                "size_bytes": r[4], "signer": r[5],
                "manifest": json.loads(r[6]), "installed_at": r[7], "active": bool(active) and active[0][0] == r[0]}

    def max_version(self, user_id: str) -> int:
        return self.query("SELECT coalesce(max(version), 0) FROM models WHERE user_id = ?", (user_id,))[0][0]

    # --- right to delete -----------------------------------------------------------------------------------
    def models_trained_on(self, db, user_id: str, conversation_ids: list[str] | None) -> tuple[list[str], list[str]]:
        """(linked, unlinked) model ids of the user, newest first, inside the caller's transaction.

        linked: models whose dataset, as the store recorded it (datasets + dataset_examples, matched by the
        manifest's `dataset.merkle_root`, or for a merged model any of its `dataset.sources` of this user: see
        `training_roots`), holds an example of one of `conversation_ids`; every model when None (all of the
        user's data). A continued round's dataset is the user's whole data at that time, so the ancestors it
        continued from are covered too. unlinked: models none of whose Merkle roots names a dataset recorded here
        (trained from data this node never held); nothing ties them to the deleted data.
        """
        rows = db.execute("SELECT id, manifest FROM models WHERE user_id = ? ORDER BY version DESC", (user_id,)).fetchall()
        if conversation_ids is None:
            return [r[0] for r in rows], []
        known = {r[0] for r in db.execute("SELECT DISTINCT merkle_root FROM datasets WHERE user_id = ?", (user_id,))}
        tainted = self._tainted_roots(db, user_id, conversation_ids)
        linked, unlinked = [], []
        for mid, manifest in rows:
            roots = training_roots(json.loads(manifest), user_id)
            own = [r for u, r in roots if u == user_id]
            if any(r in tainted for r in own):
                linked.append(mid)
            elif len(own) == len(roots) and not any(r in known for r in own):
                unlinked.append(mid)
        return linked, unlinked

    def _tainted_roots(self, db, user_id: str, conversation_ids: list[str] | None) -> set[str]:
        """Merkle roots of the user's recorded datasets holding an example of these conversations (all: None)."""
        if conversation_ids is None:
            return {r[0] for r in db.execute("SELECT DISTINCT merkle_root FROM datasets WHERE user_id = ?", (user_id,))}
        tainted: set[str] = set()
        ids = list(dict.fromkeys(conversation_ids))
        for i in range(0, len(ids), 500):  # SQLite's host-parameter limit
            part = ids[i : i + 500]
            tainted |= {r[0] for r in db.execute(
                "SELECT DISTINCT d.merkle_root FROM dataset_examples e JOIN datasets d ON d.id = e.dataset_id"
                f" WHERE d.user_id = ? AND e.conversation_id IN ({','.join('?' * len(part))})", [user_id, *part])}
        return tainted

    def models_of_others_trained_on(self, db, user_id: str, conversation_ids: list[str] | None) -> dict[str, list[str]]:
        """{other user id: [model ids]}: other users' models merged from this user's data (node/merge.py) whose
        `dataset.sources` name a dataset of this user holding one of `conversation_ids` (all: None)."""
        tainted = self._tainted_roots(db, user_id, conversation_ids)
        out: dict[str, list[str]] = {}
        if not tainted:
            return out
        rows = db.execute("SELECT user_id, id, manifest FROM models WHERE user_id != ? ORDER BY version DESC", (user_id,))
        for owner, mid, manifest in rows.fetchall():
            if any(u == user_id and r in tainted for u, r in training_roots(json.loads(manifest), owner)):
                out.setdefault(owner, []).append(mid)
        return out

    def _federated_models(self, db, user_id: str) -> list[tuple[str, str]]:
        """(model id, federated round) of the user's models that are a round's aggregate (manifest
        `federation.round`), newest first."""
        out = []
        for mid, manifest in db.execute("SELECT id, manifest FROM models WHERE user_id = ? ORDER BY version DESC", (user_id,)):
            fed = json.loads(manifest).get("federation")
            if isinstance(fed, dict) and isinstance(fed.get("round"), str):
                out.append((mid, fed["round"]))
        return out

    def federation_rounds_of(self, db, user_id: str, model_ids: list[str]) -> list[str]:
        """Inside the caller's transaction: the federated rounds whose aggregates are among these models of the
        user, sorted. The person's other devices hold the same aggregate."""
        wanted = set(model_ids)
        return sorted({rnd for mid, rnd in self._federated_models(db, user_id) if mid in wanted})

    def models_of_rounds(self, db, user_id: str, rounds: list[str]) -> list[str]:
        """Inside the caller's transaction: ids of the user's models that are the aggregate of one of `rounds`."""
        wanted = set(rounds)
        return [mid for mid, rnd in self._federated_models(db, user_id) if rnd in wanted]

    def drop_models(self, db, user_id: str, model_ids: list[str], reason: str) -> str | None:
        """Inside the caller's transaction: unregister these models of the user. A user routed to one of them is
        routed to the newest remaining model, else the base. Returns the model now routed (None: the base).

        The files go after COMMIT (`remove_model_files`); the audit's `model_deleted` rows are what
        `node.recover` reads to finish a removal that a killed process left half done."""
        gone = set(model_ids)
        routed = db.execute("SELECT model_id FROM routing WHERE user_id = ?", (user_id,)).fetchone()
        active = routed[0] if routed else None
        if active in gone:
            remaining = db.execute("SELECT id FROM models WHERE user_id = ? ORDER BY version DESC", (user_id,))
            active = next((mid for (mid,) in remaining if mid not in gone), None)
            self.route(db, user_id, active)
            self.audit(db, user_id, "rolled_back", model=active, reason=reason)
        for mid in model_ids:
            db.execute("DELETE FROM models WHERE user_id = ? AND id = ?", (user_id, mid))
            self.audit(db, user_id, "model_deleted", model=mid, reason=reason)
        return active

    def remove_model_files(self, user_id: str, model_ids: list[str]) -> None:
        """Remove the directories of unregistered models (after `drop_models` committed)."""
        for mid in model_ids:
            try:
                path = resolve_model_path(self.home, user_id, model_relpath(user_id, mid))
            except CorruptArtifact:
                continue  # an id that points outside the user's models dir: nothing of ours is there
            shutil.rmtree(path, ignore_errors=True)

    def removed_models(self) -> set[tuple[str, str]]:
        """(user id, model id) of every model the audit log says was deleted or pruned on purpose."""
        out = set()
        for uid, detail in self.query("SELECT user_id, detail FROM audit WHERE action IN ('model_deleted', 'model_pruned')"):
            model = json.loads(detail).get("model")
            if uid and isinstance(model, str):
                out.add((uid, model))
        return out

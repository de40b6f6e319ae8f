"""Keys and installed models in the store: the node's HPKE key, users' signing keys, trusted signers,
the model registry and the routing table (which model answers each user)."""

from __future__ import annotations

import json
import time

from cryptography.hazmat.primitives import serialization

from ownlm.errors import NotFound


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

    def trust(self, public_pem: str, label: str | None = None) -> str:
        from ownlm.artifact import sign

        pub = sign.load_public(public_pem)
        kid = sign.key_id(pub)
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO trusted_signers (key_id, alg, public_pem, label, added_at) VALUES (?, ?, ?, ?, ?)",
                       (kid, sign.alg_of(pub), sign.public_pem(pub), label, time.time()))
            self.audit(db, None, "signer_trusted", key_id=kid, label=label)
        return kid

    def trusted_signers(self) -> dict[str, object]:
        from ownlm.artifact import sign

        return {kid: sign.load_public(pem) for kid, pem in self.query("SELECT key_id, public_pem FROM trusted_signers")}

    def list_trusted(self) -> list[dict]:
        rows = self.query("SELECT key_id, alg, label, added_at FROM trusted_signers ORDER BY added_at")
        return [dict(zip(("key_id", "alg", "label", "added_at"), r)) for r in rows]

    # --- models and routing ---------------------------------------------------------------------------------
    def register_model(self, db, user_id: str, manifest: dict, path: str, size: int, signer: str, activate: bool) -> None:
        """Inside the caller's transaction: record an installed model and (optionally) route the user to it."""
        now = time.time()
        db.execute(
            "INSERT INTO models (id, user_id, version, previous, path, size_bytes, signer_key_id, manifest, installed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (manifest["model"]["id"], user_id, manifest["versioning"]["version"], manifest["versioning"]["previous"],
             path, size, signer, json.dumps(manifest), now),
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
        return {"id": r[0], "version": r[1], "previous": r[2], "path": r[3], "size_bytes": r[4], "signer": r[5],
                "manifest": json.loads(r[6]), "installed_at": r[7], "active": bool(active) and active[0][0] == r[0]}

    def max_version(self, user_id: str) -> int:
        return self.query("SELECT coalesce(max(version), 0) FROM models WHERE user_id = ?", (user_id,))[0][0]

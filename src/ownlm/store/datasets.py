"""Datasets in the store: examples (encrypted like everything else) with their hashes and Merkle root.

Examples hold copies of message text, so the right to delete reaches them: deleting a conversation blanks the
text of every example made from it, keeping only its hash, so audit proofs about past models still verify.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone

from ownlm.errors import NotFound


class DatasetsMixin:
    def training_view(self, user_id: str) -> tuple[dict[str, list[dict]], dict[str, dict]]:
        """(conversation id -> message rows, message id -> latest feedback) for the dataset builder."""
        conversations: dict[str, list[dict]] = {}
        for cid, mid, parent, role, content in self.query(
            "SELECT conversation_id, id, parent_id, role, content FROM messages WHERE user_id = ? ORDER BY rowid",
            (user_id,),
        ):
            conversations.setdefault(cid, []).append({"id": mid, "parent_id": parent, "role": role, "content": content})
        feedback: dict[str, dict] = {}
        for mid, thumbs, rating, edit in self.query(
            "SELECT message_id, thumbs, rating, edited_content FROM feedback WHERE user_id = ? ORDER BY id", (user_id,)
        ):
            fb = feedback.setdefault(mid, {})
            # later feedback overrides earlier, field by field
            if thumbs is not None:
                fb["thumbs"] = thumbs
            if rating is not None:
                fb["rating"] = rating
            if edit is not None:
                fb["edit"] = edit
        return conversations, feedback

    def save_dataset(self, user_id: str, built, config: dict) -> str:
        now = time.time()
        ds_id = "ds_" + datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d_%H%M%S_") + secrets.token_hex(2)
        n_train = sum(1 for e in built.examples if e.split == "train")
        with self.tx() as db:
            db.execute(
                "INSERT INTO datasets (id, user_id, created_at, merkle_root, n_train, n_heldout, config, stats)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ds_id, user_id, now, built.merkle_root, n_train, len(built.examples) - n_train,
                 json.dumps(config), json.dumps(dict(built.stats))),
            )
            db.executemany(
                "INSERT INTO dataset_examples (dataset_id, idx, split, augmented, source_sha256, augmentation,"
                " conversation_id, sha256, messages) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(ds_id, i, e.split, int(e.augmented), e.source_sha256, e.augmentation, e.conversation_id, e.sha256,
                  json.dumps(e.messages, ensure_ascii=False))
                 for i, e in enumerate(built.examples)],
            )
            self.audit(db, user_id, "dataset_built", dataset=ds_id, merkle_root=built.merkle_root, examples=len(built.examples))
        return ds_id

    def dataset_info(self, user_id: str, dataset_id: str | None = None) -> dict:
        """One dataset's summary; the latest when `dataset_id` is None."""
        sql = "SELECT id, created_at, merkle_root, n_train, n_heldout, config, stats FROM datasets WHERE user_id = ?"
        params: list = [user_id]
        if dataset_id:
            sql += " AND id = ?"
            params.append(dataset_id)
        rows = self.query(sql + " ORDER BY created_at DESC LIMIT 1", params)
        if not rows:
            raise NotFound(
                f"no dataset {dataset_id}" if dataset_id else "no dataset yet", hint="run `ownlm dataset build` first"
            )
        r = rows[0]
        return {"id": r[0], "created_at": r[1], "merkle_root": r[2], "n_train": r[3], "n_heldout": r[4],
                "config": json.loads(r[5]), "stats": json.loads(r[6])}

    def dataset_examples(self, user_id: str, dataset_id: str) -> list[dict]:
        """Every example of one of the user's datasets in Merkle order: idx, split, augmented, source_sha256 and
        augmentation (the source example's hash and the kind, None for an original), conversation_id, sha256,
        messages (None once deleted)."""
        self.dataset_info(user_id, dataset_id)  # ownership check
        rows = self.query(
            "SELECT idx, split, augmented, source_sha256, augmentation, conversation_id, sha256, messages"
            " FROM dataset_examples WHERE dataset_id = ? ORDER BY idx",
            (dataset_id,),
        )
        return [{"idx": r[0], "split": r[1], "augmented": bool(r[2]), "source_sha256": r[3], "augmentation": r[4],
                 "conversation_id": r[5], "sha256": r[6], "messages": json.loads(r[7]) if r[7] is not None else None}
                for r in rows]

    def dataset_hashes(self, user_id: str, dataset_id: str, split: str = "train") -> set[str]:
        """sha256 of one split's examples of a dataset (an empty set when the dataset is gone)."""
        rows = self.query(
            "SELECT e.sha256 FROM dataset_examples e JOIN datasets d ON d.id = e.dataset_id"
            " WHERE d.user_id = ? AND e.dataset_id = ? AND e.split = ?", (user_id, dataset_id, split))
        return {r[0] for r in rows}

    def list_datasets(self, user_id: str) -> list[dict]:
        rows = self.query(
            "SELECT id, created_at, merkle_root, n_train, n_heldout FROM datasets WHERE user_id = ? ORDER BY created_at DESC",
            (user_id,),
        )
        return [dict(zip(("id", "created_at", "merkle_root", "n_train", "n_heldout"), r)) for r in rows]

    def dataset_has_deleted_data(self, user_id: str, merkle_root: str, db=None) -> bool:
        """Whether a recorded dataset of the user with this Merkle root holds an example whose conversation
        was deleted since (its text was blanked by delete_data). Inside the caller's transaction if `db`."""
        sql = ("SELECT 1 FROM dataset_examples e JOIN datasets d ON d.id = e.dataset_id"
               " WHERE d.user_id = ? AND d.merkle_root = ? AND e.messages IS NULL LIMIT 1")
        params = (user_id, merkle_root)
        return bool(db.execute(sql, params).fetchone() if db is not None else self.query(sql, params))

"""Storing an importer's result: shared by `ownlm import` and `POST /api/personalization/import`.

Importers only parse; this is the one place where a parsed export meets the store. The store deduplicates
by content hash inside each conversation's namespace, so importing the same export twice adds nothing.
"""

from __future__ import annotations

import hashlib


def import_seed(fmt: str, conv) -> str:
    """Dedup namespace of an imported conversation: the export's own id, else its opening messages."""
    if conv.external_id:
        return f"import:{fmt}:{conv.external_id}"
    head = "\0".join(f"{m.role}:{m.content}" for m in conv.messages[:2])
    return f"import:{fmt}:{conv.created_at}:" + hashlib.sha256(head.encode()).hexdigest()


def import_into(store, user_id: str, result, file_name: str, progress=None) -> dict:
    """Store an ImportResult for `user_id`; returns the counts (also written to the audit log)."""
    from ownlm.store.conversations import NewMessage

    counts = {"conversations_new": 0, "conversations_known": 0, "messages_new": 0, "messages_duplicate": 0}
    convs = [c for c in result.conversations if c.messages]
    for start in range(0, len(convs), 200):  # one transaction per 200 conversations
        with store.tx() as db:
            for conv in convs[start : start + 200]:
                msgs = [NewMessage(m.role, m.content, m.created_at, m.model) for m in conv.messages]
                res = store.capture(
                    user_id, msgs, source=f"import:{result.format}", seed=import_seed(result.format, conv),
                    title=conv.title, external_id=conv.external_id, created_at=conv.created_at, db=db,
                )
                counts["messages_new"] += res.added
                counts["messages_duplicate"] += res.duplicates
                counts["conversations_new" if res.duplicates == 0 and res.added else "conversations_known"] += 1
            if progress:
                progress(min(start + 200, len(convs)), len(convs))
    with store.tx() as db:
        store.audit(
            db, user_id, "imported", format=result.format, file=file_name, skipped=sum(result.skipped.values()),
            bad=len(result.bad), **counts,
        )
    return counts

"""Conversations, messages and feedback: idempotent capture and the right to delete.

Idempotency comes from a hash chain. Message i of a conversation gets
    chain_i = sha256(chain_{i-1} | role | content),  chain_{-1} = sha256(seed)
and (user, chain) is unique. Capturing the same conversation again — a re-imported export, or a client
re-sending the whole history with each request — stores only what follows the LAST message of the request
whose chain is already stored, attached to that message (a different continuation becomes a branch). A
chain names its whole history, so every earlier message of the request was stored once too; one that is
gone now was deleted by the user and is not stored again (its id reads None). So a history re-sent after a
partial delete continues where the kept part ends and never collides with it. Only a history deleted in
full is unknown again, and is stored as a new conversation.

The seed separates namespaces: imports use their format and the export's conversation id, so two exported
chats that both open with "hi" stay two conversations, and a client's own conversation id is its seed.

Live capture (`capture_live`: an OpenAI client's request, an interaction without a conversation id) has no
id to seed with. A request whose history holds no assistant message yet opens a new chat: it gets a seed
of its own, so two chats that both start with "hello" stay apart. Its messages also get a content-only
chain, `thread_sha256` (seed "live", not unique); a longer history continues the conversation holding the
deepest thread hash of the request at or past its first assistant message, so a growing history folds into
one conversation. Where two chats are still alike there, it goes on where that message has no reply yet
(no branch needed), else in the most recently updated chat; identical text cannot tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field

from ownlm.errors import InvalidInput, NotFound
from ownlm.store.memory import forget_passages, index_replies
from ownlm.store.models import forget

ROLES = ("system", "user", "assistant")
PREVIEW_CHARS = 80


def _preview(text: str | None) -> str | None:
    words = " ".join(text.split()) if text else ""
    if not words:
        return None
    return words if len(words) <= PREVIEW_CHARS else words[: PREVIEW_CHARS - 1].rstrip() + "…"


@dataclass
class NewMessage:
    role: str
    content: str
    created_at: float | None = None
    model: str | None = None


@dataclass
class CaptureResult:
    conversation_id: str
    message_ids: list[str | None]  # one per input message, stored now or earlier; None: deleted by the user
    added: int = 0
    duplicates: int = 0  # input messages stored earlier (and still there)
    new_ids: list[str] = field(default_factory=list)
    deleted: int = 0  # input messages stored earlier and deleted since: not stored again


LIVE_SEED = "live"  # the seed of every live thread hash (never of a chain since m008_live_threads)


def seed_hash(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def chain_hashes(start: str, messages: list[NewMessage]) -> list[str]:
    """Chain hashes of `messages` following the chain value `start` (a seed hash or a parent's chain)."""
    h = start
    out = []
    for m in messages:
        h = hashlib.sha256(f"{h}\0{m.role}\0{m.content}".encode()).hexdigest()
        out.append(h)
    return out


def check_messages(messages: list[NewMessage]) -> None:
    if not messages:
        raise InvalidInput("no messages to store", hint="send at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidInput(f"messages[{i}].role={m.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        try:
            m.content.encode()
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): neither hashable nor storable as text
            raise InvalidInput(
                f"messages[{i}].content is not valid Unicode text (a lone surrogate at character {e.start})",
                hint="send UTF-8 text; escape sequences \\ud800-\\udfff must come in pairs",
            ) from None


def _rows_by(db, user_id: str, column: str, hashes: list[str]) -> list[tuple]:
    """(hash, id, conversation id, position, thread_sha256) of the user's messages whose `column` is in `hashes`.

    Sorted so that where several messages share a thread hash the one to continue comes last: a message with
    no reply yet (continuing it needs no branch), then the most recently updated conversation.
    """
    out: list[tuple] = []
    for i in range(0, len(hashes), 500):  # SQLite's host-parameter limit
        part = hashes[i : i + 500]
        out += db.execute(
            f"SELECT m.{column}, m.id, m.conversation_id, m.position, m.thread_sha256,"
            " NOT EXISTS (SELECT 1 FROM messages k WHERE k.parent_id = m.id), c.updated_at, m.rowid"
            f" FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.user_id = ? AND m.{column} IN ({','.join('?' * len(part))})",
            [user_id, *part],
        ).fetchall()
    out.sort(key=lambda r: r[5:])
    return [r[:5] for r in out]


class ConversationsMixin:
    def capture(
        self,
        user_id: str,
        messages: list[NewMessage],
        *,
        source: str,
        seed: str | None = None,
        after: str | None = None,
        title: str | None = None,
        external_id: str | None = None,
        context: dict | None = None,
        created_at: float | None = None,
        threaded: bool = False,
        db=None,
    ) -> CaptureResult:
        """Store `messages` for `user_id`; already stored ones are skipped (see the module doc for the rule).

        Either `seed` names a namespace and `messages` is a conversation from its start, or `after` is the id
        of a stored message and `messages` continue the conversation from it. `threaded` gives a new
        conversation live thread hashes (capture_live); messages added after a threaded one always get them.
        Runs in its own transaction unless `db` (an open transaction) is given, e.g. by a bulk import.
        """
        check_messages(messages)
        if db is None:
            with self.tx() as tx:
                return self.capture(
                    user_id, messages, source=source, seed=seed, after=after, title=title, external_id=external_id,
                    context=context, created_at=created_at, threaded=threaded, db=tx,
                )
        if (seed is None) == (after is None):
            raise ValueError("capture() needs exactly one of seed and after")
        # Where new messages go unless a stored chain of the request says otherwise: message i gets
        # position offset + i, the first one `parent` as its parent, and thread hashes continue from `thread`.
        offset, parent, conv_id, thread = 0, None, None, seed_hash(LIVE_SEED) if threaded else None
        if after is not None:
            row = db.execute(
                "SELECT chain_sha256, position, conversation_id, thread_sha256 FROM messages WHERE id = ? AND user_id = ?",
                (after, user_id),
            ).fetchone()
            if row is None:
                raise NotFound(f"no message {after}")
            start, offset, conv_id, parent, thread = row[0], row[1] + 1, row[2], after, row[3]
        else:
            start = seed_hash(seed)
        chains = chain_hashes(start, messages)
        existing = {r[0]: r[1:] for r in _rows_by(db, user_id, "chain_sha256", chains)}
        last = max((i for i, c in enumerate(chains) if c in existing), default=-1)
        ids: list[str | None] = [existing[c][0] if c in existing else None for c in chains[: last + 1]]
        if last >= 0:
            parent, conv_id, position, thread = existing[chains[last]]
            offset = position - last
        elif conv_id is None:
            conv_id = uuid.uuid4().hex
            first = created_at or messages[0].created_at or time.time()
            db.execute(
                "INSERT INTO conversations (id, user_id, source, external_id, title, context, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conv_id, user_id, source, external_id, title, json.dumps(context) if context else None, first, first),
            )
        rest = messages[last + 1 :]
        threads = chain_hashes(thread, rest) if thread else [None] * len(rest)
        now = time.time()
        new_ids, stored = [], []
        for i, m, t in zip(range(last + 1, len(messages)), rest, threads):
            mid = uuid.uuid4().hex
            db.execute(
                "INSERT INTO messages (id, conversation_id, user_id, parent_id, position, role, content, model,"
                " source, chain_sha256, thread_sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, conv_id, user_id, parent, offset + i, m.role, m.content, m.model, source, chains[i], t,
                 m.created_at or now),
            )
            ids.append(mid)
            new_ids.append(mid)
            stored.append((mid, parent, m.role, m.content, m.created_at or now))
            parent = mid
        if new_ids:
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conv_id))
            index_replies(db, user_id, conv_id, stored)  # the memory index, in this same transaction
        kept = sum(i is not None for i in ids[: last + 1])
        return CaptureResult(conv_id, ids, added=len(new_ids), duplicates=kept, new_ids=new_ids, deleted=last + 1 - kept)

    def capture_live(
        self,
        user_id: str,
        messages: list[NewMessage],
        *,
        source: str,
        history: int | None = None,
        context: dict | None = None,
        db=None,
    ) -> CaptureResult:
        """Store an exchange that names no conversation; `messages[:history]` is what the client sent (default:
        all), e.g. an OpenAI request's messages, followed by the answer. See the module doc for the rule."""
        check_messages(messages)
        if db is None:
            with self.tx() as tx:
                return self.capture_live(user_id, messages, source=source, history=history, context=context, db=tx)
        sent = messages if history is None else messages[:history]
        first_reply = next((i for i, m in enumerate(sent) if m.role == "assistant"), None)
        threads = chain_hashes(seed_hash(LIVE_SEED), messages)
        anchor = None
        if first_reply is not None:  # else only opening turns: a new chat, even if an earlier one opened alike
            found = {r[0]: r[1:] for r in _rows_by(db, user_id, "thread_sha256", threads[first_reply:])}  # best last
            anchor = max((i for i in range(first_reply, len(threads)) if threads[i] in found), default=None)
        if anchor is None:
            return self.capture(user_id, messages, source=source, seed=f"{LIVE_SEED}:{uuid.uuid4().hex}", context=context,
                                threaded=True, db=db)
        anchor_id, conv_id = found[threads[anchor]][:2]
        # The ids of the earlier messages, as stored on the anchor's conversation (None where deleted).
        here = {r[0]: r[1] for r in _rows_by(db, user_id, "thread_sha256", threads[:anchor]) if r[2] == conv_id}
        ids = [here.get(t) for t in threads[:anchor]] + [anchor_id]
        kept = sum(i is not None for i in ids)
        if anchor == len(messages) - 1:
            return CaptureResult(conv_id, ids, duplicates=kept, deleted=len(ids) - kept)
        res = self.capture(user_id, messages[anchor + 1 :], source=source, after=anchor_id, db=db)
        return CaptureResult(conv_id, ids + res.message_ids, added=res.added, duplicates=kept + res.duplicates,
                             new_ids=res.new_ids, deleted=len(ids) - kept + res.deleted)

    def add_feedback(
        self,
        user_id: str,
        message_id: str,
        *,
        thumbs: int | None = None,
        rating: int | None = None,
        edited_content: str | None = None,
        comment: str | None = None,
        db=None,
    ) -> int:
        """Attach feedback to one of the user's messages; inside the caller's transaction if `db` is given."""
        if thumbs not in (None, -1, 1):
            raise InvalidInput(f"thumbs={thumbs!r} must be -1 (down) or 1 (up)")
        if rating is not None and not 1 <= rating <= 5:
            raise InvalidInput(f"rating={rating!r} must be between 1 and 5")
        if thumbs is None and rating is None and edited_content is None and comment is None:
            raise InvalidInput("feedback is empty", hint="give thumbs, rating, edited_content or comment")
        if db is None:
            with self.tx() as tx:
                return self.add_feedback(
                    user_id, message_id, thumbs=thumbs, rating=rating, edited_content=edited_content, comment=comment, db=tx
                )
        row = db.execute("SELECT role FROM messages WHERE id = ? AND user_id = ?", (message_id, user_id)).fetchone()
        if row is None:  # another user's message looks exactly like a missing one
            raise NotFound(f"no message {message_id}")
        if edited_content is not None and row[0] != "assistant":
            raise InvalidInput("only an assistant reply can be edited", hint=f"message {message_id} is a {row[0]} message")
        cur = db.execute(
            "INSERT INTO feedback (message_id, user_id, thumbs, rating, edited_content, comment, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (message_id, user_id, thumbs, rating, edited_content, comment, time.time()),
        )
        self.audit(db, user_id, "feedback", message_id=message_id, thumbs=thumbs, rating=rating, edited=edited_content is not None)
        return cur.lastrowid

    def stats(self, user_id: str) -> dict:
        (conversations,), = self.query("SELECT count(*) FROM conversations WHERE user_id = ?", (user_id,))
        (messages,), = self.query("SELECT count(*) FROM messages WHERE user_id = ?", (user_id,))
        (feedback,), = self.query("SELECT count(*) FROM feedback WHERE user_id = ?", (user_id,))
        return {"conversations": conversations, "messages": messages, "feedback": feedback}

    def list_conversations(self, user_id: str, limit: int = 50, offset: int = 0) -> list[dict]:
        """Newest first. `preview`: the first user message, whitespace folded, at most PREVIEW_CHARS (None
        without one) — what names a conversation that has no title (most imports and live chats)."""
        rows = self.query(
            "SELECT c.id, c.title, c.source, c.created_at, c.updated_at, count(m.id),"
            " (SELECT substr(f.content, 1, ?) FROM messages f WHERE f.conversation_id = c.id AND f.role = 'user'"
            "  ORDER BY f.position, f.rowid LIMIT 1) FROM conversations c"
            " LEFT JOIN messages m ON m.conversation_id = c.id WHERE c.user_id = ?"
            " GROUP BY c.id ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ? OFFSET ?",  # total order: pages never overlap
            (4 * PREVIEW_CHARS, user_id, limit, offset),
        )
        keys = ("id", "title", "source", "created_at", "updated_at", "messages")
        return [dict(zip(keys, r[:6]), preview=_preview(r[6])) for r in rows]

    def get_messages(self, user_id: str, conversation_id: str) -> list[dict]:
        """All messages of one of the user's conversations, in insertion order (branches included)."""
        if not self.query("SELECT 1 FROM conversations WHERE id = ? AND user_id = ?", (conversation_id, user_id)):
            raise NotFound(f"no conversation {conversation_id}")
        rows = self.query(
            "SELECT id, parent_id, position, role, content, model, source, created_at FROM messages"
            " WHERE conversation_id = ? ORDER BY rowid",
            (conversation_id,),
        )
        keys = ("id", "parent_id", "position", "role", "content", "model", "source", "created_at")
        return [dict(zip(keys, r)) for r in rows]

    def thread(self, user_id: str, message_id: str) -> list[dict]:
        """The path from the conversation's start to `message_id` (the context a reply was written in)."""
        rows = self.query(
            "WITH RECURSIVE up(id, parent_id, role, content, depth) AS ("
            " SELECT id, parent_id, role, content, 0 FROM messages WHERE id = ? AND user_id = ?"
            " UNION ALL SELECT m.id, m.parent_id, m.role, m.content, up.depth + 1 FROM messages m"
            " JOIN up ON m.id = up.parent_id)"
            " SELECT id, role, content FROM up ORDER BY depth DESC",
            (message_id, user_id),
        )
        if not rows:
            raise NotFound(f"no message {message_id}")
        return [{"id": r[0], "role": r[1], "content": r[2]} for r in rows]

    def latest_message(self, user_id: str, conversation_id: str) -> str | None:
        if not self.query("SELECT 1 FROM conversations WHERE id = ? AND user_id = ?", (conversation_id, user_id)):
            raise NotFound(f"no conversation {conversation_id}")
        rows = self.query("SELECT id FROM messages WHERE conversation_id = ? ORDER BY rowid DESC LIMIT 1", (conversation_id,))
        return rows[0][0] if rows else None

    def message_place(self, user_id: str, message_id: str) -> tuple[str, str]:
        """(conversation id, role) of one of the user's messages; another user's looks like a missing one."""
        rows = self.query("SELECT conversation_id, role FROM messages WHERE id = ? AND user_id = ?", (message_id, user_id))
        if not rows:
            raise NotFound(f"no message {message_id}")
        return rows[0][0], rows[0][1]

    def _blank_examples(self, db, conversation_ids: list[str]) -> None:
        """Drop the text of dataset examples made from these conversations (their hashes stay for the audit)."""
        for cid in conversation_ids:
            db.execute("UPDATE dataset_examples SET messages = NULL WHERE conversation_id = ?", (cid,))

    def delete_preview(self, user_id: str, *, before: float | None = None, conversation_id: str | None = None) -> dict:
        """What `delete_data` with the same arguments would remove, counted and nothing changed; `models`: ids
        of the installed models trained on that data (removed unless kept), `models_unlinked`: see
        `models_trained_on`."""
        if before is not None and conversation_id is not None:
            raise InvalidInput("give either a date or a conversation, not both")
        if conversation_id is not None:
            if not self.query("SELECT 1 FROM conversations WHERE id = ? AND user_id = ?", (conversation_id, user_id)):
                raise NotFound(f"no conversation {conversation_id}")
            where, params = "m.conversation_id = ?", (conversation_id,)
            n_conv = 1
        elif before is not None:
            where, params = "m.user_id = ? AND m.created_at < ?", (user_id, before)
            # a conversation goes when none of its messages is newer (delete_data drops the emptied ones)
            (n_conv,), = self.query(
                "SELECT count(*) FROM conversations c WHERE c.user_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.created_at >= ?)", (user_id, before),
            )
        else:
            where, params = "m.user_id = ?", (user_id,)
            (n_conv,), = self.query("SELECT count(*) FROM conversations WHERE user_id = ?", (user_id,))
        (n_msg,), = self.query(f"SELECT count(*) FROM messages m WHERE {where}", params)
        (n_fb,), = self.query(f"SELECT count(*) FROM feedback f JOIN messages m ON m.id = f.message_id WHERE {where}", params)
        if conversation_id is not None:
            touched: list[str] | None = [conversation_id]
        elif before is not None:
            touched = [r[0] for r in self.query(f"SELECT DISTINCT m.conversation_id FROM messages m WHERE {where}", params)]
        else:
            touched = None
        with self._read_lock:  # models_trained_on only reads: the reader connection will do
            linked, unlinked = self.models_trained_on(self._read_db, user_id, touched)
            elsewhere = self.models_of_others_trained_on(self._read_db, user_id, touched)
        return {"messages": n_msg, "conversations": n_conv, "feedback": n_fb, "models": linked, "models_unlinked": unlinked,
                "models_elsewhere": elsewhere}

    def delete_data(self, user_id: str, *, before: float | None = None, conversation_id: str | None = None,
                    keep_models: bool = False) -> dict:
        """Delete the user's conversations: all of them, every message created before `before` (unix s),
        or one conversation. Feedback goes with its message, and the memory index's passages with theirs
        (`memory.forget_passages`). Returns counts; the audit log records them.

        The right to delete reaches the models: every installed model trained on the deleted data (the Merkle
        audit of its dataset says which, see `models_trained_on`) is unregistered in the same transaction and
        its files removed, and a user it served is routed to the newest remaining model or the base — unless
        `keep_models`, the user's explicit choice, which keeps them and says so. So are other users' models
        merged from this data (node/merge.py records their sources' data roots). The result adds
        `models_removed`, `models_kept`, `models_unlinked` (ids), `models_removed_elsewhere` ({user id: ids}),
        `federation_rounds` (federated rounds among the removed models: the person's other devices hold their
        aggregates until a retire notice reaches them, privacy/fedretire.py) and `active_model` (None: the base)."""
        if before is not None and conversation_id is not None:
            raise InvalidInput("give either a date or a conversation, not both")
        with self.tx() as db:
            if conversation_id is not None:
                if not db.execute(
                    "SELECT 1 FROM conversations WHERE id = ? AND user_id = ?", (conversation_id, user_id)
                ).fetchone():
                    raise NotFound(f"no conversation {conversation_id}")
                scope = {"scope": "conversation", "conversation_id": conversation_id}
                linked, unlinked = self.models_trained_on(db, user_id, [conversation_id])
                elsewhere = self.models_of_others_trained_on(db, user_id, [conversation_id])
                self._blank_examples(db, [conversation_id])
                n_mem = forget_passages(db, "conversation_id = ?", (conversation_id,))
                n_msg = db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)).rowcount
                n_conv = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount
            elif before is not None:
                scope = {"scope": "before", "before": before}
                touched = [r[0] for r in db.execute(
                    "SELECT DISTINCT conversation_id FROM messages WHERE user_id = ? AND created_at < ?", (user_id, before)
                )]
                linked, unlinked = self.models_trained_on(db, user_id, touched)
                elsewhere = self.models_of_others_trained_on(db, user_id, touched)
                self._blank_examples(db, touched)
                old = "SELECT id FROM messages WHERE user_id = ? AND created_at < ?"  # a passage goes with either side
                n_mem = forget_passages(db, f"user_id = ? AND (question_id IN ({old}) OR answer_id IN ({old}))",
                                      (user_id, user_id, before, user_id, before))
                n_msg = db.execute("DELETE FROM messages WHERE user_id = ? AND created_at < ?", (user_id, before)).rowcount
                n_conv = db.execute(
                    "DELETE FROM conversations WHERE user_id = ? AND NOT EXISTS"
                    " (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id)",
                    (user_id,),
                ).rowcount
            else:
                scope = {"scope": "all"}
                linked, unlinked = self.models_trained_on(db, user_id, None)
                elsewhere = self.models_of_others_trained_on(db, user_id, None)
                db.execute(
                    "UPDATE dataset_examples SET messages = NULL WHERE dataset_id IN"
                    " (SELECT id FROM datasets WHERE user_id = ?)", (user_id,),
                )
                db.execute("DELETE FROM feedback WHERE user_id = ?", (user_id,))
                n_mem = forget_passages(db, "user_id = ?", (user_id,))
                n_msg = db.execute("DELETE FROM messages WHERE user_id = ?", (user_id,)).rowcount
                n_conv = db.execute("DELETE FROM conversations WHERE user_id = ?", (user_id,)).rowcount
            models = {"models_removed": [] if keep_models else linked, "models_kept": linked if keep_models else [],
                      "models_unlinked": unlinked, "models_removed_elsewhere": {} if keep_models else elsewhere,
                      # the person's other devices hold these rounds' aggregates too: privacy/fedretire.py tells them
                      "federation_rounds": [] if keep_models else self.federation_rounds_of(db, user_id, linked)}
            self.audit(db, user_id, "deleted", messages=n_msg, conversations=n_conv, memory_passages=n_mem, **scope, **models)
            if keep_models:
                active = db.execute("SELECT model_id FROM routing WHERE user_id = ?", (user_id,)).fetchone()
                active = active[0] if active else None
            else:
                active = self.drop_models(db, user_id, linked, reason="trained on deleted data")
                for owner, ids in elsewhere.items():  # merged from this user's data into another user's model
                    self.drop_models(db, owner, ids, reason="merged from another user's deleted data")
        # Files after COMMIT: a crash in between leaves unregistered directories that the audit names as
        # deleted, and node.recover removes them at the next start.
        self.remove_model_files(user_id, models["models_removed"])
        for owner, ids in models["models_removed_elsewhere"].items():
            self.remove_model_files(owner, ids)
        # The adapter kept for continual learning learned from these messages: it goes too (the next round
        # retrains from scratch; see learn/continual.py).
        forget(self.home, user_id)
        self.scrub()
        return {"messages": n_msg, "conversations": n_conv, "memory_passages": n_mem, **scope, **models,
                "active_model": active}

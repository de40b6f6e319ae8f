"""The memory index: BM25 retrieval over the user's own history, inside the encrypted store (SQLite FTS5).

A **passage** is one user turn and the assistant reply that followed it (the reply's parent is the question).
It is the unit a past fact comes back in: a user states something and the reply confirms or uses it, or the
user asks and the reply holds the answer (the persona fixtures put facts in replies: "You eat pescatarian").
A user turn with no reply yet is not a passage; a question answered twice (a regenerated reply) gives two.

The store keeps passages in `memory_passages` (redacted with store.redact, the dataset's redaction; each side
cut to PASSAGE_CHARS), and two FTS5 indexes over it, kept in step by triggers (migration m010_memory):
- `memory_fts`, tokenizer `porter unicode61 remove_diacritics 2`: words split at spaces and punctuation,
  lower-cased, accents folded, English endings stemmed ("dogs" finds "dog");
- `memory_trigram`, tokenizer `trigram`, only for passages holding a script written without spaces (Thai,
  Chinese, Japanese, Lao, Khmer, Myanmar): unicode61 makes a whole run of such text one token, so
  "犬の名前" could never match inside "私の犬の名前はポチです"; trigrams match any 3-character substring.
Both have FTS5's `secure-delete` on, so deleting a passage removes its terms from the index pages at once
(a plain FTS5 delete only records a tombstone and leaves the terms in the b-tree until a merge).

Passages are written in the transaction that stores their reply (capture and import) and go with their
messages: both message ids are foreign keys ON DELETE CASCADE, and the delete triggers remove the index
entries in the same transaction, whichever way the messages went (one conversation, before a date, all).
A secure delete rewrites index pages for each passage, where FTS5's 'rebuild' re-reads the remaining passages
once (bench/memory_scale.py times both); so a delete of many passages
(`forget_passages`) removes them with the per-row triggers off and rebuilds both indexes, in one transaction.

Queries never pass user text as FTS5 syntax: `match_query` splits it into plain words, drops stopwords, and
quotes each term ("what is my dog's name" -> `"dog" OR "name"`), so quotes, NEAR, AND/OR/NOT, `*`, `^`,
`column:` filters and parentheses in the text are just words or nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ownlm.store.redact import redact

PASSAGE_CHARS = 4000  # each side of a passage keeps this much (a pasted log would fill the index, not memory)
SNIPPET_CHARS = 80  # what the API shows of a passage it drew on
MAX_TERMS = 32  # query terms kept: a pasted page must not become a query over thousands of terms
CANDIDATES = 4  # rows read per passage asked for, so duplicates and excluded rows can be dropped
# `forget_passages` rebuilds the indexes instead of deleting row by row once the rows to delete cost more than the
# rebuild: beyond 1 deleted per 50 kept (a secure delete costs many times a passage's share of a rebuild; the
# ratio is a judgement, not a measurement: bench/memory_scale.py times delete and rebuild at scale).
BULK_MIN, BULK_RATIO = 200, 50

# Scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, CJK ideographs (with extension A
# and compatibility forms), Hiragana, Katakana and half-width Katakana.
SPACELESS = re.compile(r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF"
                       r"\uF900-\uFAFF\uFF66-\uFF9F]+")
WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; everything else separates

# English function words and chat filler that say nothing about *which* memory is meant ("do you remember
# what my dog is called" should look for "dog" and "called", not for "you" and "remember").
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren as ask asked at be because been before being
below between both but by can cannot could couldn did didn do does doesn doing don down during each else ever
few for from further get got had hadn has hasn have haven having he her here hers herself him himself his how i
if in into is isn it its itself just know let ll me mean might more most much must mustn my myself near no nor
not now of off on once only or other ought our ours ourselves out over own please re really recall remember
remind s same say said shall shan she should shouldn so some such t tell than thank thanks that the their theirs
them themselves then there these they this those though through to too under until up us ve very was wasn we
were weren what when where which while who whom why will with won would wouldn yes yet you your yours yourself
yourselves
""".split())


@dataclass(frozen=True)
class Passage:
    id: int
    conversation_id: str
    question: str  # redacted
    answer: str  # redacted
    score: float  # BM25 as FTS5 gives it: lower is better

    @property
    def snippet(self) -> str:
        """At most SNIPPET_CHARS of the question (the answer when the question is empty), whitespace folded."""
        text = " ".join((self.question or self.answer).split())
        return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"


def passage_text(text: str) -> str:
    """What the index keeps of one side of a passage: redacted, then cut to PASSAGE_CHARS."""
    return redact(text)[0][:PASSAGE_CHARS]


def terms(text: str) -> tuple[list[str], list[str]]:
    """(words, trigrams) to look for: lower-cased words of spaced scripts minus stopwords and one-letter words,
    and the 3-character windows of every run of a spaceless script; each list deduplicated, in text order."""
    runs = SPACELESS.findall(text)
    words = []
    for w in WORD.findall(SPACELESS.sub(" ", text).lower()):
        if w not in STOPWORDS and (len(w) > 1 or w.isdigit()) and w not in words:
            words.append(w)
    grams: list[str] = []
    for run in runs:
        for i in range(len(run) - 2):
            if run[i : i + 3] not in grams:
                grams.append(run[i : i + 3])
    return words[:MAX_TERMS], grams[:MAX_TERMS]


def match_query(items: list[str]) -> str | None:
    """An FTS5 query matching any of `items`, each a quoted string (a phrase of its own tokens, never syntax);
    None when there is nothing to look for. A `"` inside an item is doubled, FTS5's escape."""
    if not items:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in items)


def index_replies(db, user_id: str, conversation_id: str, new: list[tuple[str, str | None, str, str, float]]) -> int:
    """Add a passage for every newly stored assistant reply whose parent is a user turn; inside the caller's
    transaction (the one that stores the messages). `new`: (id, parent id, role, content, created_at) of the
    stored messages, in order. Returns the number of passages added."""
    known = {mid: (role, content) for mid, _, role, content, _ in new}
    added = 0
    for mid, parent, role, content, created in new:
        if role != "assistant" or parent is None:
            continue
        if parent not in known:  # the question was stored earlier (a WebSocket turn, a continued chat)
            row = db.execute("SELECT role, content FROM messages WHERE id = ?", (parent,)).fetchone()
            known[parent] = (row[0], row[1]) if row else (None, "")
        if known[parent][0] != "user":
            continue
        _insert(db, user_id, conversation_id, parent, mid, known[parent][1], content, created)
        added += 1
    return added


def _insert(db, user_id, conversation_id, question_id, answer_id, question, answer, created) -> None:
    q, a = passage_text(question), passage_text(answer)
    db.execute(
        "INSERT INTO memory_passages (user_id, conversation_id, question_id, answer_id, question, answer, spaceless,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (user_id, conversation_id, question_id, answer_id, q, a, int(bool(SPACELESS.search(q + a))), created),
    )


def forget_passages(db, where: str, params: tuple | list) -> int:
    """Delete the passages matching `where` (SQL over memory_passages) before their messages go, inside the
    caller's transaction; returns how many. Few go row by row through the triggers (as the foreign keys would
    do anyway); many go in bulk with both indexes rebuilt from the passages left (see the module doc)."""
    n = db.execute(f"SELECT count(*) FROM memory_passages WHERE {where}", params).fetchone()[0]
    total = db.execute("SELECT count(*) FROM memory_passages").fetchone()[0]
    if n >= BULK_MIN and n * BULK_RATIO >= total - n:
        db.execute("UPDATE memory_state SET bulk = 1")
        db.execute(f"DELETE FROM memory_passages WHERE {where}", params)
        # 'rebuild' drops every index page (secure_delete zeroes them) and indexes the content left
        db.execute("INSERT INTO memory_fts(memory_fts) VALUES ('rebuild')")
        db.execute("INSERT INTO memory_trigram(memory_trigram) VALUES ('rebuild')")
        db.execute("UPDATE memory_state SET bulk = 0")
    elif n:
        db.execute(f"DELETE FROM memory_passages WHERE {where}", params)
    return n


def reindex(db, user_id: str | None = None) -> int:
    """Build the passages of every stored reply again (all users, or one), inside the caller's transaction:
    the migration's backfill of stores made before the index, and `Store.rebuild_memory`."""
    where, params = ("", ()) if user_id is None else (" AND a.user_id = ?", (user_id,))
    forget_passages(db, "1" if user_id is None else "user_id = ?", () if user_id is None else (user_id,))
    rows = db.execute(
        "SELECT a.user_id, a.conversation_id, q.id, a.id, q.content, a.content, a.created_at FROM messages a"
        " JOIN messages q ON q.id = a.parent_id WHERE a.role = 'assistant' AND q.role = 'user'" + where
        + " ORDER BY a.rowid", params,
    ).fetchall()
    for r in rows:
        _insert(db, *r)
    return len(rows)


class MemoryMixin:
    def recall(self, user_id: str, text: str, limit: int = 4, *, exclude_conversation: str | None = None,
               exclude_questions: tuple[str, ...] | list[str] = ()) -> list[Passage]:
        """The user's passages that best match `text` (BM25, best first), at most `limit`, without repeats.

        `exclude_conversation`: leave out the conversation being continued (its turns are in the prompt anyway);
        `exclude_questions`: leave out passages whose question is one of these texts (redacted as stored).
        Only this user's passages can come back: the query is filtered on the passage's user id.
        """
        if limit < 1:
            return []
        words, grams = terms(text)
        skip = {passage_text(q) for q in exclude_questions}
        rows: list[tuple] = []  # (place in its index's ranking, row)
        for table, items in (("memory_fts", words), ("memory_trigram", grams)):
            query = match_query(items)
            if query is None:
                continue
            sql = (f"SELECT p.id, p.conversation_id, p.question, p.answer, f.rank FROM {table} f"
                   f" JOIN memory_passages p ON p.id = f.rowid WHERE {table} MATCH ? AND p.user_id = ?")
            params: list = [query, user_id]
            if exclude_conversation is not None:
                sql += " AND p.conversation_id != ?"
                params.append(exclude_conversation)
            rows += enumerate(self.query(sql + " ORDER BY f.rank LIMIT ?", [*params, limit * CANDIDATES]))
        # The two indexes are merged by place, not score: their BM25 values are not on one scale (trigram
        # statistics count only the few spaceless passages). A stable sort keeps memory_fts first on a tie.
        out, seen = [], set()
        for pid, cid, q, a, score in (row for _, row in sorted(rows, key=lambda r: r[0])):
            if pid in seen or (q, a) in seen or q in skip:
                continue
            seen.update((pid, (q, a)))
            out.append(Passage(pid, cid, q, a, score))
            if len(out) == limit:
                break
        return out

    def memory_count(self, user_id: str) -> int:
        return self.query("SELECT count(*) FROM memory_passages WHERE user_id = ?", (user_id,))[0][0]

    def rebuild_memory(self, user_id: str) -> int:
        """Index the user's stored replies again from scratch (e.g. after redaction rules changed)."""
        with self.tx() as db:
            n = reindex(db, user_id)
            self.audit(db, user_id, "memory_rebuilt", passages=n)
        return n

    def memory_setting(self, user_id: str) -> bool | None:
        """The user's own choice (True on, False off), or None: the node's `memory.enabled` decides."""
        rows = self.query("SELECT memory FROM users WHERE id = ?", (user_id,))
        return None if not rows or rows[0][0] is None else bool(rows[0][0])

    def set_memory(self, user_id: str, enabled: bool | None) -> None:
        with self.tx() as db:
            old = db.execute("SELECT memory FROM users WHERE id = ?", (user_id,)).fetchone()
            db.execute("UPDATE users SET memory = ? WHERE id = ?", (None if enabled is None else int(enabled), user_id))
            self.audit(db, user_id, "memory_setting_changed", old=None if not old or old[0] is None else bool(old[0]),
                       new=enabled)

    def audit_memory_use(self, db, user_id: str, passages: list[Passage]) -> None:
        """Record that memory went into a prompt: counts only, never the text (inside the caller's transaction)."""
        if passages:
            self.audit(db, user_id, "memory_used", passages=len(passages),
                       conversations=len({p.conversation_id for p in passages}))

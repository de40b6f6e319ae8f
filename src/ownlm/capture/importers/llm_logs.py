"""The `llm` CLI's `logs.db` (simonw/llm), read-only.

Two schemas exist, and a database migrated across versions can hold both, so both are read:

- Legacy (migrations m010 onwards, and the even older `log`/`logs` table): one row per prompt/response pair,

      responses(id, model, prompt, system, response, conversation_id, datetime_utc: naive ISO in UTC, ...)
      conversations(id, name, model)

  Rows are grouped by `conversation_id` (a row without one is a conversation of its own) and ordered by
  `datetime_utc`, then `id` (ULIDs, so time-ordered too). A system prompt becomes a system message when it
  first appears or changes; `llm -c` repeats it on every row.

- Message store (m023): content-addressed messages forming a tree, threads pointing at their tip,

      threads(id, name, tip_message_hash, forked_from, datetime_utc)
      messages(hash, parent_hash, role: system|user|assistant|tool)
      parts(message_hash, position, type: text|reasoning|tool_call|tool_result|attachment, text, payload: JSON)
      turns(id, thread_id, parent_message_hash, tip_message_hash, model, resolved_model, datetime_utc)

  A thread is the chain from its tip up through `parent_hash`. Messages carry no time or model of their own;
  the turn whose segment (tip back to, not including, parent_message_hash) contains a message supplies them.
  Text that reuses a stored fragment sits in `payload.text_ref` as literal/fragment pieces.

The file is opened with `mode=ro`, so importing can never change someone's llm history. (Not `immutable=1`:
the CLI reads the live logs.db, and immutable would skip its WAL and locks.) The file is the user's, but an
upload can be anyone's, so reading it is bounded work: the tables read must be plain tables (a view can be an
endless recursive query, a computed column or virtual table runs code on every read), a value is at most
`MAX_VALUE_BYTES`, and a progress handler aborts reading past a budget of SQLite VM steps that grows with
the file's size, or past `MAX_SECONDS`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ownlm.errors import ImportFormatError

from ._common import Progress, conversation_guard, loads, report, str_or_none, to_timestamp, walk_to_root
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "llm_logs"
DESCRIPTION = "llm CLI logs.db (SQLite; legacy responses table and the threads/messages store)"

# Legacy tables, newest first: (table, conversation column, time columns tried in order).
_LEGACY = (
    ("responses", "conversation_id", ("datetime_utc",)),
    ("logs", "chat_id", ("datetime_utc", "timestamp_utc", "timestamp")),
    ("log", "chat_id", ("datetime_utc", "timestamp_utc", "timestamp")),
)
_STORE_TABLES = {"threads", "messages", "parts"}
_READ = {t for t, _, _ in _LEGACY} | _STORE_TABLES | {"conversations", "turns", "fragments"}  # every table read

# The work bound of one read. A plain read of an llm database visits each row a few times and sorts once: 0.07
# SQLite VM steps per byte of file measured (30 MB, 140,000 messages), so STEPS_PER_BYTE leaves a wide margin;
# the floor lets small files be read whatever their shape. 50 M steps are about 1.3 s of SQLite work.
STEPS_PER_BYTE = 50
MIN_STEPS = 50_000_000
MAX_SECONDS = 600.0  # for the few expensive steps a step count does not see (large values)
MAX_VALUE_BYTES = 64 * 1024 * 1024  # one prompt or response; llm's largest are pasted files, far below this
_TICK = 1_000  # VM steps per progress-handler call


class _Budget:
    """set_progress_handler callback: nonzero (abort the statement) once the steps or the time are spent."""

    def __init__(self, steps: int, seconds: float):
        self.ticks, self.deadline, self.spent = steps // _TICK, time.monotonic() + seconds, False

    def __call__(self) -> int:
        self.ticks -= 1
        if self.ticks < 0 or (self.ticks % 1000 == 0 and time.monotonic() > self.deadline):
            self.spent = True
        return int(self.spent)


class _Conn(sqlite3.Connection):
    """A connection that carries its work budget (a plain sqlite3.Connection takes no new attributes)."""

    budget: _Budget


def open_readonly(path: Path, max_steps: int | None = None) -> _Conn:
    """Open read-only with the work bound; `max_steps` (SQLite VM steps) defaults to the file size's budget."""
    path = Path(path)
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, factory=_Conn)
    conn.row_factory = sqlite3.Row
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    if max_steps is None:
        max_steps = max(MIN_STEPS, STEPS_PER_BYTE * path.stat().st_size)
    conn.budget = _Budget(max_steps, MAX_SECONDS)
    conn.set_progress_handler(conn.budget, _TICK)
    return conn


def tables(conn: sqlite3.Connection) -> set[str]:
    """The plain tables of the file; a view, virtual table or computed column among the tables read is refused."""
    names = set()
    for name, kind, sql in conn.execute("select name, type, sql from sqlite_master where type in ('table', 'view')"):
        name = name.lower()  # SQLite resolves names without regard to case: a view `Conversations` is read too
        if name not in _READ:
            continue
        if kind != "table":
            raise ImportFormatError(f"`{name}` in this SQLite file is a {kind}, not a table: llm writes plain tables",
                                    hint="pass the logs.db that `llm logs path` prints")
        if (sql or "").upper().startswith("CREATE VIRTUAL"):  # SQLite keeps this prefix normalised
            raise ImportFormatError(f"`{name}` in this SQLite file is a virtual table, not a plain one",
                                    hint="pass the logs.db that `llm logs path` prints")
        if any(row[6] in (2, 3) for row in conn.execute(f'pragma table_xinfo("{name}")')):
            raise ImportFormatError(f"`{name}` in this SQLite file has computed (generated) columns, which llm never writes",
                                    hint="pass the logs.db that `llm logs path` prints")
        names.add(name)
    return names


def is_llm_logs(conn: sqlite3.Connection) -> bool:
    names = tables(conn)
    return any(t in names for t, _, _ in _LEGACY) or _STORE_TABLES <= names


def parse(path: Path, progress: Progress | None = None, max_steps: int | None = None) -> ImportResult:
    """Read the logs.db at `path`; `max_steps` overrides the work budget (see open_readonly)."""
    conn = None
    try:
        conn = open_readonly(Path(path), max_steps)
        try:
            return _parse(conn, progress)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if conn is not None and conn.budget.spent:
            raise ImportFormatError(
                f"{path} needs more work to read than an llm logs.db of its size, so reading it was stopped",
                hint="pass the logs.db that `llm logs path` prints, unchanged",
            ) from None
        raise ImportFormatError(
            f"{path} could not be read as an llm logs database: {exc}",
            hint="pass the logs.db that `llm logs path` prints; if llm is writing to it right now, copy it first",
        ) from exc


def _parse(conn: sqlite3.Connection, progress: Progress | None) -> ImportResult:
    result = ImportResult(format=NAME)
    names = tables(conn)
    if not is_llm_logs(conn):
        raise ImportFormatError(
            "this SQLite file has none of llm's log tables (responses, threads/messages/parts)",
            hint="pass the logs.db that `llm logs path` prints",
        )
    legacy = [_legacy_conversations(conn, spec, names, result) for spec in _LEGACY if spec[0] in names]
    legacy_groups = [group for groups in legacy for group in groups]
    threads = _store_threads(conn) if _STORE_TABLES <= names else []
    total = len(legacy_groups) + len(threads)

    done = 0
    for conversation in legacy_groups:
        _append(result, done, conversation)
        done += 1
        report(progress, done, total)
    if threads:
        store = _Store(conn, names)
        for thread in threads:
            with conversation_guard(result, done, str_or_none(thread["id"])):  # e.g. a payload that is not JSON
                _append(result, done, store.thread(thread, result))
            done += 1
            report(progress, done, total)
    return result


def _append(result: ImportResult, index: int, conversation: ImportedConversation) -> None:
    if conversation.messages:
        result.conversations.append(conversation)
    else:
        result.bad.append(BadConversation(index, conversation.external_id, "no prompt or response text"))


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f'pragma table_info("{table}")')}


def _legacy_conversations(
    conn: sqlite3.Connection, spec: tuple, names: set[str], result: ImportResult
) -> list[ImportedConversation]:
    """Legacy rows grouped into conversations, ordered by their first row's time."""
    table, conv_col, time_cols = spec
    cols = _columns(conn, table)
    time_col = next((c for c in time_cols if c in cols), None)
    pick = {c: (f'"{c}"' if c in cols else "null") for c in ("id", "model", "prompt", "system", "response")}
    if "resolved_model" in cols:  # m019: the exact model behind an alias such as "4o"
        pick["model"] = "coalesce(resolved_model, model)"
    select = ", ".join(f"{expr} as {name}" for name, expr in pick.items())
    conv_expr = f'"{conv_col}"' if conv_col in cols else "null"
    time_expr = f'"{time_col}"' if time_col else "null"
    rows = conn.execute(
        f'select {select}, {conv_expr} as conv, {time_expr} as at from "{table}" order by at, rowid'
    ).fetchall()

    titles: dict[str, str | None] = {}
    if table == "responses" and "conversations" in names:
        titles = {str(row["id"]): row["name"] for row in conn.execute("select id, name from conversations")}

    groups: dict[str, ImportedConversation] = {}
    last_system: dict[str, str] = {}
    for row in rows:
        if row["conv"] is not None:
            key = str(row["conv"])
        elif table == "responses":  # ULIDs and conversation ids are different names: keep them apart
            key = f"{table}:{row['id']}"
        else:  # the old `logs` table: a chat's first row has no chat_id, its follow-ups name that row's id
            key = str(row["id"])
        conversation = groups.get(key)
        created = to_timestamp(row["at"])
        if conversation is None:
            external = str(row["conv"]) if row["conv"] is not None else str_or_none(row["id"])
            conversation = groups[key] = ImportedConversation(external, str_or_none(titles.get(key)), [], created, NAME)
        system = (row["system"] or "").strip()
        if system and system != last_system.get(key):
            conversation.messages.append(ImportedMessage("system", system, created))
            last_system[key] = system
        for role, text in (("user", row["prompt"]), ("assistant", row["response"])):
            text = (text or "").strip() if isinstance(text, str) else ""
            if not text:
                result.skipped["empty"] += 1
                continue
            model = str_or_none(row["model"]) if role == "assistant" else None
            conversation.messages.append(ImportedMessage(role, text, created, model))
    return list(groups.values())


def _store_threads(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("select * from threads order by datetime_utc, rowid").fetchall()


class _Store:
    """The m023 message store, loaded once (messages, parts, turn provenance) so each thread is a walk."""

    def __init__(self, conn: sqlite3.Connection, names: set[str]):
        self.conn = conn
        self.parent: dict[str, str | None] = {}
        self.role: dict[str, str] = {}
        for row in conn.execute("select hash, parent_hash, role from messages"):
            self.parent[row["hash"]] = row["parent_hash"]
            self.role[row["hash"]] = row["role"]
        self.parts: dict[str, list[sqlite3.Row]] = {}
        for row in conn.execute("select message_hash, type, text, payload from parts order by message_hash, position"):
            self.parts.setdefault(row["message_hash"], []).append(row)
        self.has_fragments = "fragments" in names
        self.fragments: dict[int, str] = {}
        # (thread id, message hash) -> (model, unix seconds) of the turn that first added the message.
        self.provenance: dict[tuple[str, str], tuple[str | None, float | None]] = {}
        if "turns" in names:
            self._load_turns()

    def _load_turns(self) -> None:
        cols = _columns(self.conn, "turns")
        model = "coalesce(resolved_model, model)" if "resolved_model" in cols else "model"
        rows = self.conn.execute(
            f"select thread_id, parent_message_hash, tip_message_hash, {model} as model, datetime_utc "
            "from turns order by datetime_utc, rowid"
        )
        for row in rows:
            at = to_timestamp(row["datetime_utc"])
            node, stop, seen = row["tip_message_hash"], row["parent_message_hash"], set()
            # Each turn's segment is walked once: total work is the number of messages, not quadratic.
            while node is not None and node != stop and node in self.parent and node not in seen:
                seen.add(node)
                self.provenance.setdefault((row["thread_id"], node), (str_or_none(row["model"]), at))
                node = self.parent[node]

    def thread(self, thread: sqlite3.Row, result: ImportResult) -> ImportedConversation:
        tip = thread["tip_message_hash"]
        chain = [] if tip is None else walk_to_root(tip, self.parent.get, lambda h: h in self.parent)
        messages = []
        for message_hash in chain:
            role = self.role[message_hash]
            if role not in ("system", "user", "assistant"):
                result.skipped["tool" if role == "tool" else "unknown_role"] += 1
                continue
            parts = self.parts.get(message_hash, [])
            text = self._text(parts, result)
            if not text:
                # A message of only tool calls or reasoning was counted by part type already.
                if all(part["type"] == "text" for part in parts):
                    result.skipped["empty"] += 1
                continue
            model, at = self.provenance.get((thread["id"], message_hash), (None, None))
            messages.append(ImportedMessage(role, text, at, model if role == "assistant" else None))
        return ImportedConversation(
            external_id=str_or_none(thread["id"]),
            title=str_or_none(thread["name"]),
            messages=messages,
            created_at=to_timestamp(thread["datetime_utc"]),
            source=NAME,
        )

    def _text(self, parts: Iterable[sqlite3.Row], result: ImportResult) -> str:
        pieces = []
        for part in parts:
            kind = part["type"]
            if kind != "text":
                result.skipped[str(kind)] += 1  # reasoning, tool_call, tool_result, attachment
                continue
            if part["text"] is not None:
                pieces.append(part["text"])
            elif part["payload"]:
                pieces.append(self._resolve_refs(loads(part["payload"])))
        # Parts are exact pieces of one message; llm concatenates text parts without a separator.
        return "".join(pieces).strip()

    def _resolve_refs(self, payload: dict[str, Any]) -> str:
        """Rebuild text stored as `text_ref`: [{"literal": str} | {"fragment": fragment id}]."""
        if isinstance(payload.get("text"), str):
            return payload["text"]
        out = []
        for piece in payload.get("text_ref") or []:
            if "literal" in piece:
                out.append(piece["literal"])
            elif "fragment" in piece:
                out.append(self._fragment(int(piece["fragment"])))
        return "".join(out)

    def _fragment(self, fragment_id: int) -> str:
        if fragment_id not in self.fragments:
            row = None
            if self.has_fragments:
                row = self.conn.execute("select content from fragments where id = ?", [fragment_id]).fetchone()
            self.fragments[fragment_id] = (row["content"] or "") if row else ""
        return self.fragments[fragment_id]

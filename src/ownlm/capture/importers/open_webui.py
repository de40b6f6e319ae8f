"""Open WebUI chat exports.

Shapes: the bulk export, a list of

    {"id", "user_id", "title", "created_at": unix s, "chat": CHAT, ...}

or a single CHAT object, where

    CHAT = {"id", "title", "timestamp": unix ms, "models": [...],
            "history": {"currentId": id, "messages": {id: {"id", "parentId", "childrenIds", "role", "content",
                                                           "timestamp": unix s, "model"}}},
            "messages": [...]}                                   # flat copy of the visible branch, optional

The tree in `history` is authoritative: the branch ending at `currentId` is imported (the flat list is used
only when there is no history). Reasoning and tool calls are inlined into `content` as
`<details type="reasoning">…</details>` blocks; the UI folds them away, so they are removed and counted.

Doubled apostrophes: SOURCES.md documents chats whose text went through SQL escaping, so every `'` became
`''`. When *every* run of apostrophes in a chat (title and messages) has even length, the chat was escaped
and each run is halved. A chat with even one odd run (a real `'` next to a code literal `''`) is left as is,
so the rule never damages a normal chat and always gives the same answer for the same input.
"""

from __future__ import annotations

import re
from typing import Any

from ._common import (
    Progress,
    as_list,
    conversation_guard,
    first_dicts,
    latest_leaf,
    report,
    str_or_none,
    to_timestamp,
    walk_to_root,
)
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "open_webui"
DESCRIPTION = "Open WebUI chat export (JSON)"

ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
_DETAILS = re.compile(r"<details\b(?P<attrs>[^>]*)>.*?</details>\s*", re.DOTALL)
_TYPE_ATTR = re.compile(r'type="([^"]*)"')
_APOSTROPHES = re.compile(r"'+")


def _chat_of(item: dict) -> dict | None:
    if isinstance(item.get("chat"), dict):
        return item["chat"]
    if isinstance(item.get("history"), dict):
        return item
    return None


def sniff(data: Any) -> bool:
    """True for chats with `history.messages` (a dict keyed by message id), bare or under `chat`."""
    for item in first_dicts(data):
        chat = _chat_of(item)
        if chat is not None and isinstance(chat.get("history", {}).get("messages"), dict):
            return True
    return False


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    items = as_list(data)
    total = len(items)
    for index, item in enumerate(items):
        external_id = None
        if isinstance(item, dict):
            chat = _chat_of(item) or {}
            external_id = str_or_none(item.get("id") or chat.get("id"))
        with conversation_guard(result, index, external_id):
            _parse_item(item, index, external_id, result)
        report(progress, index + 1, total)
    return result


def _parse_item(item: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    chat = _chat_of(item) if isinstance(item, dict) else None
    if chat is None:
        result.bad.append(BadConversation(index, external_id, "no `chat.history` (not an Open WebUI chat)"))
        return
    raw_messages = _visible_branch(chat, result)
    title = str_or_none(item.get("title") or chat.get("title"))
    contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in raw_messages]
    if _sql_escaped([title or "", *contents]):
        title = _halve(title) if title else title
        contents = [_halve(c) for c in contents]

    messages: list[ImportedMessage] = []
    for raw, content in zip(raw_messages, contents):
        role = ROLES.get(raw.get("role"))
        if role is None:
            result.skipped["unknown_role"] += 1
            continue
        for match in _DETAILS.finditer(content):
            kind = _TYPE_ATTR.search(match.group("attrs"))
            result.skipped[kind.group(1) if kind else "details"] += 1
        text = _DETAILS.sub("", content).strip()
        if not text:
            result.skipped["empty"] += 1
            continue
        model = str_or_none(raw.get("model") or raw.get("modelName")) if role == "assistant" else None
        messages.append(ImportedMessage(role, text, to_timestamp(raw.get("timestamp")), model))
    if not messages:
        result.bad.append(BadConversation(index, external_id, "no messages with text"))
        return
    created = to_timestamp(item.get("created_at")) or to_timestamp(chat.get("timestamp"))
    result.conversations.append(ImportedConversation(external_id, title, messages, created, NAME))


def _visible_branch(chat: dict, result: ImportResult) -> list[dict]:
    """Messages from the root to `history.currentId` (or the newest leaf), oldest first."""
    tree = chat.get("history", {}).get("messages")
    if not isinstance(tree, dict) or not tree:
        flat = chat.get("messages")
        return [m for m in flat if isinstance(m, dict)] if isinstance(flat, list) else []
    nodes = {key: node for key, node in tree.items() if isinstance(node, dict)}
    leaf = chat["history"].get("currentId")
    if leaf not in nodes:
        leaf = latest_leaf(nodes, lambda n: n.get("parentId"), lambda n: to_timestamp(n.get("timestamp")))
    path = walk_to_root(leaf, lambda k: nodes[k].get("parentId"), lambda k: k in nodes)
    if len(nodes) > len(path):
        result.skipped["inactive_branch"] += len(nodes) - len(path)
    return [nodes[k] for k in path]


def _sql_escaped(texts: list[str]) -> bool:
    runs = [len(run) for text in texts for run in _APOSTROPHES.findall(text)]
    return bool(runs) and all(length % 2 == 0 for length in runs)


def _halve(text: str) -> str:
    return _APOSTROPHES.sub(lambda m: "'" * (len(m.group()) // 2), text)

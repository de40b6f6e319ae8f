"""Claude.ai exports: the bulk account export and the per-conversation web-API object.

Bulk export (Settings → Privacy → Export data), a list of

    {"uuid", "name", "created_at": ISO, "chat_messages": [
        {"uuid", "sender": "human" | "assistant", "created_at": ISO,
         "text": str,                                   # older exports: the only text there is
         "content": [{"type": "text", "text"} | {"type": "thinking", "thinking"} | {"type": "tool_use"} ...]}]}

Per-conversation web-API object (what the claude.ai front end fetches): one such conversation with `model`,
`current_leaf_message_uuid`, and `parent_message_uuid` on each message, forming a tree when the person
edited or retried. The branch ending at the current leaf is the one they saw; the rest is counted as
`inactive_branch`.

Only `text` blocks are imported; thinking and tool blocks are counted. Older exports inline the hidden
reasoning as `<antThinking>…</antThinking>` inside `text`; that is removed (the person never saw it) while
`<antArtifact>` bodies stay, because they are what the assistant wrote for the person.
"""

from __future__ import annotations

import re
from typing import Any

from ._common import (
    Progress,
    as_list,
    conversation_guard,
    first_dicts,
    join_text,
    latest_leaf,
    report,
    str_or_none,
    to_timestamp,
    walk_to_root,
)
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "claude"
DESCRIPTION = "Claude.ai export (bulk conversations.json or one conversation from the web API)"

ROLES = {"human": "user", "user": "user", "assistant": "assistant"}
_ANT_THINKING = re.compile(r"<antThinking>.*?</antThinking>\s*", re.DOTALL)


def sniff(data: Any) -> bool:
    """True when conversations carry `chat_messages` (both Claude shapes do), or, for API objects saved by
    other tools, `messages` with Claude's `sender` / `parent_message_uuid` fields."""
    for item in first_dicts(data):
        if "chat_messages" in item or "current_leaf_message_uuid" in item:
            return True
        messages = item.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            if "sender" in messages[0] and ("parent_message_uuid" in messages[0] or "uuid" in messages[0]):
                return True
    return False


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    conversations = as_list(data)
    total = len(conversations)
    for index, raw in enumerate(conversations):
        external_id = _conversation_id(raw) if isinstance(raw, dict) else None
        with conversation_guard(result, index, external_id):
            _parse_conversation(raw, index, external_id, result)
        report(progress, index + 1, total)
    return result


def _conversation_id(raw: dict) -> str | None:
    return str_or_none(raw.get("uuid") or raw.get("conversation_id") or raw.get("id"))


def _parse_conversation(raw: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    if not isinstance(raw, dict):
        result.bad.append(BadConversation(index, None, f"not a conversation object but {type(raw).__name__}"))
        return
    chat = raw.get("chat_messages", raw.get("messages"))
    if chat is None:
        result.bad.append(BadConversation(index, external_id, "no `chat_messages`"))
        return
    if not isinstance(chat, list):
        result.bad.append(BadConversation(index, external_id, "`chat_messages` is not a list"))
        return
    if not chat:
        result.bad.append(BadConversation(index, external_id, "`chat_messages` is empty"))
        return

    model = str_or_none(raw.get("model"))
    messages: list[ImportedMessage] = []
    for message in _visible_order(chat, raw.get("current_leaf_message_uuid"), result):
        imported = _convert(message, model, result)
        if imported is not None:
            messages.append(imported)
    if not messages:
        result.bad.append(BadConversation(index, external_id, "no importable messages (all were malformed or empty)"))
        return
    result.conversations.append(
        ImportedConversation(
            external_id=external_id,
            title=str_or_none(raw.get("name") or raw.get("title")),
            messages=messages,
            created_at=to_timestamp(raw.get("created_at") or raw.get("create_time")),
            source=NAME,
        )
    )


def _visible_order(chat: list, current_leaf: Any, result: ImportResult) -> list[dict]:
    """The messages the person saw, oldest first.

    With parent links (web-API shape): the path from the root to `current_leaf_message_uuid` (or, without
    it, to the leaf written last). Without them (bulk export): the list sorted by `created_at`. The sort is
    stable and real bulk exports list the occasional message out of time order, while a question and its
    answer share the same timestamp, so ties keep the export's order.
    """
    items = [m for m in chat if isinstance(m, dict)]
    if len(items) != len(chat):
        result.skipped["malformed_message"] += len(chat) - len(items)
    by_id = {m["uuid"]: m for m in items if isinstance(m.get("uuid"), str)}
    linked = any(m.get("parent_message_uuid") in by_id for m in items)
    if not linked:
        if all(to_timestamp(m.get("created_at")) is not None for m in items):
            return sorted(items, key=lambda m: to_timestamp(m.get("created_at")) or 0.0)
        return items

    leaf = current_leaf if isinstance(current_leaf, str) and current_leaf in by_id else None
    if leaf is None:
        leaf = latest_leaf(by_id, lambda m: m.get("parent_message_uuid"), lambda m: to_timestamp(m.get("created_at")))
    path = walk_to_root(leaf, lambda u: by_id[u].get("parent_message_uuid"), lambda u: u in by_id)
    inactive = len(items) - len(path)
    if inactive:
        result.skipped["inactive_branch"] += inactive
    return [by_id[u] for u in path]


def _convert(message: dict, model: str | None, result: ImportResult) -> ImportedMessage | None:
    sender = message.get("sender")
    role = ROLES.get(sender.lower()) if isinstance(sender, str) else None
    if role is None:
        result.skipped["no_sender" if sender is None else "unknown_role"] += 1
        return None

    if "content" in message:
        content = message["content"]
        if not isinstance(content, list):
            # `content: null` or a plain string: newer exports always write a list, so this message was
            # damaged on the way; its `text` cannot be trusted to be the same message either.
            result.skipped["malformed_content"] += 1
            return None
        pieces = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                pieces.append(block["text"])
            else:
                result.skipped[kind if isinstance(kind, str) else "malformed_block"] += 1
        # Text blocks are separated by tool calls or thinking in the UI: paragraphs, not lines.
        text = join_text(pieces, sep="\n\n")
        if not text and len(pieces) < len(content):  # only thinking/tool blocks: counted per block
            return None
    else:  # older bulk export: only `text`
        text = message.get("text") if isinstance(message.get("text"), str) else ""

    if role == "assistant" and "<antThinking>" in text:
        text, hidden = _ANT_THINKING.subn("", text)
        result.skipped["thinking"] += hidden
    text = text.strip()
    if not text:
        result.skipped["empty"] += 1
        return None
    return ImportedMessage(
        role=role,
        content=text,
        created_at=to_timestamp(message.get("created_at")),
        model=model if role == "assistant" else None,
    )

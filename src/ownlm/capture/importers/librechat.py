"""LibreChat's own conversation export.

Shape (one conversation per file):

    {"conversationId", "title", "endpoint", "exportAt": time-only string (not usable as a date),
     "options": {"model", ...}, "recursive": bool,
     "messages": [MSG]}        # recursive: roots with nested "children": [MSG]; else flat with parentMessageId
    MSG = {"messageId", "parentMessageId", "isCreatedByUser": bool, "sender", "text", "content"?: [parts],
           "model", "createdAt": ISO, "error": bool, "children"?: [MSG]}

The export holds the whole tree but no pointer to the branch on screen. The branch imported is the one
ending at the leaf written last (`createdAt`); leaves without times are ordered by depth, then by position in
the file, so the longest, latest thread wins. The other branches are counted as `inactive_branch`.
"""

from __future__ import annotations

from typing import Any

from ._common import Progress, conversation_guard, join_text, report, str_or_none, to_timestamp, walk_to_root
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "librechat"
DESCRIPTION = "LibreChat conversation export (JSON)"


def sniff(data: Any) -> bool:
    return isinstance(data, dict) and "conversationId" in data and isinstance(data.get("messages"), list)


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        external_id = str_or_none(item.get("conversationId")) if isinstance(item, dict) else None
        with conversation_guard(result, index, external_id):
            _parse_conversation(item, index, external_id, result)
        report(progress, index + 1, len(items))
    return result


def _flatten(roots: list) -> tuple[dict[str, dict], dict[str, int]]:
    """Nested or flat messages -> ({messageId: message}, {messageId: depth}), iteratively (no recursion limit)."""
    nodes: dict[str, dict] = {}
    depth: dict[str, int] = {}
    stack = [(m, None) for m in reversed(roots)]
    while stack:
        message, parent = stack.pop()
        if not isinstance(message, dict) or not isinstance(message.get("messageId"), str):
            continue
        key = message["messageId"]
        nodes[key] = message
        if parent is not None:
            message = {**message, "parentMessageId": parent}
            nodes[key] = message
        stack.extend((child, key) for child in reversed(message.get("children") or []))
    for key in nodes:  # depth by walking up; memoised so the whole pass is linear
        chain, node = [], key
        while node in nodes and node not in depth and node not in chain:
            chain.append(node)
            node = nodes[node].get("parentMessageId")
        base = depth.get(node, -1)
        for offset, item in enumerate(reversed(chain), start=1):
            depth[item] = base + offset
    return nodes, depth


def _parse_conversation(item: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
        result.bad.append(BadConversation(index, external_id, "no `messages` list"))
        return
    nodes, depth = _flatten(item["messages"])
    if not nodes:
        result.bad.append(BadConversation(index, external_id, "no messages"))
        return
    parents = {m.get("parentMessageId") for m in nodes.values()}
    leaves = [
        (to_timestamp(m.get("createdAt")) or float("-inf"), depth[key], pos, key)
        for pos, (key, m) in enumerate(nodes.items())
        if key not in parents
    ]
    leaf = max(leaves)[3]
    path = walk_to_root(leaf, lambda k: nodes[k].get("parentMessageId"), lambda k: k in nodes)
    if len(nodes) > len(path):
        result.skipped["inactive_branch"] += len(nodes) - len(path)

    default_model = str_or_none((item.get("options") or {}).get("model"))
    messages = []
    for key in path:
        imported = _convert(nodes[key], default_model, result)
        if imported is not None:
            messages.append(imported)
    if not messages:
        result.bad.append(BadConversation(index, external_id, "no messages with text"))
        return
    created = messages[0].created_at
    title = str_or_none(item.get("title"))
    result.conversations.append(ImportedConversation(external_id, title, messages, created, NAME))


def _convert(message: dict, default_model: str | None, result: ImportResult) -> ImportedMessage | None:
    if message.get("error"):  # an error banner shown instead of an answer
        result.skipped["error"] += 1
        return None
    role = "user" if message.get("isCreatedByUser") else "assistant"
    text = message.get("text") if isinstance(message.get("text"), str) else ""
    if not text.strip() and isinstance(message.get("content"), list):
        # Newer LibreChat (agents) keeps text in typed parts: {"type": "text", "text": str | {"value": str}}.
        pieces = []
        for part in message["content"]:
            kind = part.get("type") if isinstance(part, dict) else None
            value = part.get("text") if kind == "text" else None
            value = value.get("value") if isinstance(value, dict) else value
            if isinstance(value, str):
                pieces.append(value)
            else:
                result.skipped[kind if isinstance(kind, str) else "malformed_part"] += 1
        text = join_text(pieces, sep="\n\n")
    text = text.strip()
    if not text:
        result.skipped["empty"] += 1
        return None
    model = str_or_none(message.get("model")) or default_model if role == "assistant" else None
    return ImportedMessage(role, text, to_timestamp(message.get("createdAt")), model)

"""ChatGPT `conversations.json` (Settings → Data controls → Export).

Shape: a list of conversations (or one conversation object). Each conversation is

    {"id"/"conversation_id", "title", "create_time": unix s, "current_node": node id,
     "mapping": {node id: {"id", "parent": id | null, "children": [ids],
                           "message": null | {"author": {"role", "name"}, "create_time": unix s | null,
                                              "content": {"content_type", "parts"?: [str | dict], ...},
                                              "weight": 0.0 | 1.0, "recipient": "all" | tool name,
                                              "metadata": {"model_slug", "is_visually_hidden_from_conversation"}}}}}

The mapping is a tree: edits and regenerations add siblings, and `current_node` is the leaf the person last
looked at. Only that branch is imported (walking `parent` links up from it); messages on other branches are
counted as `inactive_branch`. Tool traffic, hidden context and non-text content are skipped and counted by
reason in `ImportResult.skipped`, checked in this order, one reason per node: `tool` (author role tool),
`system`, the content_type itself for non-text content (`code`, `execution_output`, `thoughts`,
`reasoning_recap`, `user_editable_context`, `tether_quote`, ...), `hidden` (weight 0 or
is_visually_hidden_from_conversation), `tool_call` (recipient is a tool, not the person), `unknown_role`,
`empty`; plus `image` per image part dropped from a multimodal message.
"""

from __future__ import annotations

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

NAME = "chatgpt"
DESCRIPTION = "ChatGPT conversations.json"

TEXT_TYPES = {"text", "multimodal_text"}
# Dict parts inside multimodal_text that still carry words the person saw (voice mode transcripts).
TEXT_PART_TYPES = {"audio_transcription"}
# Dict parts that are media; counted under a short reason instead of their long content_type.
IMAGE_PART_TYPES = {"image_asset_pointer"}


def sniff(data: Any) -> bool:
    """True for a ChatGPT export: conversations with a `mapping` (or at least `current_node`)."""
    return any("mapping" in item or "current_node" in item for item in first_dicts(data))


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    conversations = as_list(data)
    total = len(conversations)
    for index, raw in enumerate(conversations):
        external_id = str_or_none(raw.get("conversation_id") or raw.get("id")) if isinstance(raw, dict) else None
        with conversation_guard(result, index, external_id):
            _parse_conversation(raw, index, external_id, result)
        report(progress, index + 1, total)
    return result


def _parse_conversation(raw: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    if not isinstance(raw, dict):
        result.bad.append(BadConversation(index, None, f"not a conversation object but {type(raw).__name__}"))
        return
    mapping = raw.get("mapping")
    if not isinstance(mapping, dict):
        reason = "no `mapping` (its messages are missing)" if mapping is None else "`mapping` is not an object"
        result.bad.append(BadConversation(index, external_id, reason))
        return

    leaf = _pick_leaf(mapping, raw.get("current_node"))
    path = [] if leaf is None else walk_to_root(leaf, lambda n: _parent(mapping, n), lambda n: n in mapping)
    on_path = set(path)
    inactive = sum(
        1 for nid, node in mapping.items() if nid not in on_path and isinstance(node, dict) and node.get("message")
    )
    if inactive:
        result.skipped["inactive_branch"] += inactive

    messages: list[ImportedMessage] = []
    for node_id in path:
        message = mapping[node_id].get("message")
        if message is None:  # structural root ("client-created-root" or a uuid) with no content
            continue
        imported = _convert(message, result)
        if imported is not None:
            messages.append(imported)

    if not messages:
        result.bad.append(BadConversation(index, external_id, "no visible text messages"))
        return
    result.conversations.append(
        ImportedConversation(
            external_id=external_id,
            title=str_or_none(raw.get("title")),
            messages=messages,
            created_at=to_timestamp(raw.get("create_time")),
            source=NAME,
        )
    )


def _parent(mapping: dict, node_id: str) -> str | None:
    node = mapping.get(node_id)
    return node.get("parent") if isinstance(node, dict) else None


def _pick_leaf(mapping: dict, current: Any) -> str | None:
    """The visible leaf: `current_node` when it exists in the mapping; else the leaf written last."""
    if isinstance(current, str) and current in mapping:
        return current
    nodes = {key: node for key, node in mapping.items() if isinstance(node, dict)}

    def written(node: dict) -> float | None:
        return to_timestamp((node.get("message") or {}).get("create_time"))

    return latest_leaf(nodes, lambda n: n.get("parent"), written)


def _convert(message: dict, result: ImportResult) -> ImportedMessage | None:
    """One mapping message -> an ImportedMessage, or None after counting why it is skipped.

    The checks run from the most to the least specific reason, so each skipped node is counted once.
    """
    author = message.get("author") or {}
    role = author.get("role")
    content = message.get("content") or {}
    content_type = content.get("content_type", "text")
    metadata = message.get("metadata") or {}

    if role == "tool":  # python / browser / dalle output
        result.skipped["tool"] += 1
        return None
    if role == "system":  # the hidden system prompt, custom instructions
        result.skipped["system"] += 1
        return None
    if content_type not in TEXT_TYPES:  # code, thoughts, reasoning_recap, user_editable_context, tether_*
        result.skipped[content_type] += 1
        return None
    if message.get("weight") == 0 or metadata.get("is_visually_hidden_from_conversation"):
        result.skipped["hidden"] += 1
        return None
    if message.get("recipient") not in (None, "all"):  # the assistant talking to a tool, not the person
        result.skipped["tool_call"] += 1
        return None
    if role not in ("user", "assistant"):
        result.skipped["unknown_role"] += 1
        return None

    pieces: list[str] = []
    for part in content.get("parts") or []:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict):
            part_type = part.get("content_type", "unknown")
            if part_type in TEXT_PART_TYPES and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                result.skipped["image" if part_type in IMAGE_PART_TYPES else part_type] += 1
    text = join_text(pieces)
    if not text:
        if not any(isinstance(part, dict) for part in content.get("parts") or []):  # else counted per part
            result.skipped["empty"] += 1
        return None
    return ImportedMessage(
        role=role,
        content=text,
        created_at=to_timestamp(message.get("create_time")),
        model=str_or_none(metadata.get("model_slug")) if role == "assistant" else None,
    )

"""Grok (grok.com) data export.

Shape:

    {"conversations": [{"conversation": {"conversation_id", "title", "create_time": ISO, "leaf_response_id"?},
                        "responses": [{"response": {"response_id", "parent_response_id", "sender": "human" |
                                                    "ASSISTANT" | ..., "message", "create_time": ISO | {"$date"},
                                                    "model"?, "thinking_trace", "partial",
                                                    "metadata": {"requestModelDetails": {"modelId"}}}}]}]}

Sender case is inconsistent in real exports (`human` next to `ASSISTANT`), so it is compared lowercased.
Responses form a tree through `parent_response_id`; the branch ending at `leaf_response_id` (or, when that
is null as in real exports, at the newest leaf) is imported. The model is the response's own `model`, else
the `modelId` the preceding human turn asked for. `thinking_trace` is hidden reasoning and is not imported.
"""

from __future__ import annotations

from typing import Any

from ._common import Progress, conversation_guard, latest_leaf, report, str_or_none, to_timestamp, walk_to_root
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "grok"
DESCRIPTION = "Grok data export (JSON)"

ROLES = {"human": "user", "user": "user", "assistant": "assistant", "grok": "assistant", "system": "system"}


def sniff(data: Any) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        return False
    return any(isinstance(c, dict) and "responses" in c and "conversation" in c for c in data["conversations"][:50])


def _time(value: Any) -> float | None:
    """ISO string, number, or MongoDB extended JSON ({"$date": {"$numberLong": ms}} / {"$date": ISO})."""
    if isinstance(value, dict):
        value = value.get("$date", value)
        if isinstance(value, dict):
            value = value.get("$numberLong")
    return to_timestamp(value)


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    from ownlm.errors import ImportFormatError

    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise ImportFormatError(
            "not a Grok export: no top-level `conversations` list", hint="pass the Grok export's JSON file"
        )
    result = ImportResult(format=NAME)
    items = data["conversations"]
    for index, item in enumerate(items):
        conversation = item.get("conversation") if isinstance(item, dict) else None
        external_id = str_or_none((conversation or {}).get("conversation_id") or (conversation or {}).get("id"))
        with conversation_guard(result, index, external_id):
            _parse_item(item, conversation or {}, index, external_id, result)
        report(progress, index + 1, len(items))
    return result


def _parse_item(item: Any, conversation: dict, index: int, external_id: str | None, result: ImportResult) -> None:
    responses = item.get("responses") if isinstance(item, dict) else None
    if not isinstance(responses, list) or not responses:
        result.bad.append(BadConversation(index, external_id, "no `responses`"))
        return
    nodes: dict[str, dict] = {}
    for entry in responses:
        response = entry.get("response", entry) if isinstance(entry, dict) else None
        if isinstance(response, dict) and isinstance(response.get("response_id"), str):
            nodes[response["response_id"]] = response
    if not nodes:
        result.bad.append(BadConversation(index, external_id, "no responses with an id"))
        return
    leaf = conversation.get("leaf_response_id")
    if leaf not in nodes:  # null in real exports
        leaf = latest_leaf(nodes, lambda r: r.get("parent_response_id"), lambda r: _time(r.get("create_time")))
    path = walk_to_root(leaf, lambda k: nodes[k].get("parent_response_id"), lambda k: k in nodes)
    if len(nodes) > len(path):
        result.skipped["inactive_branch"] += len(nodes) - len(path)

    messages: list[ImportedMessage] = []
    requested: str | None = None  # the model the last human turn asked for
    for key in path:
        response = nodes[key]
        sender = response.get("sender")
        role = ROLES.get(sender.lower()) if isinstance(sender, str) else None
        details = (response.get("metadata") or {}).get("requestModelDetails") or {}
        if role == "user":
            requested = str_or_none(details.get("modelId")) or requested
        if role is None:
            result.skipped["unknown_role"] += 1
            continue
        if response.get("thinking_trace"):
            result.skipped["thinking"] += 1
        text = response.get("message") if isinstance(response.get("message"), str) else ""
        if not text.strip():
            result.skipped["empty"] += 1
            continue
        model = (str_or_none(response.get("model")) or requested) if role == "assistant" else None
        messages.append(ImportedMessage(role, text.strip(), _time(response.get("create_time")), model))
    if not messages:
        result.bad.append(BadConversation(index, external_id, "no messages with text"))
        return
    title = str_or_none(conversation.get("title"))
    created = _time(conversation.get("create_time"))
    result.conversations.append(ImportedConversation(external_id, title, messages, created, NAME))

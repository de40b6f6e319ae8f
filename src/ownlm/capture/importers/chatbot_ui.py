"""Chatbot UI (mckaywrigley/chatbot-ui, v1–v4 "Export data") JSON.

Shape (v4; v1 was the bare `history` list):

    {"version": 4, "history": [{"id", "name", "model": {"id", "name"}, "prompt": system prompt,
                                "temperature", "folderId", "messages": [{"role", "content", "type"?}]}],
     "folders": [...], "prompts": [...]}

There are no timestamps. The conversation's `prompt` is the system prompt that was sent with every request,
so it becomes the first (system) message, as for llm logs; assistant messages get `model.id`.
"""

from __future__ import annotations

from typing import Any

from ._common import Progress, conversation_guard, report, str_or_none
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "chatbot_ui"
DESCRIPTION = "Chatbot UI export (JSON, version 1-4)"

ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def sniff(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("history"), list) and ("folders" in data or "version" in data)


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    from ownlm.errors import ImportFormatError

    history = data.get("history") if isinstance(data, dict) else data
    if not isinstance(history, list):
        raise ImportFormatError(
            "not a Chatbot UI export: no `history` list", hint="pass the file that Chatbot UI's Export data saved"
        )
    result = ImportResult(format=NAME)
    for index, item in enumerate(history):
        external_id = str_or_none(item.get("id")) if isinstance(item, dict) else None
        with conversation_guard(result, index, external_id):
            _parse_item(item, index, external_id, result)
        report(progress, index + 1, len(history))
    return result


def _parse_item(item: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
        result.bad.append(BadConversation(index, external_id, "no `messages` list"))
        return
    model_info = item.get("model")
    model = str_or_none(model_info.get("id") if isinstance(model_info, dict) else model_info)
    messages: list[ImportedMessage] = []
    prompt = item.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages.append(ImportedMessage("system", prompt.strip()))
    for message in item["messages"]:
        role = ROLES.get(message.get("role")) if isinstance(message, dict) else None
        if role is None:
            result.skipped["unknown_role"] += 1
            continue
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            result.skipped["empty"] += 1
            continue
        messages.append(ImportedMessage(role, content.strip(), None, model if role == "assistant" else None))
    if not any(m.role != "system" for m in messages):
        result.bad.append(BadConversation(index, external_id, "no user or assistant messages"))
        return
    result.conversations.append(ImportedConversation(external_id, str_or_none(item.get("name")), messages, None, NAME))

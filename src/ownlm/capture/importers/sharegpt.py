"""ShareGPT-style datasets (and the LLaMA-Factory variant with OpenAI-style tags).

Shapes: a list of records, or one record:

    {"id"?: str, "conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}]}   # ShareGPT
    {"messages": [{"role": "user" | "assistant" | "system", "content": str}], "images"?: [...]}  # LLaMA-Factory

There are no timestamps or models. Empty turns (the dataset dropped the text) and unknown speakers
(e.g. `function_call`/`observation` tool turns) are skipped and counted.
"""

from __future__ import annotations

from typing import Any

from ._common import Progress, as_list, conversation_guard, first_dicts, report, str_or_none
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "sharegpt"
DESCRIPTION = "ShareGPT JSON (conversations[from/value] or messages[role/content])"

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def sniff(data: Any) -> bool:
    """True for records with `conversations` of {from, value} turns, or `messages` of {role, content}."""
    for item in first_dicts(data):
        turns = item.get("conversations")
        if isinstance(turns, list) and any(isinstance(t, dict) and "from" in t for t in turns):
            return True
        turns = item.get("messages")
        if isinstance(turns, list) and any(isinstance(t, dict) and "role" in t and "content" in t for t in turns):
            return True
    return False


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    records = as_list(data)
    total = len(records)
    for index, record in enumerate(records):
        external_id = str_or_none(record.get("id")) if isinstance(record, dict) else None
        with conversation_guard(result, index, external_id):
            _parse_record(record, index, external_id, result)
        report(progress, index + 1, total)
    return result


def _parse_record(record: Any, index: int, external_id: str | None, result: ImportResult) -> None:
    if not isinstance(record, dict):
        result.bad.append(BadConversation(index, None, f"not a conversation object but {type(record).__name__}"))
        return
    if isinstance(record.get("conversations"), list):
        turns, speaker_key, text_key = record["conversations"], "from", "value"
    elif isinstance(record.get("messages"), list):
        turns, speaker_key, text_key = record["messages"], "role", "content"
    else:
        result.bad.append(BadConversation(index, external_id, "no `conversations` or `messages` list"))
        return

    messages: list[ImportedMessage] = []
    for turn in turns:
        if not isinstance(turn, dict):
            result.skipped["malformed_message"] += 1
            continue
        speaker = turn.get(speaker_key)
        role = ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            result.skipped["unknown_role"] += 1
            continue
        text = turn.get(text_key)
        if not isinstance(text, str) or not text.strip():
            result.skipped["empty"] += 1
            continue
        messages.append(ImportedMessage(role=role, content=text.strip()))
    if not messages:
        result.bad.append(BadConversation(index, external_id, "no non-empty turns"))
        return
    result.conversations.append(ImportedConversation(external_id, None, messages, source=NAME))

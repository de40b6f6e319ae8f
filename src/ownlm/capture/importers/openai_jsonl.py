"""OpenAI chat fine-tuning JSONL: one conversation per line.

    {"messages": [{"role": "system" | "developer" | "user" | "assistant" | "tool",
                   "content": str | [{"type": "text", "text": str}, ...] | null,
                   "tool_calls"?: [...], "weight"?: 0 | 1}]}

Blank lines are ignored and the last line needs no newline. A line that is not valid JSON, or has no
`messages` list, goes to `ImportResult.bad` with its 1-based line number as `index`; the other lines still
import. `weight: 0` only tells the fine-tuner not to learn from a message; the person still saw it, so it is
kept.
"""

from __future__ import annotations

from typing import Any

from ownlm.errors import ImportFormatError

from ._common import Progress, TooDeep, conversation_guard, join_text, loads, report
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "openai_jsonl"
DESCRIPTION = "OpenAI fine-tuning chat JSONL (one {\"messages\": [...]} per line)"

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}


def sniff_text(text: str) -> bool:
    """True when the first non-blank line is a JSON object with a `messages` list."""
    for line in text.splitlines():
        if line.strip():
            try:
                first = loads(line)
            except ValueError:  # TooDeep included
                return False
            return isinstance(first, dict) and isinstance(first.get("messages"), list)
    return False


def parse(text: str, progress: Progress | None = None) -> ImportResult:
    result = ImportResult(format=NAME)
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    total = len(lines)
    for done, (number, line) in enumerate(lines, start=1):
        with conversation_guard(result, number, None):
            _parse_line(number, line, result)
        report(progress, done, total)
    if total and not result.conversations and all("not valid JSON" in bad.reason for bad in result.bad):
        # Not one line parsed: this is not JSONL at all (e.g. a pretty-printed JSON file forced to this format).
        raise ImportFormatError(
            "no line of this file is a JSON object, so it is not OpenAI fine-tuning JSONL",
            hint="let ownlm detect the format, or pass the .jsonl file with one {\"messages\": [...]} per line",
        )
    return result


def _parse_line(number: int, line: str, result: ImportResult) -> None:
    try:
        record = loads(line)
    except TooDeep as exc:
        result.bad.append(BadConversation(number, None, f"line {number}: {exc}"))
        return
    except ValueError as exc:
        reason = f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
        result.bad.append(BadConversation(number, None, reason))
        return
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        result.bad.append(BadConversation(number, None, f"line {number}: no `messages` list"))
        return
    messages: list[ImportedMessage] = []
    for message in record["messages"]:
        imported = _convert(message, result)
        if imported is not None:
            messages.append(imported)
    if not messages:
        result.bad.append(BadConversation(number, None, f"line {number}: no messages with text"))
        return
    result.conversations.append(
        ImportedConversation(external_id=None, title=None, messages=messages, source=NAME)
    )


def _convert(message: Any, result: ImportResult) -> ImportedMessage | None:
    if not isinstance(message, dict):
        result.skipped["malformed_message"] += 1
        return None
    role = ROLES.get(message.get("role")) if isinstance(message.get("role"), str) else None
    if role is None:
        result.skipped["tool" if message.get("role") in ("tool", "function") else "unknown_role"] += 1
        return None
    content = message.get("content")
    if isinstance(content, str):
        text = content.strip()
    elif isinstance(content, list):
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                result.skipped[kind if isinstance(kind, str) else "malformed_part"] += 1
        text = join_text(pieces)
    else:
        text = ""
    if not text:
        # An assistant turn that only calls tools has no text for the person.
        result.skipped["tool_call" if message.get("tool_calls") or message.get("function_call") else "empty"] += 1
        return None
    return ImportedMessage(role=role, content=text)

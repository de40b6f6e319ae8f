"""Google AI Studio saved prompt ("chunkedPrompt" JSON, what AI Studio keeps in Drive). Not Gemini Takeout.

Shape (one conversation per file):

    {"runSettings": {"model": "models/<name>", ...},
     "systemInstruction": {} | {"text": str} | {"parts": [{"text"}]},
     "chunkedPrompt": {"chunks": [{"role": "user" | "model", "text", "isThought"?: bool, "parts"?: [...]}]},
     "pendingInputs": [...]}                     # an unsent draft: not part of the conversation

Chunks with `isThought: true` are the model's reasoning, folded away in the UI: skipped and counted.
Consecutive model chunks after a thought belong to one answer but are kept as they are stored. No timestamps.
"""

from __future__ import annotations

from typing import Any

from ._common import Progress, join_text, report, str_or_none
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

NAME = "aistudio"
DESCRIPTION = "Google AI Studio prompt (chunkedPrompt JSON)"

ROLES = {"user": "user", "model": "assistant", "assistant": "assistant", "system": "system"}


def sniff(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("chunkedPrompt"), dict)


def _text_of(obj: Any) -> str:
    if not isinstance(obj, dict):
        return ""
    if isinstance(obj.get("text"), str):
        return obj["text"].strip()
    parts = obj.get("parts")
    if isinstance(parts, list):
        # Parts flagged `thought` are reasoning, as whole chunks with isThought are.
        texts = [p.get("text") for p in parts if isinstance(p, dict) and not p.get("thought")]
        return join_text([t for t in texts if isinstance(t, str)])
    return ""


def parse(data: Any, progress: Progress | None = None) -> ImportResult:
    from ownlm.errors import ImportFormatError

    result = ImportResult(format=NAME)
    chunks = (data.get("chunkedPrompt") or {}).get("chunks") if isinstance(data, dict) else None
    if not isinstance(chunks, list):
        raise ImportFormatError(
            "not an AI Studio prompt: no `chunkedPrompt.chunks`", hint="pass the prompt file saved by AI Studio"
        )
    model_name = str_or_none((data.get("runSettings") or {}).get("model"))
    model = model_name.removeprefix("models/") if model_name else None

    messages: list[ImportedMessage] = []
    system = _text_of(data.get("systemInstruction"))
    if system:
        messages.append(ImportedMessage("system", system))
    for chunk in chunks:
        role = ROLES.get(chunk.get("role")) if isinstance(chunk, dict) else None
        if role is None:
            result.skipped["unknown_role"] += 1
            continue
        if chunk.get("isThought"):
            result.skipped["thoughts"] += 1
            continue
        text = _text_of(chunk)
        if not text:
            result.skipped["empty"] += 1  # e.g. an image or file chunk with no text
            continue
        messages.append(ImportedMessage(role, text, None, model if role == "assistant" else None))
    if any(m.role != "system" for m in messages):
        result.conversations.append(ImportedConversation(None, None, messages, None, NAME))
    else:
        result.bad.append(BadConversation(0, None, "no user or model chunks with text"))
    report(progress, 1, 1)
    return result

"""Importers: chat-history exports of other tools -> `ImportResult` (parsing only, never the store).

    parse_file(path)                 # detect the format, parse, return conversations + skipped + bad
    parse_file("export.zip")         # a ChatGPT or Claude .zip: its conversations.json (see archive.py)
    parse_file(path, "chatgpt")      # force a format (names in FORMATS)
    detect_format(path)              # just the name

Every user mistake (missing file, a directory, empty or truncated file, a JSON number, an unknown shape)
raises `ImportFormatError` or `InvalidInput` with a hint; a damaged conversation inside a good file goes to
`ImportResult.bad` and the rest still imports.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ownlm.errors import ImportFormatError, InvalidInput

from . import aistudio, archive, chatbot_ui, chatgpt, claude, grok, librechat, llm_logs, open_webui, openai_jsonl, sharegpt
from ._common import Progress, TooDeep, loads, valid_text
from .base import BadConversation, ImportedConversation, ImportedMessage, ImportResult

__all__ = [
    "FORMATS",
    "BadConversation",
    "Format",
    "ImportResult",
    "ImportedConversation",
    "ImportedMessage",
    "detect_format",
    "parse_file",
]

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Format:
    """One supported export format.

    `kind` says what `parse` takes: "json" the decoded JSON value, "jsonl" the file's text, "sqlite" the path.
    `sniff` (JSON formats only) says from the decoded value whether a file is in this format.
    """

    name: str
    description: str
    kind: Literal["json", "jsonl", "sqlite"]
    parse: Callable[[Any, Progress | None], ImportResult]
    sniff: Callable[[Any], bool] | None = None


# Sniffing order matters only where shapes overlap: more specific keys first (a ChatGPT `mapping`, Claude
# `chat_messages`, the wrappers of Open WebUI / Grok / Chatbot UI / AI Studio / LibreChat) and ShareGPT last,
# because its `messages: [{role, content}]` variant is the most generic shape.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(chatgpt.NAME, chatgpt.DESCRIPTION, "json", chatgpt.parse, chatgpt.sniff),
        Format(claude.NAME, claude.DESCRIPTION, "json", claude.parse, claude.sniff),
        Format(llm_logs.NAME, llm_logs.DESCRIPTION, "sqlite", llm_logs.parse),
        Format(openai_jsonl.NAME, openai_jsonl.DESCRIPTION, "jsonl", openai_jsonl.parse),
        Format(open_webui.NAME, open_webui.DESCRIPTION, "json", open_webui.parse, open_webui.sniff),
        Format(grok.NAME, grok.DESCRIPTION, "json", grok.parse, grok.sniff),
        Format(chatbot_ui.NAME, chatbot_ui.DESCRIPTION, "json", chatbot_ui.parse, chatbot_ui.sniff),
        Format(aistudio.NAME, aistudio.DESCRIPTION, "json", aistudio.parse, aistudio.sniff),
        Format(librechat.NAME, librechat.DESCRIPTION, "json", librechat.parse, librechat.sniff),
        Format(sharegpt.NAME, sharegpt.DESCRIPTION, "json", sharegpt.parse, sharegpt.sniff),
    )
}


def _supported() -> str:
    return ", ".join(FORMATS)


def detect_format(path: str | Path) -> str:
    """The format name of the export at `path` (a key of FORMATS), by SQLite header, extension and JSON shape."""
    return _load(Path(path), None)[0].name


def parse_file(path: str | Path, format: str | None = None, progress: Progress | None = None, *,
               max_unpacked: int = archive.MAX_MEMBER_BYTES) -> ImportResult:
    """Parse the export at `path`. `format` forces a format; `progress(done, total)` follows conversations;
    `max_unpacked`: the most bytes an export inside a .zip may unpack to."""
    fmt, payload = _load(Path(path), format, max_unpacked)
    result = fmt.parse(payload, progress)
    for conv in result.conversations:  # the one place every format's text passes
        conv.title, conv.external_id = valid_text(conv.title), valid_text(conv.external_id)
        for m in conv.messages:
            m.content, m.model = valid_text(m.content), valid_text(m.model)
    return result


def _load(path: Path, name: str | None, max_unpacked: int = archive.MAX_MEMBER_BYTES) -> tuple[Format, Any]:
    """Check the file, read it once, and return its format with what that format's `parse` takes."""
    if name is not None and name not in FORMATS:
        raise InvalidInput(f"unknown import format {name!r}", hint=f"use one of: {_supported()}")
    if not path.exists():
        raise InvalidInput(f"{path} does not exist", hint="check the path of the export file")
    if path.is_dir():
        raise InvalidInput(
            f"{path} is a directory, not an export file",
            hint="pass the file inside it, e.g. conversations.json (ChatGPT, Claude) or logs.db (llm)",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path} cannot be read: {exc.strerror}", hint="check the file's permissions") from exc
    if not raw.strip():
        raise ImportFormatError(f"{path} is empty", hint="export your history again; the download may have failed")
    if archive.is_zip(raw):  # ChatGPT and Claude deliver a .zip; read its conversations file from memory
        member, raw = archive.read_export(path, raw, max_unpacked)
        path = Path(f"{path}:{member}")  # what messages name; its suffix decides .jsonl as for a plain file
        if raw.startswith(SQLITE_MAGIC) or not raw.strip():
            raise ImportFormatError(f"{path} is {'empty' if not raw.strip() else 'a database, not JSON'}",
                                    hint="extract the export file and import it")

    forced = FORMATS.get(name) if name else None
    if raw.startswith(SQLITE_MAGIC):
        if forced is not None and forced.kind != "sqlite":
            raise ImportFormatError(f"{path} is a SQLite database, not {forced.description}", hint=_hint_formats())
        _check_llm_db(path)
        return FORMATS[llm_logs.NAME], path
    if forced is not None and forced.kind == "sqlite":
        raise ImportFormatError(f"{path} is not a SQLite database", hint="pass the logs.db that `llm logs path` prints")

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFormatError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)",
            hint=f"pass the export file itself, not an archive or a binary file; supported: {_supported()}",
        ) from exc

    if forced is not None and forced.kind == "jsonl":
        return forced, text
    if forced is None and path.suffix.lower() == ".jsonl":
        if not openai_jsonl.sniff_text(text):
            raise ImportFormatError(
                f"{path} does not start with an OpenAI chat line ({{\"messages\": [...]}})",
                hint="each line of a fine-tuning JSONL file must be one JSON object with a `messages` list",
            )
        return FORMATS[openai_jsonl.NAME], text

    try:
        data = loads(text)
    except TooDeep as exc:
        raise ImportFormatError(f"{path} cannot be read: {exc}", hint="no chat export nests this deep; "
                                "pass the export file as the tool wrote it") from None
    except json.JSONDecodeError as exc:
        # Several JSON objects, one per line, with another extension: still fine-tuning JSONL.
        if forced is None and openai_jsonl.sniff_text(text):
            return FORMATS[openai_jsonl.NAME], text
        raise _json_error(path, text, exc) from exc
    _check_container(path, data)
    if forced is not None:
        return forced, data
    for fmt in FORMATS.values():
        if fmt.sniff is not None and fmt.sniff(data):
            return fmt, data
    raise ImportFormatError(f"{path} is JSON, but not an export format ownlm knows", hint=_hint_formats())


def _hint_formats() -> str:
    return f"supported formats: {_supported()}; pass --format to choose one if detection fails"


def _json_error(path: Path, text: str, exc: json.JSONDecodeError) -> ImportFormatError:
    # An error at the very end (or an unterminated string) means the text stopped early, not that it is
    # the wrong file: say so, because the fix differs (download again vs pick another file).
    if exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated"):
        return ImportFormatError(
            f"{path} ends in the middle of its JSON (line {exc.lineno}): the file is truncated",
            hint="download or copy the export again; the transfer stopped early",
        )
    return ImportFormatError(
        f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
        hint=f"pass the export file unchanged; supported formats: {_supported()}",
    )


def _check_container(path: Path, data: Any) -> None:
    """Every JSON export is an object or a list of objects; anything else is the wrong file."""
    if isinstance(data, dict):
        return
    if isinstance(data, list):
        if not data:
            raise ImportFormatError(
                f"{path} holds an empty list: there are no conversations in it", hint="export your history again"
            )
        if not any(isinstance(item, dict) for item in data):
            kind = type(data[0]).__name__
            raise ImportFormatError(f"{path} is a list of {kind}, not of conversations", hint=_hint_formats())
        return
    kind = type(data).__name__
    raise ImportFormatError(f"{path} holds a single JSON {kind}, not conversations", hint=_hint_formats())


def _check_llm_db(path: Path) -> None:
    try:
        conn = llm_logs.open_readonly(path)
        try:
            ok = llm_logs.is_llm_logs(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ImportFormatError(f"{path} is a damaged SQLite file: {exc}", hint="copy logs.db again and retry") from exc
    if not ok:
        raise ImportFormatError(
            f"{path} is a SQLite database but not an llm logs.db (no responses or threads tables)",
            hint="pass the logs.db that `llm logs path` prints",
        )

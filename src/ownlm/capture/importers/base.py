"""What every importer produces: conversations in one normalised shape, plus what was skipped and why.

Importers only parse; they never touch the store. `ownlm import` hands the result to the store, which
deduplicates by content hash, so importing the same export twice adds nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ImportedMessage:
    role: str  # "system" | "user" | "assistant"
    content: str  # plain text as the person saw it
    created_at: float | None = None  # unix seconds, UTC, when the export has it
    model: str | None = None  # model that wrote an assistant message, when known


@dataclass
class ImportedConversation:
    external_id: str | None  # the export's own conversation id, when it has one
    title: str | None
    messages: list[ImportedMessage]
    created_at: float | None = None  # unix seconds, UTC
    source: str = ""  # format name, e.g. "chatgpt"


@dataclass
class BadConversation:
    """A conversation that could not be imported at all (the rest of the file still is)."""

    index: int  # position in the export
    external_id: str | None
    reason: str


@dataclass
class ImportResult:
    format: str
    conversations: list[ImportedConversation] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> number of skipped messages/nodes
    bad: list[BadConversation] = field(default_factory=list)

    @property
    def message_count(self) -> int:
        return sum(len(c.messages) for c in self.conversations)

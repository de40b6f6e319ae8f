"""Helpers shared by the importers: timestamps, text joining, progress and per-conversation error capture.

Nothing here touches a database or the network; the only I/O in the importers package is reading the input
file (in `__init__.py` and `llm_logs.py`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from .base import BadConversation, ImportResult

Progress = Callable[[int, int], None]  # called with (conversations done, conversations in the file)

# Unix-time magnitudes, used to tell seconds from milliseconds/microseconds. 1e11 s is the year 5138 while
# 1e11 ms is 1973, so anything above it is not seconds; the same reasoning one step up for microseconds.
_MS_THRESHOLD = 1e11
_US_THRESHOLD = 1e14


def to_timestamp(value: Any) -> float | None:
    """Unix seconds (UTC, float) from what exports use for time, or None when absent or unreadable.

    Accepts numbers in seconds, milliseconds or microseconds (told apart by magnitude), numeric strings, and
    ISO-8601 strings ("2024-10-29T15:59:38.340028+00:00", "...Z", or naive, which exports write in UTC:
    llm's `datetime_utc`, LibreChat's `createdAt`). A bool is not a time.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            seconds = float(text)
        except ValueError:
            return _parse_iso(text)
    else:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    if seconds >= _US_THRESHOLD:
        return seconds / 1e6
    if seconds >= _MS_THRESHOLD:
        return seconds / 1e3
    return seconds


def _parse_iso(text: str) -> float | None:
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        # Python < 3.11 style fallbacks are unnecessary (requires-python >= 3.11 parses fractions of any
        # length); what is left is not a timestamp at all, e.g. LibreChat's time-only `exportAt`.
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class TooDeep(ValueError):
    """JSON nested deeper than the parser's bound (Python's recursion limit, about 1,000 levels)."""


def loads(text: str | bytes) -> Any:
    """json.loads, with nesting past the parser's bound a `TooDeep` instead of a RecursionError traceback.

    No export nests anywhere near that deep (a ChatGPT mapping is flat; LibreChat's nested replies are two
    levels a message), so such a file is refused, not parsed by a deeper hand-written parser.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise TooDeep(f"its JSON nests deeper than {sys.getrecursionlimit()} levels") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str | None) -> str | None:
    """`text` with each lone surrogate (JSON's "\\ud83d" escape of half a cut emoji) replaced by U+FFFD, as a
    UTF-8 decoder replaces a broken byte sequence: such text can be neither hashed nor stored."""
    return _SURROGATE.sub("\ufffd", text) if isinstance(text, str) else text


def join_text(pieces: Sequence[str], sep: str = "\n") -> str:
    """Join the text pieces of one message: the parts of a ChatGPT message or the text blocks of a Claude one.

    Pieces are joined by a newline (ChatGPT splits a message into parts at paragraph-ish boundaries and its
    UI renders each part on its own line); surrounding whitespace of the whole message is trimmed.
    """
    return sep.join(p for p in pieces if p).strip()


def report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def as_list(data: Any) -> list[Any]:
    """An export is either a list of conversations or a single conversation object."""
    return data if isinstance(data, list) else [data]


def first_dicts(data: Any, limit: int = 50) -> list[dict]:
    """Up to `limit` dict items of a list export (or the object itself), for format sniffing."""
    items = data if isinstance(data, list) else [data]
    return [item for item in items[:limit] if isinstance(item, dict)]


def str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


@contextmanager
def conversation_guard(result: ImportResult, index: int, external_id: str | None) -> Iterator[None]:
    """Turn a shape error inside one conversation into a `BadConversation`, so the rest of the file imports.

    Only shape errors (a key missing, a field of the wrong type) are caught; anything else is a bug and
    keeps its traceback.
    """
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        result.bad.append(BadConversation(index=index, external_id=external_id, reason=f"malformed: {exc!r}"))


def walk_to_root(leaf: str, parent_of: Callable[[str], str | None], known: Callable[[str], bool]) -> list[str]:
    """Ids from the root down to `leaf`, following parent links.

    Stops at a parent that is missing (a dangling link: the export lost the start of the tree) or at a cycle,
    so a broken tree still yields the visible tail instead of failing. Linear in the path length.
    """
    path: list[str] = []
    seen: set[str] = set()
    node: str | None = leaf
    while node is not None and known(node) and node not in seen:
        seen.add(node)
        path.append(node)
        node = parent_of(node)
    path.reverse()
    return path


def latest_leaf(
    nodes: Mapping[str, Any], parent_of: Callable[[Any], Any], time_of: Callable[[Any], float | None]
) -> str | None:
    """The id of the leaf (a node no other node names as its parent) written last, for trees whose export
    does not say which branch was on screen. Ties and untimed leaves go to the later one in file order,
    which is creation order in the exports seen so far. One pass; None only for an empty tree.
    """
    parents = {parent_of(node) for node in nodes.values()}
    best: tuple[float, int] | None = None
    best_id: str | None = None
    for position, (node_id, node) in enumerate(nodes.items()):
        if node_id in parents:
            continue
        key = (time_of(node) or float("-inf"), position)
        if best is None or key > best:
            best, best_id = key, node_id
    if best_id is None and nodes:  # every node is somebody's parent: a cycle; take the last one
        best_id = next(reversed(list(nodes)))
    return best_id

"""Memory in the prompt: the user's recalled passages written into the system prompt in one fixed template.

Pure functions (no store, no model): the store finds the passages (store/memory.py), the API decides whether
a request uses memory (api/memory.py), and this module writes them into the prompt the engine sees. The
template, with passages best first, as many as fit `budget_tokens` (each side cut to `max_words` words):

    Memory: notes from your earlier conversations with this user, most relevant first. Use them only if they
    help with the answer.
    [1] User: <question>
        You: <answer>
    [2] ...

The block goes at the end of the system prompt: after the request's own system message, or after the base
model's default system prompt when the request has none (SmolLM2's chat template adds "You are a helpful AI
assistant named SmolLM..." only when there is no system message, and personal models are trained with it),
so memory adds to what the model is told and replaces nothing. The prompt with memory is only ever given to
the local engine: it is never stored, so it never reaches a dataset or a remote trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ownlm.engine.base import Message

HEADER = ("Memory: notes from your earlier conversations with this user, most relevant first. "
          "Use them only if they help with the answer.")
ITEM = "[{n}] User: {question}\n    You: {answer}"
MAX_WORDS = 60  # of each side of a passage: three or four short passages fit the default budget


def estimate_tokens(text: str) -> int:
    """A tokenizer-free upper estimate: one token per 3 UTF-8 bytes (English BPE averages 4-5 characters per
    token; CJK and Thai characters are 3 bytes and about one token each)."""
    return len(text.encode("utf-8")) // 3 + 1


def _clip(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts) if len(parts) <= words else " ".join(parts[:words]) + " …"


def memory_block(passages: Sequence, budget_tokens: int, count_tokens: Callable[[str], int] = estimate_tokens,
                 max_words: int = MAX_WORDS) -> tuple[str, list]:
    """The template filled with `passages` (objects with `.question` and `.answer`, best first) while the whole
    block stays within `budget_tokens` by `count_tokens`. Returns (block, the passages it holds); ("", []) when
    none fits. The best passage is shortened to fit rather than dropped; later ones go in at `max_words` or not at all."""
    lines, used = [HEADER], []
    for p in passages:
        words = max_words
        while True:
            item = ITEM.format(n=len(used) + 1, question=_clip(p.question, words), answer=_clip(p.answer, words))
            fits = count_tokens("\n".join([*lines, item])) <= budget_tokens
            if fits or used or words <= 4:
                break
            words //= 2  # the best passage alone is too long: shorter, rather than no memory at all
        if not fits:
            break  # the block is full
        lines.append(item)
        used.append(p)
    return ("\n".join(lines), used) if used else ("", [])


def with_memory(messages: list[Message], block: str, default_system: str = "") -> list[Message]:
    """`messages` with `block` at the end of the system prompt (see the module doc); unchanged without a block.
    Returns new message dicts: the caller's list, which is what gets stored, stays as it was."""
    if not block:
        return list(messages)
    if messages and messages[0].get("role") == "system":
        head = messages[0]["content"].rstrip()
        return [{"role": "system", "content": f"{head}\n\n{block}" if head else block}, *messages[1:]]
    system = f"{default_system.rstrip()}\n\n{block}" if default_system.strip() else block
    return [{"role": "system", "content": system}, *messages]

"""Chat examples as token ids with a loss mask: the contract between the dataset and training stages."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

IGNORE = -100  # label of a token that carries no loss (transformers' convention)


@dataclass
class TokenizedExample:
    """One training example.

    input_ids: (T,) token ids of the chat-templated conversation.
    labels:    (T,) the same ids where the token is part of a target assistant reply (its content and its
               end-of-turn token), IGNORE elsewhere. Labels are not shifted: position t predicts token t.
    """

    input_ids: list[int]
    labels: list[int]
    conversation_id: str = ""
    sha256: str = ""  # of the example's messages (see `example_sha256`), for the audit trail

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def example_sha256(messages: list[dict]) -> str:
    """sha256 of an example's canonical JSON (role, content, target per message): its identity in the Merkle tree."""
    canon = [{"role": m["role"], "content": m["content"], "target": bool(m.get("target", False))} for m in messages]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render `messages` with the tokenizer's chat template and mark the target replies' tokens.

    messages: [{"role", "content", "target": bool}]; a message with target=True must be an assistant reply.
    Returns (input_ids, labels). A token is a target when its characters lie inside a target reply's content
    or in the end-of-turn text right after it (so the model learns where to stop). Works for any template
    that copies message content verbatim, found by searching the rendered text in message order.
    """
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for m in messages:
        start = text.find(m["content"], cursor) if m["content"] else cursor
        if start < 0:
            raise ValueError("chat template does not copy message content verbatim")
        end = start + len(m["content"])
        cursor = end
        if m.get("target"):
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    k = 0
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and a >= spans[k][0] and b <= spans[k][1] and b > a:
            labels[i] = ids[i]
    return ids, labels

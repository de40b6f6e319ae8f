"""Knowledge augmentation of training windows: more ways of asking for what the user's replies already say.

Facts that a user states, and that replies state about the user, generalise to unseen questions only when the
model saw them in varied phrasings (Physics of Language Models 3.1: ~10% extraction on held-out questions
without augmentation, ~96% with five paraphrases). From one train window (messages ending in a target reply,
see learn/dataset.py) this makes:

- "context":    the last exchange on its own, so the model answers well without the history;
- "paraphrase": the last user turn rewritten by rule (learn/paraphrase.py), the reply kept verbatim;
- "reorder":    the earlier exchanges in another order, the final exchange last.

In "paraphrase" and "reorder" variants only the final reply is a target: the earlier replies already carry
loss in their source example, and in a reordered window their own context was changed. Pure and
deterministic: choices come from the source example's hash and a salt, never from global random state.
Held-out examples are never augmented; learn/dataset.py's build() checks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ownlm.learn.paraphrase import paraphrases as rephrase

KINDS = ("context", "paraphrase", "reorder")


@dataclass(frozen=True)
class Variant:
    kind: str  # one of KINDS
    messages: list[dict]  # [{"role", "content", "target"}], ending in the source's final target reply


def _last_user(window: list[dict]) -> int | None:
    """Index of the user turn that the final reply answers; None when the window has none."""
    return max((i for i, m in enumerate(window) if m["role"] == "user"), default=None)


def _final_target_only(messages: list[dict]) -> list[dict]:
    """Copies of `messages` where only the last one (the final reply) is a target."""
    out = [dict(m, target=False) for m in messages]
    out[-1]["target"] = True
    return out


def context_variant(window: list[dict]) -> list[dict] | None:
    """The last exchange alone (from the last user turn on), or None when the window has no history."""
    i = _last_user(window)
    if not i:  # None, or the window already starts at its last user turn
        return None
    return [dict(m) for m in window[i:]]


def paraphrase_variants(window: list[dict], k: int, seed: str) -> list[list[dict]]:
    """Up to k copies of `window` with the last user turn rephrased; the reply and the history kept verbatim."""
    i = _last_user(window)
    if i is None or k <= 0:
        return []
    out = []
    for text in rephrase(window[i]["content"], k, seed):
        msgs = _final_target_only(window)
        msgs[i]["content"] = text
        out.append(msgs)
    return out


def exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, exchanges): each exchange starts at a user turn and runs to the next one."""
    lead: list[dict] = []
    groups: list[list[dict]] = []
    for m in messages:
        if m["role"] == "user":
            groups.append([m])
        elif groups:
            groups[-1].append(m)  # replies (and a system message mid-conversation) stay with their exchange
        else:
            lead.append(m)
    return lead, groups


def reorder_variant(window: list[dict], seed: str) -> list[dict] | None:
    """The earlier exchanges reversed or rotated (chosen by `seed`), the final exchange last; None when there
    are fewer than two earlier exchanges or the new order reads the same (identical exchanges)."""
    i = _last_user(window)
    if i is None:
        return None
    lead, earlier = exchanges(window[:i])
    if len(earlier) < 2:
        return None
    h = int.from_bytes(hashlib.sha256(f"reorder:{seed}".encode()).digest()[:8], "big")
    if len(earlier) == 2 or h % 2 == 0:
        order = earlier[::-1]
    else:
        shift = 1 + (h >> 1) % (len(earlier) - 1)  # 1 .. n-1: never the identity
        order = earlier[shift:] + earlier[:shift]
    if order == earlier:
        return None
    return _final_target_only(lead + [m for ex in order for m in ex] + window[i:])


def augment(window: list[dict], *, source_sha256: str, paraphrases: int = 3, context: bool = True,
            reorder: bool = True, salt: str = "") -> list[Variant]:
    """Every augmentation of one train window, in a fixed order (context, paraphrases, reorder).

    `source_sha256` (the window's example hash) and `salt` seed every choice, so the same window gives the
    same variants. Variants are distinct from the window, but two windows may give the same variant: the
    dataset's dedup drops the repeat."""
    seed = f"{salt}:{source_sha256}"
    out: list[Variant] = []
    if context and (tail := context_variant(window)) is not None:
        out.append(Variant("context", tail))
    out += [Variant("paraphrase", msgs) for msgs in paraphrase_variants(window, paraphrases, seed)]
    if reorder and (msgs := reorder_variant(window, seed)) is not None:
        out.append(Variant("reorder", msgs))
    return out

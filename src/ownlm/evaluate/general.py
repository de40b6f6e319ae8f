"""General ability: perplexity and log-likelihood benchmarks, on small data shipped with the package.

Did personalising the model damage what it knew? These checks need no judge model:
- `general_perplexity`: per-token perplexity on a WikiText-2 slice (non-overlapping blocks, each scored
  from its own start: a lower bound on context, so the number is higher than a sliding-window one).
- `multiple_choice_accuracy`: ARC-Easy, PIQA, HellaSwag, scored as in EleutherAI's lm-evaluation-harness:
  each choice's log-likelihood given the context, the highest wins. norm="chars" (default) divides the
  summed log-likelihood by the choice's length in characters (the harness's `acc_norm`), so long choices
  are not penalised for having more tokens; "tokens" divides by its token count, "none" is the raw sum
  (the harness's `acc`).
- `lambada_accuracy`: the share of passages whose last word the model predicts greedily, token by token.
- `dolly_examples`: Dolly instructions with their reference replies in the chat template, the generic
  prompts of `evaluate.kl_drift`.
Data: `load_general(name)`; origin and licences in data/general/SOURCES.md. Scores are on the base's own
tokenizer, so compare a personal model with its base, not models with different tokenizers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ownlm.evaluate.metrics import NLLResult, Scored, nll_result, token_logprobs
from ownlm.learn.tokens import IGNORE, TokenizedExample, tokenize_chat

DATA_DIR = Path(__file__).parents[1] / "data" / "general"
FILES = {
    "dolly": "dolly15k_first200.jsonl",
    "arc_easy": "arc_easy_test_200.jsonl",
    "piqa": "piqa_valid_200.jsonl",
    "hellaswag": "hellaswag_val_200.jsonl",
    "lambada": "lambada_openai_test_200.jsonl",
    "wikitext2": "wikitext2_raw_test_4articles.txt",
}
MC_SETS = ("arc_easy", "piqa", "hellaswag")


def load_general(name: str) -> list[dict] | str:
    """The shipped data set `name` (a key of FILES): a list of records for the .jsonl sets, the text for
    'wikitext2'."""
    if name not in FILES:
        raise ValueError(f"unknown general data set {name!r}; choose one of {', '.join(FILES)}")
    path = DATA_DIR / FILES[name]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: the context, the choices as they continue it (leading space included), the
    index of the right one."""

    context: str
    choices: list[str]
    answer: int
    id: str = ""


def _hellaswag_clean(text: str) -> str:
    # The harness's preprocessing: WikiHow markup like " [title]" and "[header]" is dropped.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def mc_items(name: str, n: int | None = None) -> list[MCItem]:
    """The first `n` items (all when None) of a multiple-choice set in MC_SETS, with the harness's prompts."""
    if name not in MC_SETS:
        raise ValueError(f"{name!r} is not a multiple-choice set; choose one of {', '.join(MC_SETS)}")
    items = []
    for r in load_general(name)[:n]:
        if name == "arc_easy":
            labels = r["choices"]["label"]
            items.append(MCItem(f"Question: {r['question']}\nAnswer:", [" " + t for t in r["choices"]["text"]],
                                labels.index(r["answerKey"]), r["id"]))
        elif name == "piqa":
            items.append(MCItem(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]],
                                int(r["label"]), str(r["idx"])))
        else:
            ctx = r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()
            items.append(MCItem(_hellaswag_clean(ctx), [" " + _hellaswag_clean(e) for e in r["endings"]],
                                int(r["label"]), str(r["ind"])))
    return items


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_logliks(model: nn.Module, tokenizer, items: list[MCItem], batch_tokens: int = 4096
                   ) -> tuple[list[list[float]], list[list[int]]]:
    """Per item and choice: (summed log-likelihood in nats of the choice's tokens given the context, the
    choice's token count). Context and choice are tokenized apart and joined, as the harness does, so the
    context's tokens are the same for every choice."""
    seqs, owners = [], []
    for i, item in enumerate(items):
        ctx = _encode(tokenizer, item.context)
        for choice in item.choices:
            seqs.append(Scored.continuation(ctx, _encode(tokenizer, choice)))
            owners.append(i)
    scored = token_logprobs(model, seqs, batch_tokens)
    logliks: list[list[float]] = [[] for _ in items]
    counts: list[list[int]] = [[] for _ in items]
    for i, (lp, _) in zip(owners, scored):
        logliks[i].append(float(lp.sum()))
        counts[i].append(len(lp))
    return logliks, counts


def pick_choice(logliks: list[float], choices: list[str], n_tokens: list[int], norm: str = "chars") -> int:
    """Index of the best choice under `norm` ('chars', 'tokens' or 'none', see the module doc); ties go to
    the first."""
    if norm == "chars":
        scores = [ll / max(len(c), 1) for ll, c in zip(logliks, choices)]
    elif norm == "tokens":
        scores = [ll / max(n, 1) for ll, n in zip(logliks, n_tokens)]
    elif norm == "none":
        scores = list(logliks)
    else:
        raise ValueError(f"norm={norm!r}; use 'chars', 'tokens' or 'none'")
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def multiple_choice_accuracy(model: nn.Module, tokenizer, items: list[MCItem], norm: str = "chars",
                             batch_tokens: int = 4096) -> float:
    """Share (0..1) of `items` where the highest-scoring choice (see `pick_choice`) is the right one."""
    if not items:
        raise ValueError("no items to score")
    logliks, counts = choice_logliks(model, tokenizer, items, batch_tokens)
    right = sum(pick_choice(ll, it.choices, n, norm) == it.answer for ll, it, n in zip(logliks, items, counts))
    return right / len(items)


# ---------------------------------------------------------------- LAMBADA, perplexity


def lambada_accuracy(model: nn.Module, tokenizer, records: list[dict] | None = None, n: int | None = None,
                     batch_tokens: int = 4096) -> float:
    """Share of passages whose last word (" word", after the last space) is every token the greedy argmax,
    given the passage before it (teacher forcing; the harness's lambada_openai `acc`)."""
    records = (records if records is not None else load_general("lambada"))[:n]
    seqs = []
    for r in records:
        context, word = r["text"].rsplit(" ", 1)
        seqs.append(Scored.continuation(_encode(tokenizer, context), _encode(tokenizer, " " + word)))
    results = token_logprobs(model, seqs, batch_tokens)
    return sum(bool(greedy.all()) for _, greedy in results) / len(results)


def general_perplexity(model: nn.Module, tokenizer, text: str | None = None, block: int = 256,
                       max_blocks: int | None = None, batch_tokens: int = 4096) -> NLLResult:
    """Per-token NLL and perplexity of `text` (default: the shipped WikiText-2 slice, ~20k tokens).

    The text is tokenized whole and cut into non-overlapping `block`-token blocks (the last, shorter one
    kept if it has 2+ tokens); in each block every token but the first is predicted from the block's earlier
    tokens. `max_blocks` keeps the first blocks only (speed). Perplexity is per token of this tokenizer.
    """
    text = text if text is not None else load_general("wikitext2")
    ids = _encode(tokenizer, text)
    blocks = [ids[k : k + block] for k in range(0, len(ids), block)]
    blocks = [b for b in blocks if len(b) >= 2][:max_blocks]
    seqs = [Scored(b, list(range(len(b) - 1)), b[1:]) for b in blocks]
    results = token_logprobs(model, seqs, batch_tokens)
    total = -sum(float(lp.sum()) for lp, _ in results)
    return nll_result(total, sum(len(lp) for lp, _ in results))


# ---------------------------------------------------------------- generic chat prompts (for KL drift)


def dolly_messages(n: int | None = None, with_response: bool = True) -> list[list[dict]]:
    """Dolly instructions as chats: one user message (instruction, then the context after a blank line when
    there is one) and, with_response, the reference reply as a target assistant message."""
    chats = []
    for r in load_general("dolly")[:n]:
        user = r["instruction"] + (f"\n\n{r['context']}" if r["context"] else "")
        chat = [{"role": "user", "content": user}]
        if with_response:
            chat.append({"role": "assistant", "content": r["response"], "target": True})
        chats.append(chat)
    return chats


def dolly_examples(tokenizer, n: int | None = 200, max_target_tokens: int = 32, max_len: int = 512
                   ) -> list[TokenizedExample]:
    """Dolly chats tokenized with the chat template, scored on the first `max_target_tokens` tokens of the
    reference reply: where an answer starts is where a persona's style would first pull the model away.
    Examples longer than `max_len` tokens once cut are skipped (a few with long Wikipedia contexts)."""
    out = []
    for chat in dolly_messages(n):
        ids, labels = tokenize_chat(tokenizer, chat)
        targets = [t for t, x in enumerate(labels) if x != IGNORE]
        if not targets:
            continue
        cut = targets[min(max_target_tokens, len(targets)) - 1] + 1
        if cut <= max_len:
            out.append(TokenizedExample(ids[:cut], labels[:cut]))
    return out

"""Evaluation: does a personal model beat its base on the user's held-out chats, and what did it cost?

Pure functions over models, tokenizers and data (no store, no CLI). General-ability benchmarks live in
`ownlm.evaluate.general`, the JSON-able report in `ownlm.evaluate.report`.

Metrics (NLL in nats per token, natural log throughout)
-------------------------------------------------------
- **Held-out assistant NLL** (`assistant_nll`): the token-weighted mean of -log p(token | prefix) over the
  target tokens of held-out examples, i.e. the assistant replies' content and end-of-turn tokens (labels !=
  IGNORE). System/user tokens carry no loss. Perplexity = exp(mean NLL).
- **Personalization score** = (NLL_base - NLL_personal) / NLL_base: the relative improvement of held-out
  assistant-token NLL (0 = no better than the base, 0.1 = 10 % lower NLL; negative = worse). Reported with
  the **perplexity ratio** PPL_personal / PPL_base = exp(NLL_personal - NLL_base) (< 1 is better).
- **Kept gain** of a compressed delta = (NLL_base - NLL_compressed) / (NLL_base - NLL_personal): the share
  of the uncompressed personal model's NLL gain that survives BitDelta compression (1 = all of it; > 1 is
  possible; undefined, None, when the personal model does not beat the base).
- **KL drift** (`kl_drift`): mean over scored positions of KL(p_base || p_personal) of the next-token
  distributions (nats), on generic prompts (Dolly instructions in the chat template, see
  `general.dolly_examples`). It measures how far the personal model moved away from the base where the
  user's data says nothing; general benchmarks (`evaluate.general`) say whether that movement hurt.
- **Behaviour score** (`behaviour_score`): share of persona probe questions whose greedy answer passes the
  probe's check, overall and per kind (fact / style).
- **Speed** (`speed`): completion tokens per second of greedy generation, prompt processing included,
  median over runs.

Why hidden states are gathered before the LM head: the head maps 576 -> 49,152 and dominates the cost and
memory of a forward pass on the 135M model; scoring only needs logits where the next token is scored, so we
run the decoder on the whole padded batch, keep the hidden states at the scored positions and apply the head
to those only, in chunks of HEAD_CHUNK rows (a chunk's fp32 logits are HEAD_CHUNK x 49,152 x 4 B = 100 MB).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ownlm.bitdelta import Delta, apply, check_fits, unapply
from ownlm.engine.base import GenerationParams
from ownlm.evaluate.personas.fixtures import check_answer
from ownlm.learn.tokens import IGNORE, TokenizedExample

HEAD_CHUNK = 512  # rows of hidden states sent through the LM head at once (see module doc)


# ---------------------------------------------------------------- what is scored


@dataclass(frozen=True)
class Scored:
    """A token sequence and the positions scored on it.

    ids:       (T,) token ids.
    positions: indexes t (0 <= t < T) whose next-token distribution is used, ascending.
    targets:   per position, the token expected next (ids[t + 1]), or -1 when there is none (the end of a
               prompt: only distributions are compared there, as in KL drift).
    """

    ids: list[int]
    positions: list[int]
    targets: list[int]

    @classmethod
    def from_example(cls, ex: TokenizedExample) -> Scored:
        """Positions t whose next token t + 1 carries loss (labels are unshifted: label t is token t's).
        A label at position 0 has no prefix to predict it from and is not scored."""
        pos = [t - 1 for t in range(1, len(ex.labels)) if ex.labels[t] != IGNORE]
        return cls(list(ex.input_ids), pos, [ex.labels[t + 1] for t in pos])

    @classmethod
    def from_ids(cls, ids: Sequence[int]) -> Scored:
        """Every position of a prompt; the last one has no target."""
        ids = list(ids)
        return cls(ids, list(range(len(ids))), ids[1:] + [-1])

    @classmethod
    def continuation(cls, context: Sequence[int], cont: Sequence[int]) -> Scored:
        """The tokens of `cont` given `context` (context must be non-empty: something has to predict them)."""
        if not context:
            raise ValueError("a continuation needs at least one context token")
        ids = list(context) + list(cont)
        pos = list(range(len(context) - 1, len(ids) - 1))
        return cls(ids, pos, list(cont))


def as_scored(item: Scored | TokenizedExample | Sequence[int]) -> Scored:
    if isinstance(item, Scored):
        return item
    if isinstance(item, TokenizedExample):
        return Scored.from_example(item)
    return Scored.from_ids(item)


def _head_part(s: Scored, start: int, stop: int) -> Scored:
    """Positions [start, stop) of `s`, with the ids cut after the last one (later tokens cannot matter)."""
    pos = s.positions[start:stop]
    return Scored(s.ids[: pos[-1] + 1], pos, s.targets[start:stop])


def make_batches(seqs: list[Scored], batch_tokens: int = 4096, batch_positions: int | None = None
                 ) -> Iterator[list[int]]:
    """Indexes into `seqs`, grouped by length so padding is small: each batch holds at most `batch_tokens`
    padded tokens (rows x longest row) and `batch_positions` scored positions; a longer single sequence forms
    a batch of its own. Longest first, so an out-of-memory shows on the first batch."""
    order = sorted((i for i, s in enumerate(seqs) if s.positions), key=lambda i: -len(seqs[i].ids))
    batch: list[int] = []
    width = n_pos = 0
    for i in order:
        s = seqs[i]
        w = max(width, len(s.ids))
        too_many = batch_positions is not None and n_pos + len(s.positions) > batch_positions
        if batch and (w * (len(batch) + 1) > batch_tokens or too_many):
            yield batch
            batch, w, n_pos = [], len(s.ids), 0
        batch.append(i)
        width, n_pos = w, n_pos + len(s.positions)
    if batch:
        yield batch


# ---------------------------------------------------------------- the forward pass


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, LM head) of a transformers causal LM, unwrapping a peft model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(inner).__name__} has no separate decoder and LM head; evaluate needs both")
    return decoder, head


@contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while scoring; the caller's training flag comes back afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.inference_mode()
def hidden_at(model: nn.Module, batch: list[Scored]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the scored positions of one batch.

    Returns (hidden (N, H) in the model's dtype, targets (N,) long) with N = total scored positions, in
    batch order then position order. Rows are right-padded: Llama's position ids count from 0 at the left,
    so a real token's position is unchanged, and causal attention never lets it see the padding after it.
    """
    decoder, _ = _parts(model)
    device = next(model.parameters()).device
    width = max(len(s.ids) for s in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        mask[row, : len(s.ids)] = 1
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    rows = torch.tensor([row for row, s in enumerate(batch) for _ in s.positions], device=device)
    cols = torch.tensor([t for s in batch for t in s.positions], device=device)
    targets = torch.tensor([x for s in batch for x in s.targets], dtype=torch.long, device=device)
    return hidden[rows, cols], targets  # (N, H), (N,)


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(n, H) hidden -> (n, V) float32 logits."""
    _, head = _parts(model)
    return head(hidden).float()


@torch.inference_mode()
def token_logprobs(model: nn.Module, seqs: Sequence[Scored | TokenizedExample | Sequence[int]],
                   batch_tokens: int = 4096) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence, in input order: (log p(target) (n_i,) float32 on the CPU, is_greedy (n_i,) bool: the
    target is the argmax of the distribution). A position without a target (-1) gets log p = nan."""
    scored = [as_scored(s) for s in seqs]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(scored)
    with _eval_mode(model):
        for idx in make_batches(scored, batch_tokens):
            batch = [scored[i] for i in idx]
            hidden, targets = hidden_at(model, batch)
            lps, greedy = [], []
            for c in range(0, len(targets), HEAD_CHUNK):
                logits = _logits(model, hidden[c : c + HEAD_CHUNK])  # (n, V)
                tgt = targets[c : c + HEAD_CHUNK]
                lp = torch.log_softmax(logits, dim=-1).gather(1, tgt.clamp(min=0)[:, None])[:, 0]
                lps.append(torch.where(tgt >= 0, lp, torch.nan).cpu())
                greedy.append((logits.argmax(-1) == tgt).cpu())
            lp_all, gr_all = torch.cat(lps), torch.cat(greedy)
            start = 0
            for i, s in zip(idx, batch):
                n = len(s.positions)
                out[i] = (lp_all[start : start + n], gr_all[start : start + n])
                start += n
    empty = (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    return [o if o is not None else empty for o in out]


# ---------------------------------------------------------------- held-out NLL and the scores built on it


@dataclass(frozen=True)
class NLLResult:
    """mean_nll: nats per scored token (token-weighted over all examples); perplexity = exp(mean_nll)."""

    mean_nll: float
    perplexity: float
    n_tokens: int


def nll_result(total_nll: float, n_tokens: int) -> NLLResult:
    if n_tokens == 0:
        raise ValueError("no scored tokens: the examples have no target (assistant) tokens")
    mean = total_nll / n_tokens
    return NLLResult(mean, math.exp(mean), n_tokens)


@torch.inference_mode()
def assistant_nll(model: nn.Module, examples: list[TokenizedExample], batch_tokens: int = 4096) -> NLLResult:
    """Mean NLL of `examples`' target tokens (labels != IGNORE) under `model`; see the module doc.

    batch_tokens bounds the padded tokens per forward pass (activations), HEAD_CHUNK the logits memory.
    """
    scored = [Scored.from_example(ex) for ex in examples]
    total, n = 0.0, 0
    with _eval_mode(model):
        for idx in make_batches(scored, batch_tokens):
            hidden, targets = hidden_at(model, [scored[i] for i in idx])
            for c in range(0, len(targets), HEAD_CHUNK):
                logits = _logits(model, hidden[c : c + HEAD_CHUNK])
                total += float(F.cross_entropy(logits, targets[c : c + HEAD_CHUNK], reduction="sum"))
            n += len(targets)
    return nll_result(total, n)


def personalization_score(nll_base: float, nll_personal: float) -> float:
    """(NLL_base - NLL_personal) / NLL_base: relative improvement of held-out assistant NLL."""
    return (nll_base - nll_personal) / nll_base


def perplexity_ratio(nll_base: float, nll_personal: float) -> float:
    """PPL_personal / PPL_base = exp(NLL_personal - NLL_base); below 1 the personal model is better."""
    return math.exp(nll_personal - nll_base)


def wilson(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval (z = 1.96) of a pass rate `passed`/`n`, as (low, high) in [0, 1]. Unlike the
    normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, which small probe sets often give."""
    if n <= 0:
        raise ValueError("no trials")
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def kept_gain(nll_base: float, nll_personal: float, nll_compressed: float) -> float | None:
    """(NLL_base - NLL_compressed) / (NLL_base - NLL_personal); None when the personal model has no gain."""
    gain = nll_base - nll_personal
    if gain <= 0:
        return None
    return (nll_base - nll_compressed) / gain


# ---------------------------------------------------------------- drift: KL(base || personal)


@contextmanager
def delta_applied(model: nn.Module, delta: Delta, base_sha256: str | None = None, exact: bool = True):
    """Apply `delta` to `model` in place for the duration of the block, then restore it, also on exceptions.

    exact=True copies the parameters the delta changes before applying and copies them back afterwards, so
    the base comes back bit for bit (memory: one copy of those parameters, ~53 MB for a q/v LoRA delta of the
    135M model, the linear layers' size for a dense one). exact=False unapplies instead (no copy; each weight
    may be off by a rounding, see bitdelta.apply).
    """
    params = check_fits(model, delta, base_sha256)
    saved = {name: p.detach().clone() for name, p in params.items()} if exact else None
    apply(model, delta, base_sha256)  # all or nothing: if it raises, the model is unchanged
    try:
        yield model
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        else:
            unapply(model, delta, base_sha256)


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, batch: Sequence[Scored | TokenizedExample | Sequence[int]]
                        ) -> torch.Tensor:
    """Log-probabilities (N, V) float32 of the next-token distributions at every scored position of one
    batch (a TokenizedExample: its loss positions; plain ids: every position), in batch then position order.
    Memory is N x V x 4 bytes (49,152 x 4 B = 197 KB per position): keep N to a few hundred."""
    scored = [as_scored(s) for s in batch]
    with _eval_mode(model):
        hidden, _ = hidden_at(model, scored)
        return torch.cat([torch.log_softmax(_logits(model, hidden[c : c + HEAD_CHUNK]), dim=-1)
                          for c in range(0, hidden.shape[0], HEAD_CHUNK)])


def kl_from_logprobs(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) = sum_v p_v (log p_v - log q_v) in nats: (N, V), (N, V) -> (N,)."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(-1)


def kl_drift(base_model: nn.Module, personal: nn.Module | Delta,
             sequences: Sequence[Scored | TokenizedExample | Sequence[int]], max_positions: int = 2048,
             batch_tokens: int = 2048, batch_positions: int = 256, base_sha256: str | None = None) -> float:
    """Mean KL(base || personal) in nats over the scored positions of `sequences` (the first
    `max_positions` of them, in order).

    personal: a second model, or a Delta. With a Delta only one model is held: per batch the base's
    log-probs are computed, the delta is applied to `base_model` (`delta_applied`, exact restore), the
    personal log-probs are computed, and the base comes back. Peak extra memory is two (batch_positions, V)
    float32 tensors (2 x 256 x 49,152 x 4 B = 100 MB by default).
    """
    parts: list[Scored] = []
    left = max_positions
    for s in map(as_scored, sequences):
        if left <= 0:
            break
        s = _head_part(s, 0, left) if len(s.positions) > left else s
        left -= len(s.positions)
        # A sequence with more positions than a batch may hold is split into several parts.
        parts += [_head_part(s, k, k + batch_positions) for k in range(0, len(s.positions), batch_positions)]
    total, n = 0.0, 0
    for idx in make_batches(parts, batch_tokens, batch_positions):
        batch = [parts[i] for i in idx]
        p = next_token_logprobs(base_model, batch)
        if isinstance(personal, Delta):
            with delta_applied(base_model, personal, base_sha256):
                q = next_token_logprobs(base_model, batch)
        else:
            q = next_token_logprobs(personal, batch)
        total += float(kl_from_logprobs(p, q.to(p.device)).sum())
        n += p.shape[0]
    if n == 0:
        raise ValueError("no positions to compare: pass non-empty prompts")
    return total / n


# ---------------------------------------------------------------- behaviour and speed (through an engine)


def _probe_fields(probe) -> tuple[str, str, dict]:
    """(question, kind, check) of a personas.Probe or its dict form (from <name>.probes.json)."""
    if isinstance(probe, dict):
        return probe["question"], probe["kind"], probe["check"]
    return probe.question, probe.kind, probe.check


# Tokens a probe answer may take. The persona fixtures' assistant answers run to 86 tokens (chiara's numbered
# lists: median 53, 90th percentile 75; bram's 75, mira's 57), and chiara's and mira's styles are judged at the
# answer's end: a 48-token limit (used until 2026-12-02) cut half of chiara's answers before their closing
# question, so a model that had learned her style perfectly could not pass. 96 leaves room for the longest.
PROBE_TOKENS = 96


def behaviour_score(engine, probes: Iterable, max_tokens: int = PROBE_TOKENS, repetition_penalty: float = 1.0) -> dict:
    """Greedy answers to persona probe questions (each asked alone, as one user message), checked with
    `personas.check_answer`. An engine with `greedy_batch` answers them in one batch, others one by one;
    `repetition_penalty` as in GenerationParams (the node's setting, for answers as served).

    An answer that loops (evaluate.habits.degenerate: "Ahoy! Ahoy! Ahoy! Ahoy!") fails whatever its check says.

    Returns {"pass_rate": share passing (0..1), "n": probes asked,
             "by_kind": {kind: {"passed": int, "total": int, "rate": float}},  # kinds: fact, style
             "answers": [{"question", "kind", "answer", "passed"}]}.
    """
    fields = [_probe_fields(p) for p in probes]
    asks = [[{"role": "user", "content": q}] for q, _, _ in fields]
    if hasattr(engine, "greedy_batch"):  # one batched generate (see TorchEngine.greedy_batch)
        texts = engine.greedy_batch(asks, max_tokens, repetition_penalty=repetition_penalty)
    else:
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty)
        texts = [engine.stream(a, params).text() for a in asks]
    answers, by_kind = [], {}
    from ownlm.evaluate.habits import degenerate

    for (question, kind, check), answer in zip(fields, texts):
        passed = check_answer(check, answer) and not degenerate(answer)  # a looping answer passes no probe
        answers.append({"question": question, "kind": kind, "answer": answer, "passed": passed})
        k = by_kind.setdefault(kind, {"passed": 0, "total": 0, "rate": 0.0})
        k["passed"] += int(passed)
        k["total"] += 1
    if not answers:
        raise ValueError("no probes given")
    for k in by_kind.values():
        k["rate"] = k["passed"] / k["total"]
    passed = sum(a["passed"] for a in answers)
    return {"pass_rate": passed / len(answers), "n": len(answers), "by_kind": by_kind, "answers": answers}


def by_kind_with_intervals(score: dict) -> dict:
    """{kind: {"passed", "total", "ci95": [low, high]}} from a `behaviour_score` result (95% Wilson intervals)."""
    return {kind: {"passed": k["passed"], "total": k["total"], "ci95": [round(x, 3) for x in wilson(k["passed"], k["total"])]}
            for kind, k in sorted(score["by_kind"].items())}


def speed(engine, prompts: Sequence[str], max_tokens: int = 64, runs: int = 3, warmup: bool = True) -> float:
    """Greedy generation speed in completion tokens per second: per run, all prompts' completion tokens over
    their wall time (prompt processing included, as a user waits for it); the median over `runs`.

    A short untimed generation first (warmup) keeps one-off costs (allocator, kernels) out of the numbers.
    """
    if not prompts or runs < 1:
        raise ValueError("speed needs at least one prompt and one run")
    if warmup:
        engine.stream([{"role": "user", "content": prompts[0]}], GenerationParams(max_tokens=4, temperature=0)).text()
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    rates = []
    for _ in range(runs):
        tokens, t0 = 0, time.perf_counter()
        for prompt in prompts:
            stream = engine.stream([{"role": "user", "content": prompt}], params)
            stream.text()
            tokens += stream.completion_tokens
        rates.append(tokens / max(time.perf_counter() - t0, 1e-9))
    return statistics.median(rates)

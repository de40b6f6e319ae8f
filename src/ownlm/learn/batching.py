"""From tokenized examples to padded tensors, once: trim, truncate, group by length, collate.

Training on a CPU is bound by the matmuls, so every padded token is wasted work. Examples are sorted by length
and cut into batches whose *padded* size (rows × longest row) stays under a token budget, so a batch holds
rows of nearly the same length: little padding, and many short rows or few long ones per step. The batches are
collated to tensors once and reused every epoch; only their order is shuffled (seeded, per epoch).

Padding is on the right and no attention mask is passed: with causal attention a real token at position t
only sees positions <= t, which are all real, so right padding changes nothing for real tokens (the padded
positions compute garbage whose loss is masked). That keeps SDPA on its fast `is_causal` path. Positions
start at 0 in every row, as they would unpadded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ownlm.learn.tokens import IGNORE, TokenizedExample


@dataclass
class PreparedData:
    """Examples ready for batching, plus what preparing them dropped or cut (for the report)."""

    examples: list[TokenizedExample]
    dropped_no_target: int = 0  # examples with no loss token at all
    truncated: int = 0  # examples longer than max_seq_len, cut from the left
    tokens_truncated: int = 0
    loss_tokens_truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def loss_tokens(self) -> int:
        """Tokens whose prediction is trained. Position 0 is never predicted (nothing precedes it)."""
        return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in self.examples)


def prepare(examples: list[TokenizedExample], max_seq_len: int) -> PreparedData:
    """Trim and truncate examples; nothing here changes the loss of what is kept.

    - Tokens after the last target token are dropped: under causal attention nothing before them depends on
      them, and they carry no loss.
    - An example longer than `max_seq_len` keeps its last `max_seq_len` tokens (the target end; the start of
      the context is cut). Counted in `truncated`.
    - An example with no target token left is dropped (counted in `dropped_no_target`).
    """
    out = PreparedData([])
    for ex in examples:
        if len(ex.input_ids) != len(ex.labels):
            raise ValueError(f"example {ex.conversation_id!r}: {len(ex.input_ids)} ids but {len(ex.labels)} labels")
        last = max((i for i, x in enumerate(ex.labels) if x != IGNORE and i > 0), default=-1)
        if last < 0:
            out.dropped_no_target += 1
            continue
        ids, labels = list(ex.input_ids[: last + 1]), list(ex.labels[: last + 1])
        if len(ids) > max_seq_len:
            cut = len(ids) - max_seq_len
            out.truncated += 1
            out.tokens_truncated += cut
            out.loss_tokens_truncated += sum(1 for x in labels[1 : cut + 1] if x != IGNORE)
            ids, labels = ids[cut:], labels[cut:]
            if not any(x != IGNORE for x in labels[1:]):  # cannot happen (the last token is a target), kept safe
                out.dropped_no_target += 1
                continue
        out.examples.append(TokenizedExample(ids, labels, ex.conversation_id, ex.sha256))
    return out


def plan_batches(lengths: list[int], token_budget: int, seed: int) -> list[list[int]]:
    """Group example indices into batches of similar length whose padded size fits `token_budget`.

    Sorted by length (ties broken by a seeded shuffle, so equal-length examples mix), then filled greedily:
    a batch takes the next example while (rows + 1) × its longest row <= token_budget. Every index appears in
    exactly one batch. A single example longer than the budget gets a batch of its own.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: the shuffle breaks ties
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and (len(current) + 1) * new_longest > token_budget:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def epoch_order(n_batches: int, seed: int, epoch: int) -> list[int]:
    """The order batches are visited in `epoch`: a seeded shuffle, a pure function of (seed, epoch)."""
    order = list(range(n_batches))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass
class Batch:
    """Collated rows. input_ids, labels: (B, T) int64, right-padded; labels IGNORE at pads."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    n_tokens: int  # real (unpadded) tokens
    n_loss_tokens: int  # targets predicted (labels[:, 1:] != IGNORE)
    indices: list[int] = field(default_factory=list)


def collate(examples: list[TokenizedExample], indices: list[int], pad_id: int) -> Batch:
    rows = [examples[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[k, : len(r)] = torch.tensor(r.labels, dtype=torch.long)
    n_loss = int((labels[:, 1:] != IGNORE).sum())
    return Batch(ids, labels, sum(len(r) for r in rows), n_loss, list(indices))


def make_batches(examples: list[TokenizedExample], token_budget: int, seed: int, pad_id: int) -> list[Batch]:
    """plan_batches + collate: the cached batches of one data set."""
    plan = plan_batches([len(e) for e in examples], token_budget, seed)
    return [collate(examples, idx, pad_id) for idx in plan]

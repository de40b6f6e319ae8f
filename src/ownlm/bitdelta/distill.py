"""Scale distillation (BitDelta, arXiv 2402.10193, section 3.2): freeze the signs, train only the scales so
that the compressed model's logits match the uncompressed fine-tuned model's (the teacher).

The student is the base model with each changed weight reparametrised (torch.nn.utils.parametrize) as
    dense:  W = W_base + sign(D) * s                       s: (rows, 1) | (1, cols) | (1,) broadcast
    lora1:  W = W_base + (alpha / r) * (sign(B) * s_B) @ (sign(A) * s_A)
with every base parameter frozen, so gradients reach only the scales. Full-precision entries of a dense
delta (changed norms, embeddings) are added to the student for the run, untrained. Afterwards the
parametrizations are removed and every touched base weight is restored exactly, so the caller's model is
unchanged; the trained scales come back in a new Delta.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ownlm.bitdelta.apply import check_fits
from ownlm.bitdelta.config import DistillConfig
from ownlm.bitdelta.delta import Delta
from ownlm.bitdelta.quant import QuantTensor, expand_scales


@dataclass
class DistillReport:
    steps: int
    loss: str  # 'mse' | 'kl'
    loss_before: float  # on the held-out evaluation batch, with the initial mean |x| scales
    loss_after: float  # same batch, trained scales (after rounding to the storage dtype)
    seconds: float


class _DenseSigns(nn.Module):
    """W -> W + signs * s. signs: int8 (rows, cols) of +1/-1 (a quarter of float32's memory)."""

    def __init__(self, signs: torch.Tensor, scales: torch.Tensor, granularity: str):
        super().__init__()
        self.register_buffer("signs", signs.to(torch.int8))
        self.scales = nn.Parameter(scales.float().clone())
        self.granularity = granularity

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = self.signs.to(torch.float32) * expand_scales(self.scales, self.granularity)
        return (w.float() + d).to(w.dtype)


class _LoraSigns(nn.Module):
    """W -> W + scaling * (signs_B * s_B) @ (signs_A * s_A); A: (r, in), B: (out, r)."""

    def __init__(self, a: QuantTensor, b: QuantTensor, scaling: float):
        super().__init__()
        self.register_buffer("signs_a", a.signs().to(torch.int8))
        self.register_buffer("signs_b", b.signs().to(torch.int8))
        self.scales_a = nn.Parameter(a.scales.float().clone())
        self.scales_b = nn.Parameter(b.scales.float().clone())
        self.scaling, self.granularity_a, self.granularity_b = scaling, a.granularity, b.granularity

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = self.signs_a.to(torch.float32) * expand_scales(self.scales_a, self.granularity_a)
        b = self.signs_b.to(torch.float32) * expand_scales(self.scales_b, self.granularity_b)
        return (w.float() + self.scaling * (b @ a)).to(w.dtype)


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """student, teacher: (batch, seq, vocab) logits -> scalar loss.

    'mse': mean over all elements of (student - teacher)^2 (the paper's objective).
    'kl':  KL(teacher || student) of the next-token distributions, averaged over the batch * seq tokens.
    """
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    s = F.log_softmax(student.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def random_batches(vocab_size: int, config: DistillConfig) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seq_len) int64 batches of uniform random token ids (no data needed; weaker
    than real text, which text_batches provides)."""
    g = torch.Generator().manual_seed(config.seed)
    while True:
        yield torch.randint(0, vocab_size, (config.batch_size, config.seq_len), generator=g)


def text_batches(token_ids: list[int], config: DistillConfig) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seq_len) batches of windows of a tokenised text, in a seeded random order."""
    n = len(token_ids) // config.seq_len
    if n < 1:
        raise ValueError(f"text of {len(token_ids)} tokens is shorter than one window of {config.seq_len}")
    windows = torch.tensor(token_ids[: n * config.seq_len]).reshape(n, config.seq_len)
    g = torch.Generator().manual_seed(config.seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, config.batch_size):
            yield windows[order[i : i + config.batch_size]]


def _attach(student: nn.Module, delta: Delta) -> dict[str, nn.Module]:
    """Parametrize the student's changed weights; key of the returned dict = parameter name."""
    attached = {}
    if delta.mode == "lora1":
        items = [(name, _LoraSigns(a, b, delta.lora_scaling))
                 for name, (a, b) in delta.lora_pairs().items()]
    else:
        items = [(name, _DenseSigns(q.signs(), q.scales, q.granularity)) for name, q in delta.quantised.items()]
    for name, p in items:
        path, _, leaf = name.rpartition(".")
        module = student.get_submodule(path)
        parametrize.register_parametrization(module, leaf, p.to(getattr(module, leaf).device))
        attached[name] = module.parametrizations[leaf][0]
    return attached


def _detach(student: nn.Module, attached: dict[str, nn.Module]) -> None:
    for name in attached:
        path, _, leaf = name.rpartition(".")
        # leave_parametrized=False restores the original (frozen, untouched) base tensor
        parametrize.remove_parametrizations(student.get_submodule(path), leaf, leave_parametrized=False)


def _scales_of(delta: Delta, attached: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in attached.items():
        if delta.mode == "lora1":
            module = name.removesuffix(".weight")
            out[f"{module}.lora_A"] = p.scales_a.detach().cpu().clone()
            out[f"{module}.lora_B"] = p.scales_b.detach().cpu().clone()
        else:
            out[name] = p.scales.detach().cpu().clone()
    return out


def distill(student: nn.Module, teacher: nn.Module, delta: Delta, batches: Iterator[torch.Tensor],
            config: DistillConfig, eval_batch: torch.Tensor | None = None) -> tuple[Delta, DistillReport]:
    """Train the delta's scales so student (= base + delta) matches teacher; returns (new delta, report).

    student: the base model (its weights are restored before returning). teacher: the uncompressed
    fine-tuned model (dense: the fine-tuned checkpoint; lora1: base + exact LoRA, e.g. peft's merged model).
    batches: (batch, seq) token ids; eval_batch: the batch the before/after losses are measured on
    (default: the first batch drawn, which is then not trained on).
    """
    t0 = time.perf_counter()
    check_fits(student, delta)
    device = next(student.parameters()).device
    eval_batch = (eval_batch if eval_batch is not None else next(batches)).to(device)
    was_training = student.training, teacher.training
    student.eval(), teacher.eval()  # dropout off: we match deterministic logits
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = dict(student.named_parameters())
    saved = {name: params[name].detach().clone() for name in delta.full}
    attached = {}
    try:
        with torch.no_grad():
            for name, d in delta.full.items():
                params[name].add_(d.to(params[name].device, params[name].dtype))
        attached = _attach(student, delta)

        def evaluate() -> float:
            with torch.no_grad():
                return logit_loss(student(eval_batch).logits, teacher(eval_batch).logits, config.loss).item()

        before = evaluate()
        scales = [s for p in attached.values() for s in p.parameters()]
        opt = torch.optim.Adam(scales, lr=config.lr)
        for _ in range(config.steps):
            ids = next(batches).to(device)
            with torch.no_grad():
                target = teacher(ids).logits
            loss = logit_loss(student(ids).logits, target, config.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError("scale distillation diverged (non-finite loss); lower --lr")
        dtype = next(iter(delta.quantised.values())).scales.dtype
        trained = {k: s.to(dtype) for k, s in _scales_of(delta, attached).items()}
        with torch.no_grad():  # measure what will be stored: scales rounded to the storage dtype
            for s in scales:
                s.copy_(s.to(dtype).float())
        after = evaluate()
    finally:
        _detach(student, attached)
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        for p in frozen:
            p.requires_grad_(True)
        student.train(was_training[0]), teacher.train(was_training[1])
    return delta.with_scales(trained), DistillReport(config.steps, config.loss, before, after, time.perf_counter() - t0)

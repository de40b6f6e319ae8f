"""Train: LoRA on the base model from tokenized examples -> out_dir/adapter/ + out_dir/report.json.

    report = train(base, train_examples, heldout, TrainConfig(), out_dir, progress=cb, dataset={...})

Fast on a CPU because (measured in bench/train_speed.py): batches are grouped by length under a token budget
(little padding), the LM head runs only at positions whose next token is a target, batches are collated once,
the base is frozen (no weight gradients) and torch uses one thread per physical core. On CUDA the forward
runs under bf16 autocast with fp32 LoRA weights.

Resumable: every `checkpoint_every_steps` steps and at the end, out_dir/checkpoint/ gets the adapter, the
AdamW state and the loop position (see ownlm.learn.steps); running the same call again after a crash continues
from there and ends with the same weights as an uninterrupted run (CPU). A non-finite loss or gradient raises
TrainingDiverged and leaves any previous out_dir/adapter untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ownlm.basemodel import BaseModel
from ownlm.learn.batching import epoch_order, make_batches, prepare
from ownlm.errors import ConfigError, NotEnoughData, TrainingDiverged
from ownlm.fsutil import mkdir_private
from ownlm.learn import dp
from ownlm.learn.qat import freeze_quantized, quantize_lora
from ownlm.learn.tokens import TokenizedExample
from ownlm.learn.steps import (
    all_finite, atomic_write, autocast_for, is_finite, load_checkpoint, lr_at, mean_nll, replace_dir,
    restore_optimizer, save_checkpoint, set_rng_state, supports_target_only_head, target_logits,
    unlikelihood, kl_to,
)

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
REPORT_FILE = "report.json"


@dataclass
class TrainConfig:
    """How to train. Every field is validated in __post_init__; the error names the field and the bad value."""

    # The adapter's layout: rank 1 on all seven linear layers, chosen by the recipe sweep (bench/recipe.py, table in
    # bench/README.md, 2026-12-03) against q/v r8 (the default before) and MLP-only r2 at the same <= 64 KB budget.
    # At the same 48 quantization-aware steps: bram style probes 8/11 vs 7/11, held-out NLL 3.25 vs 3.36, drift
    # 0.100 vs 0.117, ARC-Easy 42% vs 39%; mira NLL 3.48 vs 3.68, drift 0.112 vs 0.126, ARC 45% vs 40%, probes
    # tied (0/8 style); chiara NLL 2.47 vs 2.60, drift 0.116 vs 0.142, ARC 43% vs 40%, probes tied (0/8); and
    # 48,952 B of 1-bit delta against 61,281 B.
    r: int = field(default=1, metadata={"help": "LoRA rank. r=1 on all seven linear layers of the 135M base is "
                                                "305,280 parameters (48,952 B as lora1, names and scales included); q/v r8 is 460,800."})
    alpha: float = field(default=2, metadata={"help": "LoRA alpha; the update is scaled by alpha / r (here 2)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout in [0, 1). 0 keeps steps deterministic and cheap."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Exact names of the linear modules that get LoRA: all seven of a Llama block by default "
                  "(see r); lora1, the GGUF LoRA export and the llama engine take any of them."},
    )
    lr: float = field(
        default=2e-4,
        metadata={"help": "Peak AdamW learning rate. 2e-4 is the usual LoRA rate (LoRA, QLoRA) at alpha/r = 2: "
                  "fast enough to learn a style in a few hundred steps, slow enough not to wreck the base's "
                  "general ability (the quality gate checks drift)."},
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the training examples."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (None: epochs decide)."})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "Stop after this many seconds of training in this call (None: no limit)."}
    )
    batch_tokens: int = field(
        default=1024,
        metadata={"help": "Token budget per batch: rows x longest row (padding included) stays under it. 1024 "
                  "gave the best CPU throughput in bench/train_speed.py (less padding than 4096: 3.9 % vs 14 % on "
                  "the bench data) and 3x more optimizer steps per epoch, which small personal data sets need."},
    )
    max_seq_len: int = field(
        default=512, metadata={"help": "Longer examples keep their last max_seq_len tokens (the start is cut)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the steps with a linear LR warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    grad_clip: float | None = field(default=1.0, metadata={"help": "Clip the gradient's global norm (None: no clip)."})
    seed: int = field(default=0, metadata={"help": "Seeds LoRA init, batch grouping and batch order."})
    checkpoint_every_steps: int = field(default=50, metadata={"help": "Write a resumable checkpoint every N steps."})
    min_examples: int = field(default=1, metadata={"help": "Refuse to train on fewer usable examples than this."})
    eval_batch_tokens: int = field(default=1024, metadata={"help": "Token budget per held-out batch (no gradients; the training batches' size)."})
    qat: bool = field(
        default=False,
        metadata={"help": "Quantization-aware training: the LoRA factors are trained as the 1-bit sign x scale tensors "
                  "that are deployed (learn/qat.py), so the lora1 artifact loses nothing of what was trained."},
    )
    unlikelihood: float = field(
        default=0.0,
        metadata={"help": "Weight of token-level unlikelihood (learn/steps.py): at each target position, -log(1 - p) "
                  "of every token said earlier in the example but not the target. 0: off."},
    )
    anchor_kl: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(base || personal) at the target positions, the base being the model with the "
                  "adapter off: keeps what the user's data does not ask for as the base had it. 0: off (saves the "
                  "base's forward pass per step, ~1/3 of a step)."},
    )
    qat_scales: str = field(
        default="matrix",
        metadata={"help": "With qat: one learned scale per factor matrix ('matrix', the lora1 default) or per rank "
                  "component ('rank'); the artifact must be compressed with the same scales."},
    )
    dp: bool = field(default=False, metadata={"help": "Differentially private training (DP-SGD, learn/dp.py): per-conversation "
                     "clipping + Gaussian noise on the LoRA parameters; (epsilon, delta) goes into the report and manifest."})
    dp_epsilon: float | None = field(default=None, metadata={"help": "With dp: the epsilon to spend over the planned steps "
                                     "(the noise multiplier is solved for it). Set this or dp_noise_multiplier."})
    dp_noise_multiplier: float | None = field(default=None, metadata={"help": "With dp: noise std / clip norm, fixed "
                                              "(epsilon then follows from the steps taken)."})
    dp_delta: float | None = field(default=None, metadata={"help": "With dp: delta (None: min(1e-5, 1/conversations))."})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "With dp: each conversation's gradient is clipped to this L2 norm."})
    dp_batch_size: int = field(default=8, metadata={"help": "With dp: expected conversations per step (Poisson sampling, q = this / conversations)."})
    dp_accountant: str = field(default="rdp", metadata={"help": "With dp: Opacus' privacy accountant, 'rdp' or 'prv'."})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid training setting {name}={getattr(self, name)!r}: {why}",
                               hint=f"fix {name} ({_help(name)})")

        for name in ("r", "epochs", "batch_tokens", "max_seq_len", "checkpoint_every_steps", "min_examples",
                     "eval_batch_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", "must be a positive integer or None")
        for name in ("alpha", "lr"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise bad(name, "must be a positive number")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        for name in ("unlikelihood", "anchor_kl"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 100:
                raise bad(name, "must be a number in [0, 100)")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "must be positive or None")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise bad("time_budget_s", "must be positive or None")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise bad("target_modules", "must be a non-empty list of module names")
        self.target_modules = list(self.target_modules)
        if not isinstance(self.qat, bool):
            raise bad("qat", "must be true or false")
        if self.qat_scales not in ("matrix", "rank"):
            raise bad("qat_scales", "must be 'matrix' or 'rank'")
        if self.max_seq_len > self.batch_tokens:
            raise bad("max_seq_len", f"must be <= batch_tokens ({self.batch_tokens}) so that any example fits a batch")
        dp.validate(self, bad)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}", hint=f"use: {', '.join(sorted(known))}")
        return cls(**d)


def _help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(TrainConfig) if f.name == name)


# Fields that do not change the computation, so a checkpoint stays valid when only they change.
_RESUME_NEUTRAL = {"time_budget_s", "checkpoint_every_steps", "eval_batch_tokens", "min_examples"}


@dataclass
class TrainProgress:
    """What the `progress` callback receives: phase is 'eval_base', 'train' or 'eval_personal'."""

    phase: str
    step: int
    total_steps: int
    epoch: int
    loss: float | None
    tokens_per_s: float
    elapsed_s: float
    eta_s: float | None


@dataclass
class TrainReport:
    samples: int  # training examples used
    tokens: int  # real tokens processed (all epochs)
    loss_tokens: int  # target tokens processed (all epochs)
    steps: int
    epochs_completed: float
    duration_s: float  # training loop only (this call), without evaluation
    tokens_per_s: float
    loss: float | None  # mean train loss of the last epoch's steps (or last up to 10 steps)
    loss_curve: list[float]  # mean target-token loss per step
    heldout_samples: int
    heldout_loss_base: float | None
    heldout_loss_personal: float | None
    base_sha256: str
    config: dict
    dataset: dict | None
    stopped: str  # 'completed' | 'max_steps' | 'time_budget'
    resumed_from_step: int | None
    dropped_no_target: int
    truncated: int  # examples cut from the left to max_seq_len
    batches_per_epoch: int
    padding_fraction: float  # padded positions / all positions in the training batches
    wall_s: float  # the whole call, evaluation and saving included
    adapter_dir: str
    dp: dict | None = None  # the privacy budget spent (learn/dp.py Budget), None without dp

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _fingerprint(base_sha: str, config: TrainConfig, examples: list[TokenizedExample], init: str | None = None) -> str:
    h = hashlib.sha256(base_sha.encode())
    if init is not None:  # a continued adapter's checkpoint must not be resumed on top of another start
        h.update(b"init:" + init.encode())
    h.update(json.dumps({k: v for k, v in config.to_dict().items() if k not in _RESUME_NEUTRAL}, sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def check_examples(train_examples: list[TokenizedExample], usable: int, config: TrainConfig) -> None:
    if not train_examples:
        raise NotEnoughData("no training examples", hint="capture or import conversations first (ownlm import ...)")
    if usable < config.min_examples:
        raise NotEnoughData(
            f"{usable} usable training example(s) (with at least one assistant target), at least "
            f"{config.min_examples} needed",
            hint="capture or import more conversations, or lower min_examples",
        )


def train(
    base: BaseModel,
    train_examples: list[TokenizedExample],
    heldout: list[TokenizedExample],
    config: TrainConfig,
    out_dir: Path,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = True,
    dataset: dict | None = None,
    init_adapter: Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainReport:
    """Train a LoRA adapter; write out_dir/adapter/ and out_dir/report.json only on success.

    `dataset` is recorded as is in the report (e.g. {"merkle_root": ...}). `resume=False` ignores an
    existing checkpoint. `init_adapter` (a peft adapter directory with the same r, alpha and target modules)
    starts from its weights instead of a fresh LoRA init: continual learning, see loop.py. `on_checkpoint(root)`
    is called after each checkpoint is complete under root (the trainer role seals it away: privacy/trainer.py).
    The base model is left as it was (the LoRA layers are removed at the end).
    """
    from peft import LoraConfig, get_peft_model

    wall0 = time.perf_counter()
    out_dir = Path(out_dir)
    data = prepare(train_examples, config.max_seq_len)
    check_examples(train_examples, len(data.examples), config)
    held = prepare(heldout, config.max_seq_len)
    device = base.device.device
    if not supports_target_only_head(base.model):
        raise ConfigError("this base post-processes its logits (soft-capping or scaling)",
                          hint="use a Llama-style base (SmolLM2, Llama, Qwen, Mistral)")
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id

    batches = make_batches(data.examples, config.batch_tokens, config.seed, pad_id)
    held_batches = make_batches(held.examples, config.eval_batch_tokens, config.seed, pad_id)
    n_batches = dp.steps_per_epoch(data.examples, config) if config.dp else len(batches)  # DP: Poisson draws
    total_steps = config.epochs * n_batches
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    padded = sum(b.input_ids.numel() for b in batches)
    init = _read_init(Path(init_adapter), config) if init_adapter is not None else None
    fingerprint = _fingerprint(base.sha256, config, data.examples, init[0] if init else None)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base.model, lora)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"invalid training setting target_modules={config.target_modules!r}: {e}",
                          hint="name linear modules of the base, e.g. q_proj, k_proj, v_proj, o_proj") from None
    private: dp.DPTrainer | None = None
    try:
        causal_lm = model.get_base_model()  # the *ForCausalLM with LoRA layers injected
        if init is not None:
            _load_init(causal_lm, init[1], init_adapter)
        quantized = quantize_lora(causal_lm, config.qat_scales) if config.qat else []  # after the init: scales start from it
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
        private = dp.DPTrainer(model, causal_lm, optimizer, data.examples, config, pad_id, total_steps, device) if config.dp else None

        # Loop state, restored from a checkpoint when there is a matching one.
        step, loss_curve, tokens_seen, loss_tokens_seen = 0, [], 0, 0
        heldout_base: float | None = None
        resumed_from = None
        ckpt_root = out_dir / CHECKPOINT_DIR
        ckpt = load_checkpoint(ckpt_root) if resume else None
        if ckpt is not None and ckpt[0].get("fingerprint") == fingerprint:
            state, adapter_t, opt_t = ckpt
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(adapter_t[n])
            restore_optimizer(optimizer, state, opt_t)
            set_rng_state(state["rng"])
            step, loss_curve = state["step"], state["loss_curve"]
            tokens_seen, loss_tokens_seen = state["tokens_seen"], state["loss_tokens_seen"]
            heldout_base = state.get("heldout_loss_base")
            resumed_from = step
            log.info("resuming from step %d of %d", step, total_steps)
        elif ckpt is not None:
            log.warning("ignoring the checkpoint in %s: it was made for other data, config or base", ckpt_root)

        def report_progress(phase: str, loss: float | None, t_rate: float, elapsed: float) -> None:
            if progress is None:
                return
            rate = t_rate
            left = total_steps - step
            eta = elapsed / max(1, step - (resumed_from or 0)) * left if step > (resumed_from or 0) else None
            progress(TrainProgress(phase, step, total_steps, step // max(1, n_batches), loss, rate, elapsed, eta))

        model.eval()
        if heldout_base is None and held_batches:
            report_progress("eval_base", None, 0.0, 0.0)
            with model.disable_adapter():
                heldout_base = mean_nll(causal_lm, held_batches, device)

        stopped = "completed" if total_steps == config.epochs * n_batches else "max_steps"
        model.train()
        t0 = time.perf_counter()
        call_tokens = 0
        while step < total_steps:
            epoch, k = divmod(step, n_batches)
            batch = batches[epoch_order(n_batches, config.seed, epoch)[k]] if private is None else None
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, config.lr, total_steps, warmup)
            if private is not None:  # one DP-SGD step on a Poisson draw (learn/dp.py); the loss is that draw's NLL
                loss_value, n_tok, n_loss_tok, _ = private.step()
                if not all_finite(params.values()) or (loss_value is not None and not math.isfinite(loss_value)):
                    raise _diverged(step, f"loss {loss_value} or a LoRA weight is not finite", config)
            else:
                logits, targets, rows = target_logits(causal_lm, batch, device)
                nll = F.cross_entropy(logits, targets, reduction="sum")
                objective = nll
                if config.unlikelihood:
                    objective = objective + config.unlikelihood * unlikelihood(logits, targets, rows)
                if config.anchor_kl:
                    with torch.no_grad(), model.disable_adapter():
                        reference, _, _ = target_logits(causal_lm, batch, device)
                    objective = objective + config.anchor_kl * kl_to(reference, logits)
                loss = objective / batch.n_loss_tokens
                loss_value = (nll / batch.n_loss_tokens).detach().item()  # the curve is the NLL, whatever the extra terms
                objective_value = loss.detach().item()
                if not is_finite(objective_value):
                    raise _diverged(step, f"loss is {objective_value}", config)
                loss.backward()
                if config.grad_clip is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip))
                else:
                    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values()])))
                if not is_finite(norm):
                    raise _diverged(step, f"gradient norm is {norm}", config)
                try:
                    optimizer.step()
                except RuntimeError as e:  # AdamW's step size itself overflows float32 at absurd learning rates
                    if "overflow" not in str(e):
                        raise
                    raise _diverged(step, f"the optimizer step overflowed ({e})", config) from None
                optimizer.zero_grad(set_to_none=True)
                n_tok, n_loss_tok = batch.n_tokens, batch.n_loss_tokens
            step += 1
            if loss_value is not None:  # None: a DP step whose Poisson draw was empty (a noise-only step)
                loss_curve.append(loss_value)
            tokens_seen += n_tok
            loss_tokens_seen += n_loss_tok
            call_tokens += n_tok
            elapsed = time.perf_counter() - t0
            report_progress("train", loss_value, call_tokens / elapsed, elapsed)
            over_budget = config.time_budget_s is not None and elapsed >= config.time_budget_s
            if step % config.checkpoint_every_steps == 0 or step == total_steps or over_budget:
                if not all_finite(params.values()):
                    raise _diverged(step, "a LoRA weight is not finite", config)
                save_checkpoint(ckpt_root, step, params, optimizer, {
                    "fingerprint": fingerprint, "loss_curve": loss_curve, "tokens_seen": tokens_seen,
                    "loss_tokens_seen": loss_tokens_seen, "heldout_loss_base": heldout_base,
                    "epoch": step // n_batches, "batch_in_epoch": step % n_batches,
                    "epoch_order": epoch_order(n_batches, config.seed, step // n_batches),
                    "batches": [b.indices for b in batches], "total_steps": total_steps,
                })
                if on_checkpoint is not None:
                    on_checkpoint(ckpt_root)
            if over_budget and step < total_steps:
                stopped = "time_budget"
                break
        duration = time.perf_counter() - t0

        if not all_finite(params.values()):
            raise _diverged(step, "a LoRA weight is not finite", config)
        model.eval()
        heldout_personal = None
        if held_batches:
            report_progress("eval_personal", loss_curve[-1] if loss_curve else None, call_tokens / max(duration, 1e-9), duration)
            heldout_personal = mean_nll(causal_lm, held_batches, device)

        freeze_quantized(quantized)  # the adapter saved holds the 1-bit factors themselves (plain peft format)
        mkdir_private(out_dir)
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{ADAPTER_DIR}.tmp-"))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            replace_dir(tmp, out_dir / ADAPTER_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        last = loss_curve[-n_batches:] if n_batches <= len(loss_curve) else loss_curve[-10:]
        report = TrainReport(
            samples=len(data.examples), tokens=tokens_seen, loss_tokens=loss_tokens_seen, steps=step,
            epochs_completed=round(step / n_batches, 4), duration_s=round(duration, 3),
            tokens_per_s=round(call_tokens / duration, 1) if duration > 0 else 0.0,
            loss=sum(last) / len(last) if last else None, loss_curve=loss_curve,
            heldout_samples=len(held.examples), heldout_loss_base=heldout_base, heldout_loss_personal=heldout_personal,
            base_sha256=base.sha256, config=config.to_dict(), dataset=dataset, stopped=stopped,
            resumed_from_step=resumed_from, dropped_no_target=data.dropped_no_target, truncated=data.truncated,
            batches_per_epoch=n_batches, padding_fraction=round(1 - data.tokens / padded, 4) if padded else 0.0,
            wall_s=round(time.perf_counter() - wall0, 3), adapter_dir=str(out_dir / ADAPTER_DIR),
            dp=private.budget(step).to_dict() if private is not None else None,
        )
        atomic_write(out_dir / REPORT_FILE, report.to_json())
        return report
    finally:
        if private is not None:
            private.close()  # Opacus' hooks off before the LoRA layers go
        model.unload()  # removes the LoRA layers: base.model is the plain base again
        base.model.eval()


def _read_init(directory: Path, config: TrainConfig) -> tuple[str, dict]:
    """(sha256 of the weights file, {module path: (A, B)}) of an adapter to continue from, checked against config."""
    from ownlm.bitdelta.lora1 import ADAPTER_WEIGHTS, read_adapter

    ad = read_adapter(directory)  # refuses anything but plain LoRA, with the field to fix
    if ad.r != config.r or ad.alpha != config.alpha or set(ad.target_modules) != set(config.target_modules):
        raise ConfigError(
            f"cannot continue from adapter {directory}: it has r={ad.r}, alpha={ad.alpha:g}, targets "
            f"{list(ad.target_modules)}; this run wants r={config.r}, alpha={config.alpha:g}, targets {config.target_modules}",
            hint="train from scratch (no init adapter) or use the same LoRA settings as the previous round",
        )
    return hashlib.sha256((directory / ADAPTER_WEIGHTS).read_bytes()).hexdigest(), ad.factors


def _load_init(causal_lm: torch.nn.Module, factors: dict, directory: Path) -> None:
    """Copy the factors into the freshly injected LoRA layers (peft's adapter name is 'default')."""
    modules = dict(causal_lm.named_modules())
    injected = {n for n, m in modules.items() if hasattr(m, "lora_A")}
    if injected != set(factors):
        raise ConfigError(f"cannot continue from adapter {directory}: it covers {len(factors)} layers, this run "
                          f"{len(injected)}", hint="train from scratch: the adapter was made for another base model")
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = modules[path]
            if layer.lora_A["default"].weight.shape != a.shape or layer.lora_B["default"].weight.shape != b.shape:
                raise ConfigError(f"cannot continue from adapter {directory}: {path} does not fit this base",
                                  hint="train from scratch: the adapter was made for another base model")
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)


def _diverged(step: int, what: str, config: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged at step {step + 1}: {what} (lr={config.lr:g}); the previous adapter was kept",
        hint="lower lr (e.g. 1e-4), keep grad_clip on, or check the examples for garbage",
    )

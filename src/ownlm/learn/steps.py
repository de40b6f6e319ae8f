"""The pieces of the training loop: the loss at target positions only, evaluation, the LR schedule, and
checkpoints (adapter + AdamW state + loop position) in safetensors + JSON, written atomically. Never pickled.
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ownlm.learn.batching import Batch
from ownlm.fsutil import atomic_write, fsync_dir, mkdir_private, replace_dir  # noqa: F401 (re-exported for train.py)
from ownlm.learn.tokens import IGNORE

CHECKPOINT_FORMAT = 1
LATEST = "LATEST"  # file in out_dir/checkpoint/ naming the newest complete step directory


# --- loss ---------------------------------------------------------------------------------------------


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (observed much slower in an ad-hoc run on this AVX2-only CPU without AVX512-BF16/AMX; no committed benchmark)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def target_logits(causal_lm: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at target positions only: (logits (N, V) float32, targets (N,), rows (N,) batch row of each).

    causal_lm: a *ForCausalLM (with or without LoRA layers injected) whose logits are lm_head(hidden), as in
    Llama/Mistral/Qwen/SmolLM. The 49k-row head costs as much as ~6 of the 30 decoder layers per position;
    here it runs only at the N positions whose next token is a target (typically 30-50% of them), in row-major
    order (row 0's targets first, each row's in text order).
    """
    ids = batch.input_ids.to(device)  # (B, T)
    labels = batch.labels.to(device)  # (B, T)
    with autocast_for(device):
        # Right-padded rows need no attention mask under causal attention (see ownlm.learn.batching).
        hidden = causal_lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        mask = targets != IGNORE
        h = hidden[:, :-1][mask]  # (N, H)
        logits = causal_lm.get_output_embeddings()(h)  # (N, V)
    rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(mask)[mask]
    return logits.float(), targets[mask], rows


def target_nll(causal_lm: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Sum of the next-token NLL over target positions (see `target_logits`).

    Exactly equal to the loss of the full logits (tests/test_train.py checks it).
    """
    logits, targets, _ = target_logits(causal_lm, batch, device)
    return F.cross_entropy(logits, targets, reduction="sum")


def repeat_candidates(targets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, token) pairs for token-level unlikelihood: at each target position, every distinct token that
    an earlier target position of the same row had, except the position's own target.

    targets, rows: (N,) as returned by `target_logits`. Returns two (M,) index tensors into the (N, V) logits.
    """
    pos, tok = [], []
    for r in torch.unique(rows):
        idx = torch.nonzero(rows == r).flatten()  # (n,) this row's target positions, in text order
        n = idx.numel()
        if n < 2:
            continue
        later, earlier = torch.tril_indices(n, n, offset=-1, device=targets.device)  # every earlier < later pair
        pos.append(idx[later])
        tok.append(targets[idx[earlier]])
    if not pos:
        empty = torch.zeros(0, dtype=torch.long, device=targets.device)
        return empty, empty
    pos, tok = torch.cat(pos), torch.cat(tok)
    keep = tok != targets[pos]  # repeating a token is fine where the reply really does repeat it
    pos, tok = pos[keep], tok[keep]
    vocab = int(targets.max()) + 1  # every candidate token is some target
    pair = torch.unique(pos * vocab + tok)  # each (position, token) once, however often the token came before
    return pair // vocab, pair % vocab


def unlikelihood(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sum over target positions of -log(1 - p(c)) for the tokens c already said earlier in the row (Welleck et
    al. 2019, token-level unlikelihood): penalises putting mass on a repeat, the cause of "Ahoy! Ahoy! Ahoy!".

    logits: (N, V) at target positions; returns a scalar (0 when no position has a candidate).
    """
    pos, tok = repeat_candidates(targets, rows)
    if pos.numel() == 0:
        return logits.sum() * 0.0
    p = torch.softmax(logits, dim=-1)[pos, tok]  # (M,)
    return -torch.log(torch.clamp(1.0 - p, min=1e-5)).sum()


def kl_to(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(reference || model) in nats; both (N, V). The reference carries no gradient."""
    ref = torch.log_softmax(reference_logits.detach(), dim=-1)
    return F.kl_div(torch.log_softmax(logits, dim=-1), ref, log_target=True, reduction="sum")


def full_logits_nll(causal_lm: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The textbook loss (full logits at every position), for checking `target_nll`."""
    ids, labels = batch.input_ids.to(device), batch.labels.to(device)
    logits = causal_lm(input_ids=ids, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="sum",
    )


@torch.inference_mode()
def mean_nll(causal_lm: torch.nn.Module, batches: list[Batch], device: torch.device) -> float | None:
    """Mean NLL per target token over `batches` (None when there is no target token)."""
    total, count = 0.0, 0
    for b in batches:
        total += float(target_nll(causal_lm, b, device))
        count += b.n_loss_tokens
    return total / count if count else None


def supports_target_only_head(causal_lm: torch.nn.Module) -> bool:
    """False for models that post-process logits (e.g. Gemma 2's soft-capping), where lm_head(h) != logits."""
    cfg = causal_lm.config
    return not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) in (None, 1.0)


# --- schedule -----------------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then linear decay towards 0 at `total_steps` (step is 0-based).

    A pure function of the step, so the scheduler's position is just the step counter in a checkpoint.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    return base_lr * max(0.0, (total_steps - step) / remaining)


# --- RNG state as JSON --------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


# --- checkpoints --------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write root/step-<N>/{adapter,optimizer}.safetensors + state.json, then point root/LATEST at it.

    `params`: the trainable parameters by name, in the optimizer's order. The optimizer's per-parameter
    tensors (AdamW: exp_avg, exp_avg_sq) go to optimizer.safetensors as "<key>/<param name>"; its scalars
    (step counters, hyper-parameters) go to state.json with the caller's loop state. A crash at any point
    leaves LATEST on the previous complete checkpoint.
    """
    mkdir_private(root)
    names = list(params)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in opt["state"].items():
        name = names[idx]
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{key}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(name, {})[key] = float(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    full_state = {
        **state,
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "optimizer": {"param_groups": groups, "scalars": scalars, "param_names": names},
        "rng": rng_state(),
    }
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}.tmp-"))
    save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}, str(tmp / "adapter.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(full_state))
    replace_dir(tmp, final)
    atomic_write(root / LATEST, final.name + "\n")
    for old in root.iterdir():  # older checkpoints and leftovers of an interrupted write
        if old.name not in (final.name, LATEST):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def load_checkpoint(root: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(state, adapter tensors, optimizer tensors) of the newest complete checkpoint, or None."""
    try:
        name = (root / LATEST).read_text().strip()
        directory = root / name
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            return None
        return state, load_file(str(directory / "adapter.safetensors")), load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError):
        return None


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of the optimizer part of `save_checkpoint`."""
    saved = state["optimizer"]
    names = saved["param_names"]
    device_of = [p.device for g in optimizer.param_groups for p in g["params"]]
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        i = names.index(name)
        per_param.setdefault(i, {})[kind] = value.to(device_of[i])
    for name, values in saved["scalars"].items():
        i = names.index(name)
        for key, v in values.items():
            per_param.setdefault(i, {})[key] = torch.tensor(v, dtype=torch.float32)
    groups, start = [], 0
    for g, live in zip(saved["param_groups"], optimizer.param_groups):
        n = len(live["params"])
        groups.append({**g, "params": list(range(start, start + n))})
        start += n
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def is_finite(x: float) -> bool:
    return math.isfinite(x)

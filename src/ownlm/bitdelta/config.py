"""Configs of the BitDelta engine: what to compress and how to distil the scales.

Like peft's configs: every field has help text in its metadata (the CLI and docs show it) and
`__post_init__` rejects a bad value by naming the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ownlm.errors import ConfigError

MODES = ("lora1", "dense")
GRANULARITIES = ("row", "col", "matrix", "rank")
SCALE_DTYPES = ("auto", "float16", "float32")
LOSSES = ("mse", "kl")
# Every linear projection of a Llama block; matched against the last component of a module's dotted path.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Kept out of the 1-bit path whatever the config says: the paper leaves them in full precision because a
# sign delta on a lookup table or on the output projection costs far more quality than it saves bytes.
NEVER_ONE_BIT = ("embed_tokens", "lm_head")


def _bad(name: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"invalid value {value!r} for '{name}'", hint=f"'{name}' must be {allowed}")


@dataclass
class CompressConfig:
    """How a delta is compressed to 1 bit per weight."""

    mode: str = field(
        default="lora1",
        metadata={"help": "'lora1': the LoRA factors A and B of a peft adapter as signs + scales. "
                  "'dense': the paper's BitDelta, sign(W_ft - W_base) of every target matrix + scales."},
    )
    scales: str | None = field(
        default=None,
        metadata={"help": "Scale granularity: 'row' (one scale per row), 'col' (one per column), 'matrix' "
                  "(one per matrix) or, lora1 only, 'rank' (one per rank component: rows of A, columns of B; "
                  "r scales per factor). Default 'matrix' for both modes: measured by bench/fidelity.py on a persona LoRA "
                  "of the 135M model, 'rank' kept the same share of the gain (68.4% vs 68.3%) for 1.7 KB more and 'row' "
                  "78% for 47 KB more."},
    )
    scale_dtype: str = field(
        default="auto",
        metadata={"help": "Storage dtype of the scales: 'float16', 'float32', or 'auto' = float16 unless a "
                  "non-zero scale falls outside float16's normal range (then float32, to keep precision)."},
    )
    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "dense only: bare module names (last path component, e.g. 'q_proj') whose weight "
                  "goes through the 1-bit path. Default: all Llama linear projections. lora1 takes them "
                  "from the adapter and rejects this field."},
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _bad("mode", self.mode, " or ".join(MODES))
        if self.scales is None:
            self.scales = "matrix"
        if self.scales not in GRANULARITIES:
            raise _bad("scales", self.scales, " or ".join(GRANULARITIES))
        if self.scales == "rank" and self.mode != "lora1":
            raise _bad("scales", self.scales, "row, col or matrix in dense mode ('rank' needs LoRA factors)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise _bad("scale_dtype", self.scale_dtype, " or ".join(SCALE_DTYPES))
        if self.mode == "lora1":
            if self.target_modules is not None:
                raise _bad("target_modules", self.target_modules, "unset in lora1 mode (the adapter names them)")
            return
        targets = tuple(self.target_modules) if self.target_modules is not None else LLAMA_LINEARS
        if not targets or len(set(targets)) != len(targets):
            raise _bad("target_modules", targets, "a non-empty list of distinct module names")
        for name in targets:
            if not isinstance(name, str) or not name or "." in name:
                raise _bad("target_modules", name, "a bare module name such as 'q_proj' (no dots)")
            if name in NEVER_ONE_BIT:
                raise _bad("target_modules", name, f"not one of {NEVER_ONE_BIT} (kept in full precision)")
        self.target_modules = targets


@dataclass
class DistillConfig:
    """Scale distillation (BitDelta section 3.2): signs frozen, scales trained to match the teacher's logits."""

    steps: int = field(default=200, metadata={"help": "Optimiser steps (the paper: 800 samples / batch 4)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate (the paper's 1e-4)."})
    loss: str = field(
        default="mse",
        metadata={"help": "'mse': mean squared error of the logits (the paper). 'kl': KL(teacher || student) "
                  "of the next-token distributions, per token."},
    )
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence (the paper: 128)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random-token batches and of shuffling."})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            minimum = 0 if name == "steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise _bad(name, value, f"an integer >= {minimum}")
        if not isinstance(self.lr, (int, float)) or not (0 < self.lr < 1):
            raise _bad("lr", self.lr, "a number in (0, 1)")
        if self.loss not in LOSSES:
            raise _bad("loss", self.loss, " or ".join(LOSSES))


def field_help(config_cls: type) -> dict[str, str]:
    """{field name: help text} of a config class, for CLI help and docs."""
    return {f.name: f.metadata.get("help", "") for f in fields(config_cls)}

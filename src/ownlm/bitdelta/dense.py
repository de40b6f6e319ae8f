"""Mode `dense`: the paper's BitDelta (arXiv 2402.10193) for a base / fine-tuned pair of checkpoints.

For every nn.Linear whose own name (the last component of its dotted path, never a substring) is in
config.target_modules: delta = W_ft - W_base, stored as sign(delta) packed 8 per byte plus mean |delta|
scales (one per matrix by default, as in the paper). Every other parameter (embeddings, norms, biases, an
untied LM head) stays out of the 1-bit path and is stored in full precision only if it changed.

At 1 bit per weight this is about 13 MB for the 135M base's linears (7B: ~810 MB): use lora1 for kilobytes.
"""

from __future__ import annotations

import torch
from torch import nn

from ownlm.bitdelta.config import CompressConfig
from ownlm.bitdelta.delta import Delta, cast_scales
from ownlm.bitdelta.quant import quantise
from ownlm.errors import ConfigError, DeltaMismatch


def target_weights(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Parameter names '<path>.weight' of the nn.Linear modules whose last path component is a target.

    Raises ConfigError when a target name matches no Linear (a typo must not compress nothing silently).
    """
    names, seen = [], set()
    for path, module in model.named_modules():
        leaf = path.rpartition(".")[2]
        if leaf in target_modules:
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"target module {path} is a {type(module).__name__}, not a Linear",
                                  hint="name only linear projections in target_modules")
            names.append(f"{path}.weight")
            seen.add(leaf)
    missing = [t for t in target_modules if t not in seen]
    if missing:
        raise ConfigError(f"no module named {', '.join(missing)} in the model",
                          hint="target_modules are bare names such as q_proj (see the model's named_modules)")
    return names


def compress_dense(base: nn.Module, finetuned: nn.Module, config: CompressConfig, base_sha256: str) -> Delta:
    """Compress finetuned - base. Both models must have the same architecture (same parameter names/shapes)."""
    if config.mode != "dense":
        raise ValueError("compress_dense needs a CompressConfig with mode='dense'")
    base_params = dict(base.named_parameters())  # tied weights appear once (named_parameters dedups them)
    ft_params = dict(finetuned.named_parameters())
    if base_params.keys() != ft_params.keys():
        diff = sorted(base_params.keys() ^ ft_params.keys())
        raise DeltaMismatch(f"base and fine-tuned models differ in parameters, e.g. {diff[:3]}",
                            hint="pass the checkpoint the fine-tuned model was trained from as --base")
    for name, p in base_params.items():
        if p.shape != ft_params[name].shape:
            raise DeltaMismatch(f"parameter {name} is {tuple(p.shape)} in the base but "
                                f"{tuple(ft_params[name].shape)} in the fine-tuned model",
                                hint="pass the checkpoint the fine-tuned model was trained from as --base")
    targets = set(target_weights(base, config.target_modules))
    quantised, full, shapes = {}, {}, {}
    with torch.no_grad():
        for name, p in base_params.items():
            diff = ft_params[name].detach().float().cpu() - p.detach().float().cpu()
            if name in targets:
                quantised[name] = quantise(diff, config.scales)
            elif torch.any(diff != 0):
                full[name] = diff
            else:
                continue
            shapes[name] = tuple(p.shape)
    delta = Delta(mode="dense", granularity=config.scales, base_sha256=base_sha256,
                  target_modules=tuple(config.target_modules), quantised=quantised, param_shapes=shapes, full=full)
    return cast_scales(delta, config.scale_dtype)

"""`ownlm compress`, `ownlm inspect` and `ownlm apply`: BitDelta deltas on the command line."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import click
from rich.table import Table

from ownlm.bitdelta.config import GRANULARITIES, LOSSES, SCALE_DTYPES, CompressConfig, DistillConfig
from ownlm.cli.base import Context, cli, console, pass_ctx
from ownlm.errors import ConfigError, InvalidInput



def _empty_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out {path} exists and is not an empty directory", hint="pass a new directory")
    return path


def _load_fp32(settings):
    """The configured base in float32 (compression and merging need full precision even on CUDA)."""
    import torch

    from ownlm.basemodel import load_base
    from ownlm.device import select_device

    device = dataclasses.replace(select_device(settings.device, settings.threads), dtype=torch.float32)
    with console.status(f"loading base {settings.base}…", spinner="dots"):
        return load_base(settings, device=device)


def _load_checkpoint(path: str, device):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad checkpoint
        raise InvalidInput(f"cannot load --finetuned {path}: {e}", hint="pass a checkpoint directory") from e
    return model.to(device).eval()


def _batches(base, data: str | None, config: DistillConfig):
    from ownlm.bitdelta.distill import random_batches, text_batches

    if data is None:
        return random_batches(len(base.tokenizer), config)
    ids = base.tokenizer(Path(data).read_text(encoding="utf-8"))["input_ids"]
    try:
        return text_batches(ids, config)
    except ValueError as e:
        raise ConfigError(f"--distill-data {data}: {e}", hint="pass a longer text or a smaller --seq-len") from None


@cli.command()
@click.argument("adapter", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="New directory for the delta.")
@click.option("--base", metavar="PATH", help="Base model: 'embedded', a .gguf file or a checkpoint directory.")
@click.option("--finetuned", metavar="DIR", type=click.Path(exists=True, file_okay=False),
              help="Dense mode: the fine-tuned checkpoint directory (instead of ADAPTER).")
@click.option("--scales", type=click.Choice(GRANULARITIES), help="Scale granularity (default row for lora1, "
              "matrix for dense).")
@click.option("--scale-dtype", type=click.Choice(SCALE_DTYPES), default="auto", show_default=True)
@click.option("--targets", metavar="NAMES", help="Dense mode: comma-separated module names (default: all "
              "Llama linear projections).")
@click.option("--distill-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Scale-distillation steps (0: keep the mean |x| scales).")
@click.option("--distill-loss", type=click.Choice(LOSSES), default="mse", show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Distillation learning rate (Adam).")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True)
@click.option("--distill-data", type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text to distil on (default: random tokens).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (default auto).")
@pass_ctx
def compress(ctx: Context, adapter, out, base, finetuned, scales, scale_dtype, targets, distill_steps,
             distill_loss, lr, batch_size, seq_len, distill_data, device) -> None:
    """Compress a peft LoRA ADAPTER directory (lora1) or --finetuned against --base (dense) into --out."""
    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.bitdelta import compress_dense, compress_lora, distill, read_adapter, save_delta

    if (adapter is None) == (finetuned is None):
        raise ConfigError("pass either ADAPTER (lora1) or --finetuned DIR (dense)", hint="see ownlm compress -h")
    out_dir = _empty_out(out)
    mode = "lora1" if adapter else "dense"
    config = CompressConfig(mode=mode, scales=scales, scale_dtype=scale_dtype,
                            target_modules=tuple(t.strip() for t in targets.split(",")) if targets else None)
    dconfig = DistillConfig(steps=distill_steps, lr=lr, loss=distill_loss, batch_size=batch_size, seq_len=seq_len)
    settings = ctx.settings(base=base, device=device)
    b = None
    if mode == "lora1":
        lora = read_adapter(adapter)
        if distill_steps:
            b = _load_fp32(settings)
            sha = b.sha256
        else:
            sha = base_sha256(resolve_base(settings.base), settings.home)
        delta = compress_lora(lora, config, sha)
    else:
        b = _load_fp32(settings)
        ft = _load_checkpoint(finetuned, b.device.device)
        delta = compress_dense(b.model, ft, config, b.sha256)
    if distill_steps:
        if mode == "lora1":
            from peft import PeftModel

            ft = PeftModel.from_pretrained(copy.deepcopy(b.model), adapter).merge_and_unload().eval()
        with console.status(f"distilling scales ({distill_steps} steps)…", spinner="dots"):
            delta, report = distill(b.model, ft, delta, _batches(b, distill_data, dconfig), dconfig)
        console.print(f"scale distillation: {report.loss} {report.loss_before:.4g} -> {report.loss_after:.4g} "
                      f"({report.steps} steps, {report.seconds:.1f} s)")
    save_delta(delta, out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    console.print(f"{mode} delta: {len(delta.param_shapes)} parameters changed, payload {delta.nbytes:,} bytes, "
                  f"{size:,} bytes on disk ({size / 1000:.1f} KB) -> {out_dir}")


@cli.command()
@click.argument("delta_dir", metavar="DELTA", type=click.Path(exists=True, file_okay=False))
@pass_ctx
def inspect(ctx: Context, delta_dir: str) -> None:
    """Verify the delta in DELTA and show its size, mode, bits and per-module shapes and scales."""
    from ownlm.bitdelta import load_delta, read_metadata

    delta, meta = load_delta(delta_dir), read_metadata(delta_dir)
    size = sum(p.stat().st_size for p in Path(delta_dir).iterdir() if p.is_file())
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("mode", delta.mode)
    head.add_row("bits", str(delta.bits))
    head.add_row("scales", f"{delta.granularity} ({meta['scale_dtype']})")
    head.add_row("base sha256", delta.base_sha256)
    head.add_row("target modules", ", ".join(delta.target_modules))
    if delta.mode == "lora1":
        head.add_row("lora", f"r={delta.lora_r}, alpha={delta.lora_alpha:g}")
    head.add_row("payload", f"{delta.nbytes:,} bytes ({delta.nbytes / 1000:.1f} KB)")
    head.add_row("on disk", f"{size:,} bytes ({size / 1000:.1f} KB)")
    console.print(head)
    table = Table("tensor", "shape", "signs bytes", "scales", "scale min", "scale mean", "scale max")
    for key, q in delta.quantised.items():
        s = q.scales.float()
        table.add_row(key, "x".join(map(str, q.shape)), f"{q.packed.numel():,}", str(s.numel()),
                      f"{s.min():.3g}", f"{s.mean():.3g}", f"{s.max():.3g}")
    for key, t in delta.full.items():
        table.add_row(key, "x".join(map(str, t.shape)), "full precision", str(t.dtype).removeprefix("torch."),
                      "", f"|Δ| {t.abs().mean():.3g}", "")
    console.print(table)


@cli.command(name="apply")
@click.argument("delta_dir", metavar="DELTA", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="New directory for the merged checkpoint.")
@click.option("--base", metavar="PATH", help="Base model: 'embedded', a .gguf file or a checkpoint directory.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (default auto).")
@pass_ctx
def apply_cmd(ctx: Context, delta_dir: str, out: str, base: str | None, device: str | None) -> None:
    """Merge DELTA into the base and write the result as a safetensors checkpoint directory --out."""
    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.bitdelta import apply, load_delta

    out_dir = _empty_out(out)
    settings = ctx.settings(base=base, device=device)
    # Verify the delta (and that it is for this base) before spending time loading the model.
    delta = load_delta(delta_dir, expect_base_sha256=base_sha256(resolve_base(settings.base), settings.home))
    b = _load_fp32(settings)
    apply(b.model, delta, base_sha256=b.sha256)
    b.model.save_pretrained(out_dir, safe_serialization=True)
    b.tokenizer.save_pretrained(out_dir)
    console.print(f"merged {len(delta.param_shapes)} parameters of {delta.mode} delta into {b.source.name} -> {out_dir}")

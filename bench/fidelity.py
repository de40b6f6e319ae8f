"""Compression fidelity on the embedded model: how much of a persona LoRA survives 1 bit per weight?

Trains a LoRA r=8 on q/v of SmolLM2-135M on a persona's conversations (the persona fixtures shipped with
ownlm), then compares, on the persona's held-out conversations (split by conversation):

    fp32 LoRA | fp16 LoRA | lora1 (scales per matrix / rank / row / col) ± scale distillation |
    dense BitDelta of the merged fine-tune (q/v, scale per matrix) ± scale distillation

For each: bytes on disk, held-out assistant-token NLL, the share of the fp32 LoRA's NLL gain over the base
that survives ("kept gain"), and KL(fine-tuned || compressed) on the held-out conversations. Distillation
follows the paper (signs frozen, scales trained with Adam on logit MSE) on the user's own training prompts.
Goals: the default personal artifact (delta files + manifest) <= 64 KB, keeping >= 95% of the gain.

    .venv/bin/python bench/fidelity.py [--persona bram] [--steps 40] [--distill-steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import added, persona_conversations  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import (  # noqa: E402
    CompressConfig, DistillConfig, compress_dense, compress_lora, distill, load_delta, read_adapter, save_delta, weight_deltas,
)
from ownlm.bitdelta.distill import text_batches  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, kept_gain, kl_drift  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402


def lora_deltas(adapter_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dense fp32 deltas s * B @ A from the adapter's factors, rounded to `dtype` first (fp16 LoRA)."""
    ad = read_adapter(adapter_dir)
    s = ad.alpha / ad.r
    return {f"{p}.weight": s * (b.to(dtype).float() @ a.to(dtype).float()) for p, (a, b) in ad.factors.items()}


def signed_manifest_bytes(delta_dir: Path, report, base) -> int:
    """Size of the manifest the node would install with this delta (built and signed as the loop does)."""
    from ownlm.artifact.manifest import build_manifest, canonical
    from ownlm.artifact.sign import generate, sign_manifest
    from ownlm.bitdelta.format import METADATA, TENSORS, read_metadata

    files = {n: (delta_dir / n).read_bytes() for n in (TENSORS, METADATA)}
    manifest = build_manifest(user="bench", base_name=base.source.name, base_sha256=base.sha256, files=files,
                              delta_meta=read_metadata(delta_dir), training=json.loads(report.to_json()),
                              merkle_root="0" * 64, version=1, previous=None)
    return len(canonical(sign_manifest(manifest, generate())))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--persona", default="bram")
    ap.add_argument("--steps", type=int, default=40, help="LoRA training steps (1,024-token batches)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distill-steps", type=int, default=30)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    settings = load_settings(home=args.home)
    base = load_base(settings)
    tok = base.tokenizer
    conversations = persona_conversations(args.persona)
    built = build(conversations, {}, tok, DatasetConfig(heldout_fraction=0.15))
    train_ex, held = tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)
    print(f"persona {args.persona}: {len(train_ex)} training / {len(held)} held-out examples; "
          f"{sum(len(e) for e in train_ex):,} training tokens")
    work = Path(tempfile.mkdtemp())
    report = train(base, train_ex, held, TrainConfig(max_steps=args.steps, lr=args.lr), work / "train")
    print(f"trained {report.steps} steps in {report.duration_s:.0f} s ({report.tokens_per_s:.0f} tokens/s)")
    adapter = work / "train" / "adapter"
    model = base.model
    nll_base = assistant_nll(model, held).mean_nll
    fp32 = lora_deltas(adapter, torch.float32)
    with added(model, fp32):
        nll_lora = assistant_nll(model, held).mean_nll

    # the teacher: a second copy with the fp32 LoRA merged (for KL and distillation)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(base.model.name_or_path), dtype=torch.float32).eval()
    with torch.no_grad():
        tp = dict(teacher.named_parameters())
        for n, d in fp32.items():
            tp[n].add_(d)
    prompts = [t for e in train_ex for t in e.input_ids]
    dcfg = DistillConfig(steps=args.distill_steps, lr=1e-4)
    rows = []

    def measure(name: str, deltas: dict[str, torch.Tensor], nbytes: int, note: str = "") -> None:
        with added(model, deltas):
            nll = assistant_nll(model, held).mean_nll
            kl = kl_drift(teacher, model, held, max_positions=1024)
        rows.append({"variant": name, "bytes": nbytes, "heldout_nll": nll, "kept_gain": kept_gain(nll_base, nll_lora, nll),
                     "kl_finetuned_compressed": kl, "note": note})
        print(f"  {name:<34} {nbytes:>10,} B  NLL {nll:.4f}  kept {rows[-1]['kept_gain'] or 0:7.1%}  KL {kl:.5f}")

    print(f"held-out NLL: base {nll_base:.4f}, fp32 LoRA {nll_lora:.4f} (gain {nll_base - nll_lora:.4f} nats/token)")
    measure("fp32 LoRA (adapter file)", fp32, (adapter / "adapter_model.safetensors").stat().st_size)
    fp16 = lora_deltas(adapter, torch.float16)
    measure("fp16 LoRA", fp16, (adapter / "adapter_model.safetensors").stat().st_size // 2)
    for gran in ("matrix", "rank", "row", "col"):
        delta = compress_lora(read_adapter(adapter), CompressConfig(mode="lora1", scales=gran), base.sha256)
        d = save_delta(delta, work / f"lora1-{gran}")
        measure(f"lora1 scales={gran}", weight_deltas(delta), dir_bytes(d), "default" if gran == "matrix" else "")
        if gran in ("rank", "matrix") and args.distill_steps:
            distilled, rep = distill(model, teacher, delta, text_batches(prompts, dcfg), dcfg)
            d = save_delta(distilled, work / f"lora1-{gran}-distilled")
            measure(f"lora1 scales={gran} + distill", weight_deltas(distilled), dir_bytes(d),
                    f"logit MSE {rep.loss_before:.4g} -> {rep.loss_after:.4g}")
    dense = compress_dense(model, teacher, CompressConfig(mode="dense", target_modules=("q_proj", "v_proj")), base.sha256)
    d = save_delta(dense, work / "dense")
    measure("dense BitDelta q/v (paper)", weight_deltas(dense), dir_bytes(d))
    if args.distill_steps:
        distilled, rep = distill(model, teacher, dense, text_batches(prompts, dcfg), dcfg)
        d = save_delta(distilled, work / "dense-distilled")
        measure("dense BitDelta q/v + distill", weight_deltas(distilled), dir_bytes(d),
                f"logit MSE {rep.loss_before:.4g} -> {rep.loss_after:.4g}")
    default = next(r for r in rows if r["variant"] == "lora1 scales=matrix")
    manifest_bytes = signed_manifest_bytes(work / "lora1-matrix", report, base)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)  # adapters, deltas and stores of the run
    print(f"goal 1 (default artifact <= 64 KB): delta {default['bytes']:,} B + signed manifest {manifest_bytes:,} B -> "
          f"{'met' if default['bytes'] + manifest_bytes <= 64_000 else 'NOT met'}")
    best = max((r for r in rows if r["variant"].startswith("lora1")), key=lambda r: r["kept_gain"] or 0)
    print(f"goal 2 (>= 95% of the gain kept at 1 bit): default keeps {default['kept_gain'] or 0:.1%}, best 1-bit "
          f"lora1 variant ({best['variant']}) {best['kept_gain'] or 0:.1%} -> "
          f"{'met' if (default['kept_gain'] or 0) >= 0.95 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"nll_base": nll_base, "nll_lora": nll_lora, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

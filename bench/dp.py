"""Utility vs privacy: the personal adapter trained with DP-SGD (learn/dp.py) at several epsilons, one persona.

Arms, same persona, data split, steps and learning rate on the embedded model: no DP (the project's usual
length-grouped batches), then DP-SGD with Poisson sampling of conversations and per-conversation clipping at
each epsilon in --epsilons ('inf' = clipping and sampling without noise, which isolates the noise's cost).
Each row: held-out assistant NLL of the trained model (QAT by default: the model evaluated is the 1-bit
artifact), the epsilon spent, noise multiplier, steps, training seconds; with --probes the persona's unseen
style and fact probes (greedy, 95% Wilson intervals), which cost ~2 minutes per arm on 2 cores.

    OWNLM_HOME=... .venv/bin/python bench/dp.py [--persona bram] [--steps 16] [--epsilons inf,8,2] [--lr 2e-3]
        [--dp-batch 8] [--clip 1.0] [--no-qat] [--probes] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, persona_conversations, probe_row  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta  # noqa: E402
from ownlm.engine import TorchEngine  # noqa: E402
from ownlm.evaluate.metrics import delta_applied  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--persona", default="bram")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--epsilons", default="inf,8,2", help="comma-separated; 'inf' = DP-SGD without noise")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dp-batch", type=int, default=8, help="expected conversations per DP step")
    ap.add_argument("--clip", type=float, default=1.0, help="per-conversation gradient clip norm")
    ap.add_argument("--no-qat", action="store_true", help="fp32 LoRA instead of quantization-aware 1-bit factors")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-DP arm (already measured, same data and steps)")
    ap.add_argument("--probes", action="store_true", help="also run the persona's style and fact probes per arm")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home))
    tok = base.tokenizer
    engine = TorchEngine(base) if args.probes else None
    built = build(persona_conversations(args.persona), {}, tok, DatasetConfig(heldout_fraction=0.15))
    train_ex, held = tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)
    asked = probes(PERSONAS[args.persona]) if args.probes else None
    conversations = len({e.conversation_id for e in train_ex})
    print(f"{args.persona}: {len(train_ex)} training examples from {conversations} conversations, {len(held)} held out; "
          f"{args.steps} steps at lr {args.lr}, {'fp32' if args.no_qat else 'QAT'} LoRA r={TrainConfig().r} on "
          f"{'/'.join(TrainConfig().target_modules)}")
    arms = ([] if args.no_baseline else [("no DP", None)]) + [(f"DP ε={e}", math.inf if e == "inf" else float(e)) for e in args.epsilons.split(",")]
    rows, work = [], Path(tempfile.mkdtemp(prefix="ownlm-dp-"))
    try:
        if args.probes:
            print(f"  base probes: {fmt(probe_row(engine, asked))}", flush=True)
        for label, eps in arms:
            cfg = dict(max_steps=args.steps, epochs=100, lr=args.lr, qat=not args.no_qat)
            if eps is not None:
                cfg.update(dp=True, dp_batch_size=args.dp_batch, dp_max_grad_norm=args.clip,
                           **({"dp_noise_multiplier": 0.0} if math.isinf(eps) else {"dp_epsilon": eps}))
            out = work / label.replace(" ", "_")
            report = train(base, train_ex, held, TrainConfig(**cfg), out)
            row = {"arm": label, "steps": report.steps, "train_seconds": report.duration_s,
                   "heldout_nll_base": report.heldout_loss_base, "heldout_nll": report.heldout_loss_personal,
                   "dp": report.dp}
            if args.probes:
                delta = compress_lora(read_adapter(out / "adapter"), CompressConfig(mode="lora1"), base.sha256)
                save_delta(delta, out / "delta")
                with delta_applied(base.model, delta, base.sha256):
                    row["probes"] = probe_row(engine, asked)
            rows.append(row)
            b = report.dp or {}
            spent = "" if not b else (f"; ε spent {'∞' if b['epsilon'] is None else format(b['epsilon'], '.2f')}, "
                                      f"δ {b['delta']:.0e}, noise ×{b['noise_multiplier']:.2f}, q {b['sample_rate']:.3f}")
            print(f"  {label:10s} held-out NLL {report.heldout_loss_base:.4f} → {report.heldout_loss_personal:.4f} "
                  f"({report.steps} steps, {report.duration_s:.0f} s{spent})"
                  + (f"; probes {fmt(row['probes'])}" if args.probes else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Quantization-aware vs post-hoc 1-bit LoRA on the embedded model: does the served artifact keep what training learned?

For each persona fixture, two LoRA runs of the same layout (r=8 on q/v), data, steps and learning rate:
an fp32 LoRA (then compressed post hoc to lora1, as the loop did before QAT) and a quantization-aware LoRA
(learn/qat.py, TrainConfig.qat). On the persona's held-out conversations and its unseen probe questions
(greedy, 96 tokens: PROBE_TOKENS): held-out assistant NLL and the share of the fp32 LoRA's gain kept, style and fact probes
passed with 95% Wilson intervals, for base / fp32 LoRA / post-hoc lora1 / QAT artifact, plus training seconds
and the artifact's bytes.

    OWNLM_HOME=... .venv/bin/python bench/qat.py [--personas bram] [--steps 64] [--epochs 1] [--lr 2e-3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, probe_row, added, persona_conversations  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta  # noqa: E402
from ownlm.engine import TorchEngine  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, delta_applied, kept_gain  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="bram")
    ap.add_argument("--steps", type=int, default=64, help="optimizer steps per run at most (1,024-token batches)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training data at most (the runs stop at "
                    "whichever of --steps and --epochs comes first; the row records the steps taken)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home))
    tok, engine, rows = base.tokenizer, TorchEngine(base), []
    work = Path(tempfile.mkdtemp(prefix="ownlm-qat-"))
    try:
        for name in args.personas.split(","):
            built = build(persona_conversations(name), {}, tok, DatasetConfig(heldout_fraction=0.15))
            train_ex, held = tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)
            asked = probes(PERSONAS[name])
            row = {"persona": name, "train_examples": len(train_ex), "heldout_examples": len(held),
                   "steps": args.steps, "lr": args.lr, "probes": {"base": probe_row(engine, asked)}}
            nll_base = assistant_nll(base.model, held).mean_nll
            row["nll"] = {"base": nll_base}
            for arm, qat in (("fp32", False), ("qat", True)):
                report = train(base, train_ex, held, TrainConfig(max_steps=args.steps, epochs=args.epochs, lr=args.lr, qat=qat),
                               work / name / arm)
                row[f"train_seconds_{arm}"], row["steps"] = report.duration_s, report.steps
                adapter = read_adapter(work / name / arm / "adapter")
                delta = compress_lora(adapter, CompressConfig(mode="lora1"), base.sha256)
                save_delta(delta, work / name / arm / "delta")
                row[f"artifact_bytes_{arm}"] = sum(f.stat().st_size for f in (work / name / arm / "delta").iterdir())
                label = "lora1 post hoc" if arm == "fp32" else "qat artifact"
                if arm == "fp32":
                    with added(base.model, adapter.weight_deltas()):
                        row["nll"]["fp32 lora"] = assistant_nll(base.model, held).mean_nll
                        row["probes"]["fp32 lora"] = probe_row(engine, asked)
                with delta_applied(base.model, delta, base.sha256):
                    row["nll"][label] = assistant_nll(base.model, held).mean_nll
                    row["probes"][label] = probe_row(engine, asked)
            for label in ("lora1 post hoc", "qat artifact"):
                row.setdefault("kept_gain", {})[label] = kept_gain(nll_base, row["nll"]["fp32 lora"], row["nll"][label])
            rows.append(row)
            print(f"\n{name}: {len(train_ex)} training / {len(held)} held-out examples, {row['steps']} steps at lr {args.lr}; "
                  f"training {row['train_seconds_fp32']:.0f} s (fp32) / {row['train_seconds_qat']:.0f} s (QAT)")
            for label, nll in row["nll"].items():
                kg = row.get("kept_gain", {}).get(label)
                print(f"  {label:15s} held-out NLL {nll:.4f}{f' (kept gain {kg:.0%})' if kg is not None else ''}; "
                      f"probes {fmt(row['probes'][label])}", flush=True)
            print(f"  artifact bytes: post hoc {row['artifact_bytes_fp32']:,}, QAT {row['artifact_bytes_qat']:,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

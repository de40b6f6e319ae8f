"""Does a merge keep both? Two personas' models merged with peft's methods (ownlm merge), each persona's probes on each.

One training round per persona (the loop's recipe from the node's settings — r=1 on all seven linear layers,
quantization-aware, lr 1e-3, KL anchor, 3 question variants — or `--recipe`; `--steps` optimizer steps) gives models A and B; they are merged by node/merge.py (the code `ownlm merge` runs:
peft's add_weighted_adapter, lora1 recompression, scale distillation) with linear, ties and dare_ties (equal
weights; density `--density`). For the base, A alone, B alone and each merge, on each persona: held-out assistant
NLL and the persona's unseen style and fact probes (greedy, evaluate.metrics.PROBE_TOKENS tokens; 95% Wilson
intervals), plus the merged artifact's bytes and the merge's seconds.

    OWNLM_HOME=... .venv/bin/python bench/merge.py [--personas bram,mira] [--steps 48] [--recipe NAME] [--methods linear,ties,dare_ties]
        [--density 0.5] [--distill-steps 8] [--adapters DIR] [--resume FILE] [--probe-order LABELS] [--json FILE]

Held-out NLL of every row is measured first (seconds), then the probes (greedy generation, the slow part: about
25 minutes per row on 2 busy cores), so an interrupted run keeps its NLL table; `--adapters` keeps the trained
adapters and `--resume` the probed rows for a second run.
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
from common import fmt, persona_conversations, probe_row  # noqa: E402
from recipe import parse_recipe  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter  # noqa: E402
from ownlm.engine import TorchEngine  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, delta_applied  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.node.merge import NEEDS_DENSITY, MergeConfig, merge_deltas  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="bram,mira", help="exactly two persona fixtures: A,B")
    ap.add_argument("--steps", type=int, default=48, help="training steps per persona (the loop's default: 48)")
    ap.add_argument("--recipe", help="a bench/recipe.py name, e.g. qv-r8-lr1e-3-s48-qat (default: the loop's own round)")
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--density", type=float, default=0.5, help="for ties / dare methods")
    ap.add_argument("--distill-steps", type=int, default=8)
    ap.add_argument("--adapters", type=Path, help="directory of the trained adapters (<persona>/): reused if there, "
                    "else trained and kept there")
    ap.add_argument("--resume", type=Path, help="rows of an earlier run (its --json): their probes are not measured again")
    ap.add_argument("--probe-order", help="comma-separated model labels to probe first (default: table order)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    names = args.personas.split(",")
    if len(names) != 2:
        sys.exit("--personas takes two names, A,B")
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home, device="cpu"))
    tok, engine = base.tokenizer, TorchEngine(base)
    if args.recipe:
        cfg = parse_recipe(args.recipe)
    else:  # the loop's round (loop.run_job's TrainConfig from the node's settings), `--steps` steps
        p = load_settings(home=args.home).personalization
        cfg = TrainConfig(lr=p.lr, epochs=p.epochs, max_steps=args.steps, qat=p.qat, anchor_kl=p.anchor_kl)
    print(f"training: r={cfg.r} on {'/'.join(cfg.target_modules)}, lr {cfg.lr}, {cfg.max_steps} steps, "
          f"{'QAT' if cfg.qat else 'fp32'}, anchor_kl {cfg.anchor_kl}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ownlm-bench-merge-"))
    adapters = args.adapters or work
    held, asked, deltas = {}, {}, {}
    done = {r["model"]: r for r in json.loads(args.resume.read_text())} if args.resume else {}
    try:
        for name in names:
            built = build(persona_conversations(name), {}, tok, DatasetConfig(heldout_fraction=0.15, paraphrases=3))
            train_ex, held[name] = tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)
            asked[name] = probes(PERSONAS[name])
            if not (adapters / name / "adapter_config.json").is_file():
                report = train(base, train_ex, held[name], cfg, work / name)
                shutil.copytree(work / name / "adapter", adapters / name, dirs_exist_ok=True)
                print(f"trained {name}: {len(train_ex)} examples, {report.steps} steps, {report.duration_s:.0f} s", flush=True)
            deltas[name] = compress_lora(read_adapter(adapters / name), CompressConfig(mode="lora1"), base.sha256)

        models = {"base": (None, {}), f"A={names[0]}": (deltas[names[0]], {}), f"B={names[1]}": (deltas[names[1]], {})}
        for method in args.methods.split(","):
            mc = MergeConfig(method=method, density=args.density if method in NEEDS_DENSITY else None,
                             distill_steps=args.distill_steps)
            merged = merge_deltas(base, [deltas[names[0]], deltas[names[1]]], mc)
            models[method] = (merged.delta, {k: merged.report[k] for k in ("payload_bytes", "seconds", "distill")})
            print(f"merged {method}: {merged.report['payload_bytes']:,} B payload, {merged.report['seconds']:.0f} s, "
                  f"distillation {merged.report['distill']}", flush=True)
        rows = {label: {"model": label, **extra, **{n: {"nll": None, "probes": None} for n in names}}
                for label, (_, extra) in models.items()}
        for label, row in done.items():
            if label in rows:
                for n in names:
                    rows[label][n]["probes"] = (row.get(n) or {}).get("probes")

        def save() -> None:
            if args.json:
                args.json.write_text(json.dumps(list(rows.values()), indent=1))

        def show(label: str) -> None:
            row = rows[label]
            print(f"{label:10s} " + " | ".join(
                f"{n}: NLL {row[n]['nll']:.4f}" + (f", {fmt(row[n]['probes'])}" if row[n]["probes"] else "") for n in names)
                  + (f" | {row['payload_bytes']:,} B" if "payload_bytes" in row else ""), flush=True)

        # 1. held-out NLL of every model on both personas (cheap), 2. the probes (greedy generation: the slow part)
        for label, (delta, _) in models.items():
            for n in names:
                if delta is None:
                    rows[label][n]["nll"] = assistant_nll(base.model, held[n]).mean_nll
                else:
                    with delta_applied(base.model, delta, base.sha256):
                        rows[label][n]["nll"] = assistant_nll(base.model, held[n]).mean_nll
            show(label)
            save()
        order = args.probe_order.split(",") if args.probe_order else []
        for label in order + [m for m in models if m not in order]:
            delta = models[label][0]
            for n in names:
                if rows[label][n]["probes"] is not None:
                    continue
                if delta is None:
                    rows[label][n]["probes"] = probe_row(engine, asked[n])
                else:
                    with delta_applied(base.model, delta, base.sha256):
                        rows[label][n]["probes"] = probe_row(engine, asked[n])
                save()
            print("probed " + label + ": " + " | ".join(f"{n}: {fmt(rows[label][n]['probes'])}" for n in names), flush=True)
        print("\nall rows:")
        for label in models:
            show(label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"whole run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

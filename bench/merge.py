"""Does a merge keep both? Two personas' models merged with peft's methods (ownlm merge), each persona's probes on each.

One training round per persona (the loop's recipe: q/v r=8, quantization-aware, lr 1e-3, 3 question variants;
`--steps` optimizer steps) gives models A and B; they are merged by node/merge.py (the code `ownlm merge` runs:
peft's add_weighted_adapter, lora1 recompression, scale distillation) with linear, ties and dare_ties (equal
weights; density `--density`). For the base, A alone, B alone and each merge, on each persona: held-out assistant
NLL and the persona's unseen style and fact probes (greedy, evaluate.metrics.PROBE_TOKENS tokens; 95% Wilson
intervals), plus the merged artifact's bytes and the merge's seconds.

    OWNLM_HOME=... .venv/bin/python bench/merge.py [--personas bram,mira] [--steps 24] [--methods linear,ties,dare_ties]
        [--density 0.5] [--distill-steps 32] [--json FILE]
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
from ownlm.learn.train import train  # noqa: E402
from ownlm.node.merge import NEEDS_DENSITY, MergeConfig, merge_deltas  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="bram,mira", help="exactly two persona fixtures: A,B")
    ap.add_argument("--steps", type=int, default=48, help="training steps per persona (the loop's default: 48)")
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--density", type=float, default=0.5, help="for ties / dare methods")
    ap.add_argument("--distill-steps", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    names = args.personas.split(",")
    if len(names) != 2:
        sys.exit("--personas takes two names, A,B")
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home, device="cpu"))
    tok, engine = base.tokenizer, TorchEngine(base)
    cfg = parse_recipe(f"qv-r8-lr1e-3-s{args.steps}-qat")
    work = Path(tempfile.mkdtemp(prefix="ownlm-bench-merge-"))
    held, asked, deltas, rows = {}, {}, {}, []
    try:
        for name in names:
            built = build(persona_conversations(name), {}, tok, DatasetConfig(heldout_fraction=0.15, paraphrases=3))
            train_ex, held[name] = tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)
            asked[name] = probes(PERSONAS[name])
            report = train(base, train_ex, held[name], cfg, work / name)
            deltas[name] = compress_lora(read_adapter(work / name / "adapter"), CompressConfig(mode="lora1"), base.sha256)
            print(f"trained {name}: {len(train_ex)} examples, {report.steps} steps, {report.duration_s:.0f} s", flush=True)

        def measure(label: str, delta, extra: dict | None = None) -> None:
            row = {"model": label, **(extra or {})}
            for name in names:
                if delta is None:
                    nll, probed = assistant_nll(base.model, held[name]).mean_nll, probe_row(engine, asked[name])
                else:
                    with delta_applied(base.model, delta, base.sha256):
                        nll, probed = assistant_nll(base.model, held[name]).mean_nll, probe_row(engine, asked[name])
                row[name] = {"nll": nll, "probes": probed}
            rows.append(row)
            print(f"{label:10s} " + " | ".join(f"{n}: NLL {row[n]['nll']:.4f}, {fmt(row[n]['probes'])}" for n in names)
                  + (f" | {extra['payload_bytes']:,} B, merge {extra['seconds']:.0f} s" if extra else ""), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))

        measure("base", None)
        measure(f"A={names[0]}", deltas[names[0]])
        measure(f"B={names[1]}", deltas[names[1]])
        for method in args.methods.split(","):
            mc = MergeConfig(method=method, density=args.density if method in NEEDS_DENSITY else None,
                             distill_steps=args.distill_steps)
            merged = merge_deltas(base, [deltas[names[0]], deltas[names[1]]], mc)
            measure(method, merged.delta, {"payload_bytes": merged.report["payload_bytes"], "seconds": merged.report["seconds"],
                                           "distill": merged.report["distill"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"whole run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

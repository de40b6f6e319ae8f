"""Which training recipe makes the served 1-bit artifact behave like its person, within 64 KB of delta?

For each persona fixture and each recipe (target modules, rank, learning rate, optimizer steps, fp32 LoRA
compressed post hoc or quantization-aware training), one training run with the project's train() on the same
data, then the *served* artifact (lora1) is measured exactly as the loop's quality gate and `ownlm eval` do:
held-out assistant NLL, drift KL(base || personal) on the gate's Dolly prompts (bound 0.25 nats/token), and
the persona's unseen probe questions (greedy, 96 tokens: PROBE_TOKENS), style and fact separately with 95% Wilson intervals;
ARC-Easy (100 items), training seconds and the artifact's bytes. As a diagnostic, drift is also measured from
the 4th answer token on, to show how much of it a persona's opening accounts for. Recipes are named
`<modules>-r<rank>-lr<lr>-s<steps>[-qat][-p<N>]` (-pN: N question variants per training example, learn/augment.py;
without it, no augmentation but the context variants).

    OWNLM_HOME=... .venv/bin/python bench/recipe.py [--personas bram,mira,chiara] [--recipes NAME,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, probe_row, persona_conversations  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta  # noqa: E402
from ownlm.engine import TorchEngine  # noqa: E402
from ownlm.evaluate.gate import DRIFT_POSITIONS, DRIFT_PROMPTS  # noqa: E402
from ownlm.evaluate.general import dolly_examples  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, delta_applied, kl_drift  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.evaluate.general import mc_items, multiple_choice_accuracy  # noqa: E402
from ownlm.learn.tokens import IGNORE, TokenizedExample  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402

MODULES = {
    "qv": ["q_proj", "v_proj"],
    "all7": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
DEFAULT_RECIPES = ("qv-r8-lr1e-3-s48-qat-p3,qv-r8-lr1e-3-s48-qat,qv-r8-lr1e-3-s48-p3,qv-r8-lr5e-4-s48-qat-p3,"
                   "all7-r1-lr1e-3-s48-qat-p3,mlp-r2-lr1e-3-s48-qat-p3")  # the first is the loop's default


def parse_recipe(name: str) -> TrainConfig:
    """'all7-r1-lr1e-3-s32-qat-ul1-kl0.5' -> the TrainConfig it names (alpha = 2r, as the default q/v r8 alpha 16).

    Optional suffixes, in this order: -qat (quantization-aware), -ul<w> (token unlikelihood weight), -kl<w>
    (KL-to-base anchor weight), -p<N> (question variants, see paraphrases_of)."""
    m = re.fullmatch(r"(\w+)-r(\d+)-lr([0-9.e-]+?)-s(\d+)(-qat)?(?:-ul([0-9.]+))?(?:-kl([0-9.]+))?(?:-p\d+)?", name)
    if not m or m[1] not in MODULES:
        sys.exit(f"bad recipe {name!r}: use <{'|'.join(MODULES)}>-r<rank>-lr<lr>-s<steps>[-qat][-ul<w>][-kl<w>][-p<N>]")
    r = int(m[2])
    return TrainConfig(target_modules=MODULES[m[1]], r=r, alpha=2 * r, lr=float(m[3]), max_steps=int(m[4]), epochs=20,
                       qat=m[5] is not None, unlikelihood=float(m[6] or 0), anchor_kl=float(m[7] or 0))


def paraphrases_of(name: str) -> int:
    """'...-p3' -> 3 question variants per training example (DatasetConfig.paraphrases); none: 0 (off)."""
    m = re.search(r"-p(\d+)$", name)
    return int(m[1]) if m else 0


def after_opening(examples, skip: int = 3):
    """The drift prompts scored only from the `skip`-th answer token on: how much of the drift is the opening."""
    out = []
    for e in examples:
        targets = [t for t, x in enumerate(e.labels) if x != IGNORE]
        labels = [IGNORE if t in targets[:skip] else x for t, x in enumerate(e.labels)]
        out.append(TokenizedExample(e.input_ids, labels))
    return out




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="bram,mira,chiara")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--penalty", type=float, default=None,
                    help="also probe with this repetition penalty (the node's settings.repetition_penalty; 1 = plain greedy)")
    ap.add_argument("--no-plain", action="store_true",
                    help="with --penalty: probe only with the penalty (as the node serves), not plain greedy too")
    args = ap.parse_args()
    if args.no_plain and not args.penalty:
        sys.exit("--no-plain needs --penalty")
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home))
    tok, engine, rows = base.tokenizer, TorchEngine(base), []
    drift_prompts = dolly_examples(tok, n=DRIFT_PROMPTS)
    drift_late = after_opening(drift_prompts)
    arc = mc_items("arc_easy", 100)
    arc_base = multiple_choice_accuracy(base.model, tok, arc)
    print(f"base ARC-Easy {arc_base:.0%} (100 items)", flush=True)
    built_for: dict = {}
    work = Path(tempfile.mkdtemp(prefix="ownlm-recipe-"))
    try:
        for name in args.personas.split(","):
            def data(n_para: int):
                if n_para not in built_for:
                    built = build(persona_conversations(name), {}, tok, DatasetConfig(heldout_fraction=0.15, paraphrases=n_para))
                    built_for[n_para] = (tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok))
                return built_for[n_para]

            built_for.clear()
            train_ex, held = data(0)
            asked = probes(PERSONAS[name])
            nll_base = assistant_nll(base.model, held).mean_nll
            print(f"\n{name}: {len(train_ex)} training / {len(held)} held-out examples; base NLL {nll_base:.4f}, "
                  + ("" if args.no_plain else f"probes {fmt(probe_row(engine, asked))}")
                  + (f" (penalty {args.penalty:g}: {fmt(probe_row(engine, asked, repetition_penalty=args.penalty))})"
                     if args.penalty else ""), flush=True)
            for recipe in args.recipes.split(","):
                cfg = parse_recipe(recipe)
                out = work / name / recipe
                recipe_train, _ = data(paraphrases_of(recipe))
                report = train(base, recipe_train, held, cfg, out)
                delta = compress_lora(read_adapter(out / "adapter"), CompressConfig(mode="lora1"), base.sha256)
                save_delta(delta, out / "delta")
                with delta_applied(base.model, delta, base.sha256):
                    nll = assistant_nll(base.model, held).mean_nll
                    probed = None if args.no_plain else probe_row(engine, asked)
                    penalised = probe_row(engine, asked, repetition_penalty=args.penalty) if args.penalty else None
                    arc_p = multiple_choice_accuracy(base.model, tok, arc)
                drift = kl_drift(base.model, delta, drift_prompts, max_positions=DRIFT_POSITIONS, base_sha256=base.sha256)
                late = kl_drift(base.model, delta, drift_late, max_positions=DRIFT_POSITIONS, base_sha256=base.sha256)
                row = {"persona": name, "recipe": recipe, "steps": report.steps, "train_seconds": report.duration_s,
                       "nll_base": nll_base, "nll_lora": report.heldout_loss_personal, "nll_served": nll,
                       "kl_drift": drift, "kl_drift_after_opening": late, "arc_easy_base": arc_base,
                       "arc_easy": arc_p, "train_examples": len(recipe_train), "probes": probed,
                       "probes_penalised": penalised, "repetition_penalty": args.penalty,
                       "artifact_bytes": sum(f.stat().st_size for f in (out / "delta").iterdir())}
                rows.append(row)
                print(f"  {recipe:24s} NLL {nll:.4f} (LoRA {report.heldout_loss_personal:.4f}); drift {drift:.3f} ({late:.3f} after the opening); "
                      f"ARC-Easy {arc_p:.0%}; "
                      + (f"probes {fmt(probed)}" if probed else "")
                      + (f" (repetition penalty {args.penalty:g}: {fmt(penalised)})" if penalised else "")
                      + f"; {row['artifact_bytes']:,} B; {report.duration_s:.0f} s, "
                      f"{report.steps} steps", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                if args.json:  # partial results survive an interrupted sweep
                    args.json.write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s")
    for recipe in args.recipes.split(","):
        mine = [r for r in rows if r["recipe"] == recipe]
        kind = "probes_penalised" if args.no_plain else "probes"
        tot = {k: [sum(r[kind][k]["passed"] for r in mine), sum(r[kind][k]["total"] for r in mine)]
               for k in ("style", "fact")}
        print(f"{recipe:24s} style {tot['style'][0]}/{tot['style'][1]}, fact {tot['fact'][0]}/{tot['fact'][1]}, "
              f"max drift {max(r['kl_drift'] for r in mine):.3f}")


if __name__ == "__main__":
    main()

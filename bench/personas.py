"""Eval scores on the three persona fixtures: one learning round each, then `ownlm eval`'s measurements.

One node (a fresh home; the converted base model is shared with --home's cache) with three users — mira, bram
and chiara, each with their shipped history of 300 conversations. For each, one round of the real loop
(dataset, LoRA, BitDelta, quality gate, signed bundle, install) with a fixed number of steps. The round's gate
measures, with the eval library `ownlm eval` uses: held-out assistant NLL of base, LoRA and the served 1-bit
model, the personalization score (relative NLL reduction of the served model), drift KL(base || personal) on
Dolly prompts (checked against the gate's bound). Then, on the installed 1-bit model: the share of unseen probe
questions passed (greedy, batched), general ability (WikiText-2 perplexity, ARC-Easy accuracy), artifact size.
Speed is bench/serve_overhead.py's job.

    .venv/bin/python bench/personas.py [--steps 32] [--lr 1e-3] [--personas mira,bram,chiara] [--json FILE]
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
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import load_delta  # noqa: E402
from ownlm.engine.torch_engine import TorchEngine  # noqa: E402
from ownlm.evaluate.general import general_perplexity, mc_items, multiple_choice_accuracy  # noqa: E402
from ownlm.evaluate.metrics import behaviour_score, delta_applied  # noqa: E402
from ownlm.loop import run_job  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR, PERSONAS, probes  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402


def general(base, n_arc: int = 100) -> dict:
    """General ability as `ownlm eval` measures it: WikiText-2 perplexity (8 blocks), ARC-Easy accuracy."""
    return {"wikitext_ppl": general_perplexity(base.model, base.tokenizer, max_blocks=8).perplexity,
            "arc_easy": multiple_choice_accuracy(base.model, base.tokenizer, mc_items("arc_easy", n_arc))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home whose cache/ holds the converted base (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="mira,bram,chiara")
    ap.add_argument("--steps", type=int, default=32, help="training steps per round (make demo does 32 in 150 s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (as make demo)")
    ap.add_argument("--quick", action="store_true", help="skip WikiText-2 and ARC-Easy")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    shared = load_settings(home=args.home)
    (shared.home / "cache").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="ownlm-personas-"))
    (home / "cache").symlink_to((shared.home / "cache").resolve(), target_is_directory=True)
    settings = load_settings(home=str(home))
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(
        update={"max_steps": args.steps, "lr": args.lr, "continual": "retrain"})})
    gate_kl = settings.personalization.gate_max_kl
    results = []
    base = load_base(settings)
    plain = TorchEngine(base)
    with Store(home) as store:
        for name in args.personas.split(","):
            if name not in PERSONAS:
                sys.exit(f"unknown persona {name!r}; choose from {sorted(PERSONAS)}")
            user = store.create_user(name)
            history = DATA_DIR / f"{name}.jsonl"
            import_into(store, user.id, parse_file(history), history.name)
            t1 = time.perf_counter()
            job = run_job(store, settings, store.enqueue_job(user.id, "bench/personas.py"))
            r = job["result"] or {}
            print(f"{name}: round {job['state']} in {time.perf_counter() - t1:.0f} s ({r.get('steps')} steps, "
                  f"{r.get('train_seconds', 0):.0f} s training): {job['reason']}", flush=True)
            if job["state"] != "deployed":
                results.append({"persona": name, "state": job["state"], "reason": job["reason"]})
                continue
            # The round's gate measured held-out NLL (base, LoRA, served 1-bit model) and drift with the eval
            # library (ownlm.evaluate.metrics); probes and general ability are measured here with the same library.
            model = store.active_model(user.id)
            delta = load_delta(model["path"], expect_base_sha256=base.sha256)
            asked = probes(PERSONAS[name])
            t2 = time.perf_counter()
            pb = behaviour_score(plain, asked, max_tokens=48)
            with delta_applied(base.model, delta, base.sha256):
                pp = behaviour_score(plain, asked, max_tokens=48)
                general_p = None if args.quick else general(base)
            general_b = None if args.quick else general(base)
            row = {
                "persona": name, "state": "deployed", "train_examples": r["train_examples"],
                "heldout_examples": r["heldout_examples"], "steps": r["steps"], "train_seconds": r["train_seconds"],
                "nll_base": r["heldout_loss_base"], "nll_lora": r["heldout_loss_lora"],
                "nll_personal": r["heldout_loss_compressed"], "personalization_score": r["personalization_score"],
                "kept_gain": r["fidelity"], "kl_drift": r["kl_drift"], "gate_max_kl": gate_kl,
                "probes": len(asked), "probes_base": pb["pass_rate"], "probes_personal": pp["pass_rate"],
                "probes_by_kind": {"base": pb["by_kind"], "personal": pp["by_kind"]},
                "general_base": general_b, "general_personal": general_p, "artifact_bytes": r["artifact_bytes"],
                "eval_seconds": round(time.perf_counter() - t2, 1),
            }
            results.append(row)
            print(f"  held-out NLL base {row['nll_base']:.4f} -> LoRA {row['nll_lora']:.4f} -> served 1-bit "
                  f"{row['nll_personal']:.4f}: personalization score {row['personalization_score']:.1%}; drift KL "
                  f"{row['kl_drift']:.4f} (gate bound {gate_kl}); probes passed base {row['probes_base']:.0%} vs "
                  f"personal {row['probes_personal']:.0%}", flush=True)
            if not args.quick:
                print(f"  WikiText-2 ppl {general_b['wikitext_ppl']:.2f} -> {general_p['wikitext_ppl']:.2f}; ARC-Easy "
                      f"{general_b['arc_easy']:.1%} -> {general_p['arc_easy']:.1%}; artifact {row['artifact_bytes']:,} B",
                      flush=True)
    ok = [r for r in results if r["state"] == "deployed"]
    beats = all(r["nll_personal"] < r["nll_base"] for r in ok) and len(ok) == len(results)
    bounded = all(r["kl_drift"] <= r["gate_max_kl"] for r in ok)
    print(f"\nevery persona's served model beats the base on held-out NLL: {'yes' if beats else 'NO'}; "
          f"drift under the gate's bound ({gate_kl}) for all: {'yes' if bounded else 'NO'}")
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(home, ignore_errors=True)  # adapters, deltas and stores of the run
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Eval scores on the three persona fixtures: one learning round each, then `ownlm eval`'s measurements.

One node (a fresh home; the converted base model is shared with --home's cache) with three users — mira, bram
and chiara, each with their shipped history of 300 conversations. For each, one round of the real loop
(dataset, LoRA, BitDelta, quality gate, signed bundle, install) with a fixed number of steps, then
`ownlm.eval_run.evaluate_user` on the installed 1-bit model: held-out assistant NLL of base, LoRA and the
served 1-bit model, the personalization score (relative NLL reduction of the served model), drift KL(base ||
personal) on Dolly prompts against the gate's bound, the share of unseen probe questions passed, general
ability (WikiText-2 perplexity, ARC-Easy accuracy), artifact size, speed.

    .venv/bin/python bench/personas.py [--steps 32] [--lr 1e-3] [--personas mira,bram,chiara] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.capture.ingest import import_into  # noqa: E402
from ownlm.eval_run import evaluate_user  # noqa: E402
from ownlm.loop import run_job  # noqa: E402
from ownlm.personas import DATA_DIR, PERSONAS  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402


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
            report, extras = evaluate_user(store, settings, user, quick=args.quick, progress=lambda _: None)
            rep = report.to_dict()
            b, p = rep["base"], rep["personal"]
            row = {
                "persona": name, "state": "deployed", "train_examples": r.get("train_examples"),
                "heldout_examples": rep["items"]["heldout_examples"], "steps": r.get("steps"),
                "train_seconds": r.get("train_seconds"), "nll_base": b["heldout_nll"],
                "nll_lora": r.get("heldout_loss_lora"), "nll_personal": p["heldout_nll"],
                "personalization_score": rep["derived"]["personalization_score"],
                "kept_gain": r.get("fidelity"), "kl_drift": p["kl_drift"], "gate_max_kl": gate_kl,
                "probes_base": b["behaviour"], "probes_personal": p["behaviour"],
                "wikitext_ppl_base": b["wikitext_perplexity"], "wikitext_ppl_personal": p["wikitext_perplexity"],
                "arc_easy_base": b["arc_easy"], "arc_easy_personal": p["arc_easy"],
                "artifact_bytes": extras["artifact_bytes"],
                "tokens_per_s_base": b["tokens_per_s"], "tokens_per_s_personal": p["tokens_per_s"],
            }
            results.append(row)
            print(f"  held-out NLL base {row['nll_base']:.4f} -> LoRA {row['nll_lora']:.4f} -> served 1-bit "
                  f"{row['nll_personal']:.4f}: personalization score {row['personalization_score']:.1%}; drift KL "
                  f"{row['kl_drift']:.4f} (gate bound {gate_kl}); probes passed base {row['probes_base']:.0%} vs "
                  f"personal {row['probes_personal']:.0%}", flush=True)
            if not args.quick:
                print(f"  WikiText-2 ppl {row['wikitext_ppl_base']:.2f} -> {row['wikitext_ppl_personal']:.2f}; ARC-Easy "
                      f"{row['arc_easy_base']:.1%} -> {row['arc_easy_personal']:.1%}; artifact {row['artifact_bytes']:,} B",
                      flush=True)
    ok = [r for r in results if r["state"] == "deployed"]
    beats = all(r["nll_personal"] < r["nll_base"] for r in ok) and len(ok) == len(results)
    bounded = all(r["kl_drift"] <= r["gate_max_kl"] for r in ok)
    print(f"\nevery persona's served model beats the base on held-out NLL: {'yes' if beats else 'NO'}; "
          f"drift under the gate's bound ({gate_kl}) for all: {'yes' if bounded else 'NO'}")
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

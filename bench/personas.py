"""The behaviour benchmark: does the served personal model answer like its person, and after how many rounds?

One node (a fresh home; the converted base model is shared with --home's cache) with three users — mira, bram
and chiara. Each user's shipped history (300 conversations) arrives in `--rounds` equal parts; after each part,
one round of the real loop (dataset with augmentation, training with the node's settings, lora1 artifact,
quality gate incl. its behaviour check, signed bundle, install; later rounds continue as the node's `continual`
setting says). After every round, on the installed model: the persona's unseen probe questions (templates never
used in training; greedy, 96 tokens: PROBE_TOKENS), style and fact separately, with 95% Wilson intervals — the curve "rounds
until personal" — plus the round's held-out NLL, drift KL (the gate's measurement) and training seconds. After
round 1, an fp32 LoRA of the same layout, data and steps (not quantization-aware, not compressed) is measured
on the same probes, for comparison (skip with --no-fp32). After the last round: ARC-Easy (100 items) and
WikiText-2 perplexity of base and personal model. Each goal of issue 16 is printed as met or not.

    OWNLM_HOME=... .venv/bin/python bench/personas.py [--rounds 3] [--steps N] [--lr X] [--personas mira,bram,chiara]
                                                      [--quick] [--json FILE]
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
from common import fmt, probe_row  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import load_delta  # noqa: E402
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.capture.importers.base import ImportResult  # noqa: E402
from ownlm.engine.torch_engine import TorchEngine  # noqa: E402
from ownlm.evaluate.general import general_perplexity, mc_items, multiple_choice_accuracy  # noqa: E402
from ownlm.evaluate.metrics import delta_applied, wilson  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR, PERSONAS, probes  # noqa: E402
from ownlm.learn.tokens import TokenizedExample, tokenize_chat  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.loop import run_job  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402

GOALS = {"style": 0.90, "fact": 0.60}  # issue 16: probes passed after the demo-sized round
MAX_KL, ARC_POINTS = 0.25, 0.05



def general(base, n_arc: int) -> dict:
    return {"wikitext_ppl": general_perplexity(base.model, base.tokenizer, max_blocks=8).perplexity,
            "arc_easy": multiple_choice_accuracy(base.model, base.tokenizer, mc_items("arc_easy", n_arc))}


def dataset_examples(store, user_id: str, tokenizer, split: str) -> list[TokenizedExample]:
    """The latest dataset's examples of one split, tokenized as the loop does."""
    info = store.dataset_info(user_id)
    out = []
    for r in store.dataset_examples(user_id, info["id"]):
        if r["split"] == split and r["messages"]:
            ids, labels = tokenize_chat(tokenizer, r["messages"])
            out.append(TokenizedExample(ids, labels, r["conversation_id"], r["sha256"]))
    return out


def fp32_arm(base, engine, store, user_id, cfg: TrainConfig, steps: int, asked, work: Path, pen: float = 1.0) -> dict:
    """An fp32 LoRA on round 1's dataset with the round's settings (no QAT, no compression): its probes."""
    from peft import PeftModel

    tok = base.tokenizer
    report = train(base, dataset_examples(store, user_id, tok, "train"), dataset_examples(store, user_id, tok, "heldout"),
                   TrainConfig(lr=cfg.lr, max_steps=steps, epochs=20, qat=False, anchor_kl=cfg.anchor_kl), work)
    # peft injects the LoRA layers into base.model itself (the engine's model); unload() puts the original
    # layers back untouched (nothing was merged into the weights)
    model = PeftModel.from_pretrained(base.model, str(work / "adapter"))
    try:
        probed = probe_row(engine, asked, repetition_penalty=pen)
    finally:
        model.unload()
    return {"probes": probed, "nll": report.heldout_loss_personal, "train_seconds": report.duration_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home whose cache/ holds the converted base (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="mira,bram,chiara")
    ap.add_argument("--rounds", type=int, default=3, help="the history arrives in this many parts, one round each")
    ap.add_argument("--steps", type=int, help="optimizer steps per round (default: the node's setting)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the node's setting)")
    ap.add_argument("--quick", action="store_true", help="no fp32 arm, no WikiText-2/ARC-Easy")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 LoRA comparison")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    shared = load_settings(home=args.home)
    (shared.home / "cache").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="ownlm-personas-"))
    (home / "cache").symlink_to((shared.home / "cache").resolve(), target_is_directory=True)
    settings = load_settings(home=str(home))
    p = settings.personalization
    update = {k: v for k, v in (("max_steps", args.steps), ("lr", args.lr)) if v is not None}
    settings = settings.model_copy(update={"personalization": p.model_copy(update=update)})
    p = settings.personalization
    pen = settings.repetition_penalty  # probes are answered as the node serves them, and also plain greedy
    print(f"node settings: {p.max_steps} steps, lr {p.lr}, qat {p.qat}, anchor_kl {p.anchor_kl}, continual "
          f"{p.continual}, {args.rounds} rounds; answers with repetition penalty {pen}", flush=True)
    base = load_base(settings)
    plain, results, base_general = TorchEngine(base), [], {}
    with Store(home) as store:
        for name in args.personas.split(","):
            if name not in PERSONAS:
                sys.exit(f"unknown persona {name!r}; choose from {sorted(PERSONAS)}")
            user, asked = store.create_user(name), probes(PERSONAS[name])
            history = parse_file(DATA_DIR / f"{name}.jsonl")
            parts = [history.conversations[i::args.rounds] for i in range(args.rounds)]
            row = {"persona": name, "probes_base": probe_row(plain, asked, repetition_penalty=pen),
                   "probes_base_greedy": probe_row(plain, asked), "rounds": []}
            print(f"\n{name}: base probes {fmt(row['probes_base'])} (plain greedy: {fmt(row['probes_base_greedy'])})",
                  flush=True)
            for k, part in enumerate(parts, start=1):
                import_into(store, user.id, ImportResult(history.format, part), f"{name}-part{k}")
                t1 = time.perf_counter()
                job = run_job(store, settings, store.enqueue_job(user.id, f"bench/personas.py round {k}"))
                r = job["result"] or {}
                rnd = {"round": k, "state": job["state"], "reason": job["reason"], "steps": r.get("steps"),
                       "train_examples": r.get("train_examples"), "train_seconds": r.get("train_seconds"),
                       "round_seconds": round(time.perf_counter() - t1, 1), "nll_base": r.get("heldout_loss_base"),
                       "nll_lora": r.get("heldout_loss_lora"), "nll_served": r.get("heldout_loss_compressed"),
                       "kl_drift": r.get("kl_drift"), "behaviour_gate": r.get("behaviour")}
                model = store.active_model(user.id)
                if model is not None:  # the model that serves now (this round's, or the last one the gate let through)
                    delta = load_delta(model["path"], expect_base_sha256=base.sha256)
                    with delta_applied(base.model, delta, base.sha256):
                        rnd["probes"] = probe_row(plain, asked, repetition_penalty=pen)
                        rnd["probes_greedy"] = probe_row(plain, asked)
                row["rounds"].append(rnd)
                print(f"  round {k}: {job['state']} ({rnd['steps']} steps, {rnd['train_seconds'] or 0:.0f} s training; "
                      f"{job['reason']}); NLL {rnd['nll_base'] or 0:.3f} -> {rnd['nll_served'] or 0:.3f}, drift "
                      f"{rnd['kl_drift'] or 0:.3f}; probes {fmt(rnd['probes']) if 'probes' in rnd else 'no model yet'}"
                      + (f" (plain greedy: {fmt(rnd['probes_greedy'])})" if 'probes' in rnd else ""),
                      flush=True)
                if k == 1 and not (args.quick or args.no_fp32):
                    cfg = TrainConfig(lr=p.lr, anchor_kl=p.anchor_kl)
                    row["fp32_round1"] = fp32_arm(base, plain, store, user.id, cfg, r.get("steps") or p.max_steps or 32,
                                                  asked, home / "fp32" / name, pen)
                    print(f"  fp32 LoRA, round 1's data and steps: probes {fmt(row['fp32_round1']['probes'])}", flush=True)
            model = store.active_model(user.id)
            if not args.quick and model is not None:
                if not base_general:  # the base's figures are the same for every persona: measured once
                    base_general.update(general(base, 100))
                row["general_base"] = base_general
                with delta_applied(base.model, load_delta(model["path"], expect_base_sha256=base.sha256), base.sha256):
                    row["general_personal"] = general(base, 100)
                print(f"  ARC-Easy {row['general_base']['arc_easy']:.0%} -> {row['general_personal']['arc_easy']:.0%}; "
                      f"WikiText-2 ppl {row['general_base']['wikitext_ppl']:.2f} -> "
                      f"{row['general_personal']['wikitext_ppl']:.2f}; artifact {model['size_bytes']:,} B", flush=True)
            row["artifact_bytes"] = model["size_bytes"] if model else None
            results.append(row)
    shutil.rmtree(home, ignore_errors=True)
    summarize(results)
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def summarize(results: list[dict]) -> None:
    """The goals after round 1 (the demo-sized round) and after the last round, over all personas."""
    for label, pick in (("after round 1", lambda r: r["rounds"][0]), ("after the last round", lambda r: r["rounds"][-1])):
        print(f"\n{label}:")
        for kind, goal in GOALS.items():
            passed = sum(pick(r).get("probes", {}).get(kind, {}).get("passed", 0) for r in results)
            total = sum(r["probes_base"][kind]["total"] for r in results)
            lo, hi = wilson(passed, total)
            print(f"  {kind} probes {passed}/{total} = {passed / total:.0%} [95% CI {lo:.0%}, {hi:.0%}]; goal "
                  f">= {goal:.0%}: {'met' if passed / total >= goal else 'NOT met'}")
        drifts = [pick(r)["kl_drift"] for r in results if pick(r).get("kl_drift") is not None]
        if drifts:
            print(f"  drift KL max {max(drifts):.3f} (goal <= {MAX_KL}): {'met' if max(drifts) <= MAX_KL else 'NOT met'}")
    sizes = [r["artifact_bytes"] for r in results if r.get("artifact_bytes")]
    if sizes:
        print(f"  artifact at most {max(sizes):,} B (goal <= 64 KB = 65,536 B): {'met' if max(sizes) <= 65536 else 'NOT met'}")
    arcs = [(r["general_base"]["arc_easy"], r["general_personal"]["arc_easy"]) for r in results if "general_base" in r]
    if arcs:
        worst = max(b - q for b, q in arcs)
        print(f"  ARC-Easy largest drop {worst * 100:.0f} points (goal within {ARC_POINTS * 100:.0f}): "
              f"{'met' if worst <= ARC_POINTS else 'NOT met'}")


if __name__ == "__main__":
    main()

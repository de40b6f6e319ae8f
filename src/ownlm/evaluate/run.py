"""`ownlm eval`: measure a user's deployed personal model against the base, with one model in memory.

Held-out data is the user's latest dataset's held-out split (conversations never trained on). 'personal' is
the installed model (its 1-bit delta: what is actually served), so the report's personal column *is* the
compressed model; the uncompressed LoRA's held-out NLL from training is reported beside it when the round's
job kept it.
"""

from __future__ import annotations

import json
import math

from ownlm.bitdelta import load_delta
from ownlm.errors import NotFound
from ownlm.evaluate.report import EvalReport, ModelScores
from ownlm.learn.tokens import TokenizedExample, tokenize_chat


class _UserEngine:
    """The engine protocol for one user and one model choice (for evaluate.behaviour_score / speed)."""

    def __init__(self, engine, user_id: str, use: str):
        self.engine, self.user_id, self.use = engine, user_id, use
        self.model_name = engine.model_name

    def stream(self, messages, params):
        return self.engine.stream(messages, params, user_id=self.user_id, use=self.use)


def heldout_examples(store, user_id: str, tokenizer) -> list[TokenizedExample]:
    info = store.dataset_info(user_id)
    rows = [r for r in store.dataset_examples(user_id, info["id"]) if r["split"] == "heldout" and r["messages"]]
    if not rows:
        raise NotFound("the latest dataset has no held-out conversations", hint="build a dataset with more conversations")
    out = []
    for r in rows:
        ids, labels = tokenize_chat(tokenizer, r["messages"])
        out.append(TokenizedExample(ids, labels, r["conversation_id"], r["sha256"]))
    return out


def evaluate_user(store, settings, user, model: str | None = None, quick: bool = False, progress=print) -> tuple[EvalReport, dict]:
    """(report, extras) for `user`'s model `model` (version or id; default: the active one)."""
    from ownlm.basemodel import load_base
    from ownlm.engine.serving import choose_engine, load_serving_engine
    from ownlm.engine.torch_engine import TorchEngine
    from ownlm.evaluate.general import dolly_examples, general_perplexity, mc_items, multiple_choice_accuracy
    from ownlm.evaluate.gate import behaviour_check, behaviour_inputs
    from ownlm.evaluate.metrics import (assistant_nll, behaviour_score, by_kind_with_intervals, delta_applied, kl_drift,
                                        speed)
    from ownlm.evaluate.personas.fixtures import PERSONAS, probes

    chosen = store.model(user.id, model) if model else store.active_model(user.id)
    if chosen is None:
        raise NotFound(f"{user.name} has no personal model yet", hint="run `ownlm train` (or wait for the loop) first")
    base = load_base(settings)
    delta = load_delta(chosen["path"], expect_base_sha256=base.sha256)
    held = heldout_examples(store, user.id, base.tokenizer)
    m, tok = base.model, base.tokenizer
    n_mc = 40 if quick else 100
    b, p = ModelScores(), ModelScores()
    progress("held-out NLL…")
    b.heldout_nll = assistant_nll(m, held).mean_nll
    if not quick:
        progress("general ability (WikiText-2, ARC-Easy)…")
        b.wikitext_perplexity = general_perplexity(m, tok, max_blocks=8).perplexity
        b.arc_easy = multiple_choice_accuracy(m, tok, mc_items("arc_easy", n_mc))
    with delta_applied(m, delta, base.sha256):
        p.heldout_nll = assistant_nll(m, held).mean_nll
        if not quick:
            p.wikitext_perplexity = general_perplexity(m, tok, max_blocks=8).perplexity
            p.arc_easy = multiple_choice_accuracy(m, tok, mc_items("arc_easy", n_mc))
    b.heldout_perplexity, p.heldout_perplexity = math.exp(b.heldout_nll), math.exp(p.heldout_nll)
    progress("drift KL on Dolly prompts…")
    p.kl_drift = kl_drift(m, delta, dolly_examples(tok, n=64), max_positions=1024, base_sha256=base.sha256)
    # The user's own reply habits (any user, not only the fixtures): shown in held-out answers of each model
    progress("reply habits on held-out prompts (greedy answers)…")
    rows = store.dataset_examples(user.id, store.dataset_info(user.id)["id"])
    found, prompts = behaviour_inputs([r["messages"] for r in rows if r["split"] == "train" and not r["augmented"]],
                                      [r["messages"] for r in rows if r["split"] == "heldout"])
    habit_rows = behaviour_check(base, delta, found, prompts, min_rate=0.0,
                                 repetition_penalty=settings.repetition_penalty)["habits"]
    probe_counts: dict = {}
    if user.name in PERSONAS:
        # batched greedy answers (TorchEngine.greedy_batch) with the delta merged for 'personal': the same
        # weights a single-user node serves
        progress("persona probes (greedy answers)…")
        plain, asked = TorchEngine(base), probes(PERSONAS[user.name])
        with delta_applied(m, delta, base.sha256):
            r_personal = behaviour_score(plain, asked, repetition_penalty=settings.repetition_penalty)
        r_base = behaviour_score(plain, asked, repetition_penalty=settings.repetition_penalty)
        for scores, r, label in ((p, r_personal, "personal"), (b, r_base, "base")):
            probe_counts[label] = by_kind_with_intervals(r)
            scores.behaviour = r["pass_rate"]
            scores.behaviour_fact = r["by_kind"].get("fact", {}).get("rate")
            scores.behaviour_style = r["by_kind"].get("style", {}).get("rate")
    # speed through the real serving path: the engine `ownlm serve` would choose (engine/serving.py), serving
    # the user's routed model and the base. Last, because a one-user torch node merges the delta into `m`.
    choice = choose_engine(settings)
    progress(f"speed ({choice.name} engine)…")
    engine = load_serving_engine(settings, store, choice=choice, base=base)
    try:
        prompts = ["Give me three tips for a rainy weekend."]
        for scores, use in ((b, "base"), (p, "personal")):
            scores.tokens_per_s = speed(_UserEngine(engine, user.id, use), prompts, max_tokens=32, runs=3)
    finally:
        engine.close()
    report = EvalReport(base=b, personal=p, heldout_tokens=sum(e.n_loss_tokens for e in held),
                        items={"heldout_examples": len(held), "arc_easy": 0 if quick else n_mc},
                        notes={"model": chosen["id"], "base_sha256": base.sha256, "device": base.device.describe(),
                               "speed_engine": f"{choice.name} ({choice.reason})"})
    training = chosen["manifest"].get("training", {})
    fp16_lora = sum(2 * (s[0] * s[1]) for s in (q.shape for q in delta.quantised.values()))
    extras = {
        "model": chosen["id"], "version": chosen["version"],
        "artifact_bytes": chosen["size_bytes"],
        "delta_payload_bytes": delta.nbytes,
        "ratio_to_fp16_lora": fp16_lora / delta.nbytes,
        "ratio_to_fp16_base": (base.n_params * 2) / delta.nbytes,
        "heldout_loss_lora_at_training": training.get("heldout_loss_personal"),
        "habits": habit_rows,  # [{"habit", "base", "personal", "passed"}] on up to 8 held-out prompts
        "probes": probe_counts,  # persona users: {"base"|"personal": {kind: {passed, total, ci95}}}
        "versions": [{"version": v["version"], "id": v["id"],
                      "heldout_loss_base": v["manifest"]["training"].get("heldout_loss_base"),
                      "heldout_loss_personal": v["manifest"]["training"].get("heldout_loss_personal")}
                     for v in store.models(user.id)],
    }
    return report, extras


def plot_versions(extras: dict, path) -> None:
    """PNG: held-out loss of base and personal model per installed version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = sorted(extras["versions"], key=lambda v: v["version"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([v["version"] for v in vs], [v["heldout_loss_base"] for v in vs], "o--", label="base")
    ax.plot([v["version"] for v in vs], [v["heldout_loss_personal"] for v in vs], "o-", label="personal (1-bit)")
    ax.set_xlabel("model version")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"learning over versions ({extras['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(report: EvalReport, extras: dict) -> str:
    return json.dumps({**report.to_dict(), "artifact": extras}, indent=1)

"""Continual learning: how should learning round k+1 relate to round k?

A persona's history arrives in rounds whose topics drift: round j's new conversations are mostly about the
persona's j-th recurring topic (conversations without a topic are spread over the rounds), as when a user's
interests move on between two hourly jobs. After every round, each strategy's adapter is scored on the
held-out conversations of every round seen so far (assistant-token NLL, nats/token; lower is better):

    retrain   a fresh LoRA on all conversations so far, one epoch (what the loop did before this benchmark);
              its cost grows with the history
    continue  the previous round's adapter trained one epoch on the new conversations only (constant cost)
    replay    as continue, plus a random sample of older conversations (--replay x the new count)
    continue-steps  as continue, but as many optimizer steps as replay took (the new data cycled): is it the
              replayed data or just the extra steps?

"old" is the mean NLL on the held-out conversations of earlier rounds (forgetting shows there), "new" on the
current round's. Round 1 is the same for all strategies (a fresh adapter on round 1). Training tokens
count every token processed (all epochs).

    .venv/bin/python bench/continual.py [--persona bram] [--per-round 50] [--heldout 15] [--replay 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import added, persona_conversations  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import read_adapter  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402

STRATEGIES = ("retrain", "continue", "replay", "continue-steps")


def rounds_by_topic(conversations: dict[str, list[dict]], topics: list[list[str]], seed: int) -> list[list[str]]:
    """Conversation ids per round: round j holds the conversations whose text names topic j's vocabulary most;
    those naming no topic go round-robin. Each round's list is shuffled with `seed`."""
    rounds: list[list[str]] = [[] for _ in topics]
    spill = 0
    for cid, rows in conversations.items():
        text = " ".join(r["content"] for r in rows).lower()
        hits = [sum(text.count(w.lower()) for w in vocab) for vocab in topics]
        if max(hits) > 0:
            rounds[hits.index(max(hits))].append(cid)
        else:
            rounds[spill % len(topics)].append(cid)
            spill += 1
    rng = random.Random(seed)
    for r in rounds:
        rng.shuffle(r)
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--persona", default="bram", choices=sorted(PERSONAS))
    ap.add_argument("--per-round", type=int, default=50, help="new training conversations per round")
    ap.add_argument("--heldout", type=int, default=15, help="held-out conversations per round")
    ap.add_argument("--replay", type=float, default=0.5, help="replayed old conversations per new one (replay)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = load_base(load_settings(home=args.home))
    tok = base.tokenizer
    conversations = persona_conversations(args.persona)
    persona = PERSONAS[args.persona]
    rounds = rounds_by_topic(conversations, [t.vocabulary for t in persona.topics], args.seed)
    need = args.per_round + args.heldout
    if min(len(r) for r in rounds) < need:
        sys.exit(f"a round has only {min(len(r) for r in rounds)} conversations; lower --per-round/--heldout (need {need})")
    # One dataset over everything (no held-out split of its own): rounds and held-out sets are chosen here.
    built = build(conversations, {}, tok, DatasetConfig(heldout_fraction=0.0))
    by_conv: dict[str, list] = {}
    for ex in tokenize(built.examples, tok):
        by_conv.setdefault(ex.conversation_id, []).append(ex)

    def examples(ids: list[str]) -> list:
        return [ex for cid in ids for ex in by_conv.get(cid, [])]

    train_ids = [r[args.heldout:need] for r in rounds]
    held = [examples(r[: args.heldout]) for r in rounds]
    print(f"persona {args.persona}: {len(rounds)} rounds of {args.per_round} new conversations "
          f"({', '.join(t.name for t in persona.topics)}), {args.heldout} held out per round")

    model = base.model
    base_nll = [assistant_nll(model, h).mean_nll for h in held]
    print("base held-out NLL per round: " + ", ".join(f"{x:.4f}" for x in base_nll))
    work = Path(tempfile.mkdtemp(prefix="ownlm-continual-"))
    rng = random.Random(args.seed)
    rows: list[dict] = []
    prev: dict[str, Path | None] = {s: None for s in STRATEGIES}
    shared_first: dict | None = None
    for k in range(len(rounds)):
        for strategy in STRATEGIES:
            if k == 0 and shared_first is not None:  # round 1 is the same fresh adapter for every strategy
                rows.append({**shared_first, "strategy": strategy})
                prev[strategy] = prev[STRATEGIES[0]]
                continue
            ids = list(train_ids[k])
            init = prev[strategy] if k > 0 and strategy != "retrain" else None
            config = TrainConfig(lr=args.lr, seed=args.seed + k)
            if strategy == "retrain":
                ids = [c for j in range(k + 1) for c in train_ids[j]]
            elif strategy == "replay" and k > 0:
                old = [c for j in range(k) for c in train_ids[j]]
                ids += rng.sample(old, min(len(old), round(args.replay * len(train_ids[k]))))
            elif strategy == "continue-steps" and k > 0:
                replay_steps = next(r["steps"] for r in reversed(rows) if r["strategy"] == "replay")
                config = TrainConfig(lr=args.lr, seed=args.seed + k, epochs=10, max_steps=replay_steps)
            out = work / f"{strategy}-{k}"
            rep = train(base, examples(ids), [], config, out, init_adapter=init)
            prev[strategy] = out / "adapter"
            with added(model, read_adapter(out / "adapter").weight_deltas()):
                nll = [assistant_nll(model, h).mean_nll for h in held]
            row = {"round": k + 1, "strategy": strategy, "conversations": len(ids), "tokens": rep.tokens,
                   "steps": rep.steps,
                   "train_s": rep.duration_s, "nll": nll,
                   "old": statistics.fmean(nll[:k]) if k else None, "new": nll[k],
                   "seen": statistics.fmean(nll[: k + 1]), "all": statistics.fmean(nll)}
            rows.append(row)
            if k == 0:
                shared_first = {kk: v for kk, v in row.items() if kk != "strategy"}
            print(f"round {k + 1} {strategy:<14} {len(ids):>4} conv {rep.tokens:>7,} tokens {rep.steps:>3} steps "
                  f"{rep.duration_s:6.1f} s  "
                  f"NLL old {row['old'] if row['old'] is not None else float('nan'):.4f}  new {row['new']:.4f}  "
                  f"seen {row['seen']:.4f}  (per round: {', '.join(f'{x:.4f}' for x in nll)})", flush=True)

    print(f"\nafter round {len(rounds)} (held-out NLL on every round; base {statistics.fmean(base_nll):.4f}):")
    for strategy in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == strategy]
        last = mine[-1]
        print(f"  {strategy:<14} all rounds {last['all']:.4f}  oldest round {last['nll'][0]:.4f}  newest {last['new']:.4f}  "
              f"training tokens over all rounds {sum(r['tokens'] for r in mine):,}, last round {last['tokens']:,}")
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)  # adapters, deltas and stores of the run
    if args.json:
        args.json.write_text(json.dumps({"base_nll": base_nll, "rows": rows, "args": vars(args) | {"json": str(args.json)}},
                                        indent=1))


if __name__ == "__main__":
    main()

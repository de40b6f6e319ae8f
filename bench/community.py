"""Does the community model help a new user's first round? Leave-one-out on the three persona fixtures.

Two personas contribute (each DP-SGD on its own training split, learn/dp.py, at --epsilon; pairwise-masked and
summed by privacy/community.py's Aggregator through a real SQLCipher store in a temporary home, so the round is the
node's code path), the mean becomes the 1-bit lora1 community adapter; the third persona is the new user. Rows,
all on the new user's held-out conversations and evaluated as the 1-bit artifact the node would serve:
  base · community adapter alone · first round from scratch · first round from the community adapter
(the two first rounds: same examples, steps, lr and seed). With --probes also the new user's style and fact probes
(bench/common.py probe_row: greedy, 95% Wilson intervals; ~2 min per row on 2 cores).

    OWNLM_HOME=... .venv/bin/python bench/community.py [--new mira] [--steps 24] [--contrib-steps 24]
        [--epsilon 8] [--lr 1e-3] [--no-qat] [--probes] [--quick] [--json FILE]

--quick: 4 contribution steps, 4 first-round steps, no probes (a smoke run: a few minutes on 2 cores).
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
from ownlm.artifact.sign import public_pem  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, load_delta, read_adapter  # noqa: E402
from ownlm.engine import TorchEngine  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, delta_applied  # noqa: E402
from ownlm.evaluate.personas.fixtures import PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import DatasetConfig, build, tokenize  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.privacy import community as cm  # noqa: E402
from ownlm.privacy import secure_agg as sa  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402

ALL = ("bram", "mira", "chiara")


def split(persona: str, tok):
    built = build(persona_conversations(persona), {}, tok, DatasetConfig(heldout_fraction=0.15))
    return tokenize(built.split("train"), tok), tokenize(built.split("heldout"), tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--base", help="base model (default: the node's; a tiny checkpoint makes a smoke test of the code path)")
    ap.add_argument("--new", default="mira", choices=ALL, help="the new user; the other two contribute")
    ap.add_argument("--steps", type=int, default=24, help="the new user's first-round steps")
    ap.add_argument("--contrib-steps", type=int, default=24, help="each contributor's DP steps")
    ap.add_argument("--epsilon", type=float, default=8.0, help="each contribution's DP budget")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-qat", action="store_true", help="fp32 LoRA (compressed afterwards) instead of QAT")
    ap.add_argument("--probes", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 + 4 steps, no probes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.contrib_steps, args.probes = 4, 4, False
    t0 = time.perf_counter()
    settings = load_settings(home=args.home, base=args.base)
    base = load_base(settings)
    tok = base.tokenizer
    new_train, new_held = split(args.new, tok)
    contributors = [p for p in ALL if p != args.new]
    tcfg = dict(lr=args.lr, epochs=100, qat=not args.no_qat)
    lora = TrainConfig(**tcfg)
    work = Path(tempfile.mkdtemp(prefix="ownlm-community-"))
    engine = TorchEngine(base) if args.probes else None
    asked = probes(PERSONAS[args.new]) if args.probes else None
    rows = []

    def row(label: str, delta, extra: dict | None = None) -> None:
        if delta is None:
            nll = assistant_nll(base.model, new_held).mean_nll
            pr = probe_row(engine, asked) if args.probes else None
        else:
            with delta_applied(base.model, delta, base.sha256):
                nll = assistant_nll(base.model, new_held).mean_nll
                pr = probe_row(engine, asked) if args.probes else None
        rows.append({"arm": label, "heldout_nll": nll, **({"probes": pr} if pr else {}), **(extra or {})})
        print(f"  {label:34s} held-out NLL {nll:.4f}" + (f"; probes {fmt(pr)}" if pr else ""), flush=True)

    try:
        # 1. the community round: a temporary node home, two opted-in users at tier 3
        node = load_settings(home=str(work / "node"), base=settings.base)
        with Store(node.home) as store:
            users = [store.create_user(p, tier=3) for p in contributors]
            keys = [sa.mask_keypair() for _ in users]
            for u in users:
                cm.set_choice(store, u, contribute=True)
            roster = cm.Roster("cr_bench", base.sha256, lora.r, lora.alpha, {
                i: cm.Member(keys[i][1].hex(), public_pem(store.signing_key(u.id).public_key())) for i, u in enumerate(users)},
                "factors" if args.no_qat else "latent")
            aggregator = cm.Aggregator(roster)
            for i, (u, p) in enumerate(zip(users, contributors)):
                tr, held = split(p, tok)
                rep = train(base, tr, held, TrainConfig(**tcfg, max_steps=args.contrib_steps, dp=True, dp_epsilon=args.epsilon),
                            work / f"contrib-{p}")
                print(f"  contributor {p}: {rep.steps} DP steps, ε {rep.dp['epsilon']:.2f}, own held-out NLL "
                      f"{rep.heldout_loss_base:.4f} → {rep.heldout_loss_personal:.4f} ({rep.duration_s:.0f} s)", flush=True)
                aggregator.accept(*cm.contribute(store, u, roster, i, keys[i][0],
                                                 read_adapter(work / f"contrib-{p}" / "adapter").factors, rep.dp,
                                                 None if args.no_qat else cm.latent_of(work / f"contrib-{p}")))
            manifest = cm.publish(store, node, users[0], roster, aggregator.mean(), aggregator.result())
            _, start = cm.current(store, node)
        community = load_delta(start.parent / "delta", expect_base_sha256=base.sha256)
        print(f"new user {args.new}: {len(new_train)} training examples, {len(new_held)} held out; community of "
              f"{manifest['participants']} (ε {manifest['epsilons']}); {args.steps} first-round steps at lr {args.lr}, "
              f"{'fp32' if args.no_qat else 'QAT'} LoRA r={lora.r}", flush=True)
        row("base", None)
        row("community adapter alone", community)
        for label, init in (("first round from scratch", None), ("first round from community", start)):
            out = work / label.replace(" ", "_")
            rep = train(base, new_train, new_held, TrainConfig(**tcfg, max_steps=args.steps), out, init_adapter=init)
            delta = compress_lora(read_adapter(out / "adapter"), CompressConfig(mode="lora1"), base.sha256)
            row(label, delta, {"steps": rep.steps, "train_seconds": rep.duration_s, "lora_nll": rep.heldout_loss_personal})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Federated vs local vs pooled: does a round across a person's devices beat each device's own model?

Each persona's shipped history is split across two devices, each an ownlm home with its own SQLCipher store:
`--split alternate` (the default) gives the laptop the even conversations and the phone the odd ones, so both hold
the same kind of chats; `--split topic` gives each device different parts of the person's life (topic_split).
Each device builds its dataset from its own store and trains exactly as in a federated round
(privacy/fedupdate.train_local: the loop's train(), quantization-aware by default, from scratch). Then, on the *union of the two devices' held-out conversations*, the assistant-
token NLL of:
- base: no adapter;
- local laptop / local phone: each device's own 1-bit adapter;
- federated factors / product / latent: the two devices' updates aggregated by each method of
  privacy/aggregate.py (weighted by example count), re-quantized to the lora1 artifact that would be installed;
- pooled: one model trained on both devices' training examples on one machine (the upper reference).
With --probes, the persona's unseen probe questions too (greedy, as bench/personas.py; slow on a CPU).
A round trains a device's update with DP-SGD at tier 0 or when asked (fedupdate.update_epsilon), not by default at
tiers 1 and 3; this benchmark trains without DP unless --epsilon is given, and bench/dp.py measures what DP costs.
The transport (Flower processes, signatures) is not timed here: tests/test_federation.py runs it for real.

    OWNLM_HOME=... .venv/bin/python bench/federated.py [--personas mira] [--steps 48] [--lr 1e-3] [--probes]
                                                       [--conversations 300] [--epsilon none] [--tier3] [--json FILE]
                                                       [--split alternate|topic] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, probe_row  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora  # noqa: E402
from ownlm.bitdelta.lora1 import LoraAdapter  # noqa: E402
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.capture.importers.base import ImportResult  # noqa: E402
from ownlm.evaluate.metrics import assistant_nll, delta_applied  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR, FACT_KEYS, PERSONAS, probes  # noqa: E402
from ownlm.learn.dataset import tokenize  # noqa: E402
from ownlm.learn.train import TrainConfig, train  # noqa: E402
from ownlm.privacy import aggregate as agg  # noqa: E402
from ownlm.privacy import fedupdate as fu  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402

DEVICES = ("laptop", "phone")


def topic_split(persona, convs: list) -> tuple[list, list]:
    """Each device a different part of the person's life: the persona's topics alternate between laptop and phone
    (a conversation about one of them matches its vocabulary or subjects), and so do its facts (FACT_KEYS order;
    a conversation matches a fact by the spellings a fact probe accepts). A conversation goes to the device whose
    topics and facts it matches more; one that matches neither or both equally (generic questions, units) goes
    to the one holding fewer so far. Asides about the person's facts end most answers of every kind, so facts
    still reach both devices, less often on one side than the other."""
    def terms(i: int) -> list[str]:
        out = []
        for topic in persona.topics[i::2]:
            out += [w.lower() for w in topic.vocabulary] + [s.lower() for s in topic.subjects]
        for key in FACT_KEYS[i::2]:
            out += [a.lower() for a in persona.accept.get(key) or [persona.facts[key]]]
        return out

    sides = [terms(0), terms(1)]
    out: tuple[list, list] = ([], [])
    for conv in convs:
        text = " ".join(m.content for m in conv.messages).lower()
        hits = [sum(text.count(t) for t in side) for side in sides]
        side = 0 if hits[0] > hits[1] else 1 if hits[1] > hits[0] else int(len(out[1]) < len(out[0]))
        out[side].append(conv)
    return out


def lora1(factors, spec, sha):
    return compress_lora(LoraAdapter(r=spec.r, alpha=spec.alpha, factors=factors), CompressConfig(mode="lora1"), sha)


def run_persona(name: str, args, base, shared_cache: Path, root: Path) -> dict:
    history = parse_file(DATA_DIR / f"{name}.jsonl")
    convs = history.conversations[: args.conversations]
    spec = fu.RoundSpec(round_id=f"bench-{name}", user=name, base_sha256=base.sha256, method="factors", lr=args.lr,
                        max_steps=args.steps, qat=not args.fp32)
    halves = topic_split(PERSONAS[name], convs) if args.split == "topic" else (convs[0::2], convs[1::2])
    devices = {}
    for i, dev in enumerate(DEVICES):
        home = root / f"{name}-{dev}"
        home.mkdir(parents=True)
        (home / "cache").symlink_to(shared_cache.resolve(), target_is_directory=True)
        settings = load_settings(home=str(home))
        with Store(home) as store:
            user = store.create_user(name)
            import_into(store, user.id, ImportResult(history.format, halves[i]), f"{dev}.jsonl")
            built = fu.local_dataset(store, settings, user, base.tokenizer)
        t0 = time.perf_counter()
        # one training per device serves every method: its adapter (factors, product) and, with QAT, its latents
        report, factors, latent = fu.train_local(base, built, replace(spec, method="latent" if spec.qat else "factors"),
                                                 home / "work", args.epsilon)
        devices[dev] = {"built": built, "report": report, "factors": factors, "latent": latent,
                        "train_s": round(time.perf_counter() - t0, 1)}
        print(f"  {dev}: {len(halves[i])} conversations, {report.samples} train examples, {report.heldout_samples} held out, {report.steps} steps "
              f"in {devices[dev]['train_s']} s", flush=True)

    held = [e for d in devices.values() for e in tokenize(d["built"].split("heldout"), base.tokenizer)]
    weights = [devices[d]["report"].samples for d in DEVICES]
    models = {f"local {d}": lora1(devices[d]["factors"], spec, base.sha256) for d in DEVICES}
    for method in agg.METHODS:
        if method == "latent" and not spec.qat:
            continue
        tensors = [agg.tensors_for(method, devices[d]["factors"], devices[d]["latent"]) for d in DEVICES]
        layout = agg.Layout.of(tensors[0])
        merged = agg.aggregate(method, layout, [layout.flatten(t) for t in tensors], weights, spec.r)
        models[f"federated {method}"] = agg.to_delta(merged, spec.r, spec.alpha, base.sha256)

    tier3 = tier3_cost(devices, spec, weights) if args.tier3 else None
    if args.rounds > 1:
        models[f"federated latent x{args.rounds}"] = multi_round(devices, spec, weights, args, base, root / f"{name}-rounds")

    # pooled: both devices' training examples on one machine, the same settings
    pooled_train = [e for d in devices.values() for e in tokenize(d["built"].split("train"), base.tokenizer)]
    t0 = time.perf_counter()
    tcfg = TrainConfig(r=spec.r, alpha=spec.alpha, lr=spec.lr, epochs=spec.epochs, max_steps=spec.max_steps, qat=spec.qat,
                       anchor_kl=spec.anchor_kl)
    train(base, pooled_train, held, tcfg, root / f"{name}-pooled", resume=False)
    from ownlm.bitdelta.lora1 import read_adapter

    models["pooled"] = lora1(read_adapter(root / f"{name}-pooled" / "adapter").factors, spec, base.sha256)
    pooled_s = round(time.perf_counter() - t0, 1)

    asked = probes(PERSONAS[name]) if args.probes else None
    engine = None
    if asked:
        from ownlm.engine.torch_engine import TorchEngine

        engine = TorchEngine(base)
    per_example = {"base": example_nlls(base.model, held)}
    rows = {"base": {"nll": token_mean(per_example["base"])}}
    if engine:
        rows["base"]["probes"] = probe_row(engine, asked)
    for label, delta in models.items():
        with delta_applied(base.model, delta, base.sha256):
            per_example[label] = example_nlls(base.model, held)
            rows[label] = {"nll": token_mean(per_example[label])}
            if engine:
                rows[label]["probes"] = probe_row(engine, asked)
    best = min((f"local {d}" for d in DEVICES), key=lambda k: rows[k]["nll"])
    for label, row in rows.items():
        row["gain_vs_base"] = rows["base"]["nll"] - row["nll"]
        row["beats_every_local"] = label.startswith("federated") and row["nll"] < rows[best]["nll"]
        if label.startswith(("federated", "pooled")):
            row["vs_best_local_ci"] = paired_ci(per_example[label], per_example[best])
    return {"persona": name, "split": args.split, "heldout_examples": len(held), "weights": dict(zip(DEVICES, weights)),
            "tier3": tier3,
            "steps": args.steps, "lr": args.lr, "qat": spec.qat, "pooled_train_s": pooled_s,
            "train_s": {d: devices[d]["train_s"] for d in DEVICES}, "rows": rows}


def example_nlls(model, held: list) -> np.ndarray:
    """(n, 2): each held-out example's summed target-token NLL (nats) and its target-token count."""
    out = []
    for ex in held:
        r = assistant_nll(model, [ex])
        out.append((r.mean_nll * r.n_tokens, r.n_tokens))
    return np.array(out, dtype=np.float64)


def token_mean(per: np.ndarray) -> float:
    """Token-weighted mean NLL, as assistant_nll over all the examples at once."""
    return float(per[:, 0].sum() / per[:, 1].sum())


def paired_ci(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> list[float]:
    """95% paired bootstrap interval (resampling held-out examples) of token_mean(a) - token_mean(b): wholly below
    0 means `a` is better than `b` beyond the spread of these few examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(draws, len(a)))
    diff = a[idx, 0].sum(1) / a[idx, 1].sum(1) - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    return [round(float(np.quantile(diff, 0.025)), 4), round(float(np.quantile(diff, 0.975)), 4)]


def multi_round(devices: dict, spec, weights: list[int], args, base, work: Path):
    """FedAvg over `args.rounds` rounds at the same device steps in all: each round every device trains
    steps/rounds QAT steps starting from the previous round's aggregate (its lora1 artifact as a peft adapter, as a
    community start is written), and the latents are averaged again. Returns the last aggregate's lora1 delta."""
    from ownlm.node.export import write_peft

    per_round, start, delta = max(1, args.steps // args.rounds), None, None
    rspec = replace(spec, method="latent", max_steps=per_round)
    for k in range(args.rounds):
        tensors = []
        for d in DEVICES:
            _, factors, latent = fu.train_local(base, devices[d]["built"], rspec, work / f"r{k}-{d}", args.epsilon,
                                                init_adapter=start)
            tensors.append(agg.tensors_for("latent", factors, latent))
        layout = agg.Layout.of(tensors[0])
        merged = agg.aggregate("latent", layout, [layout.flatten(t) for t in tensors], weights, spec.r)
        delta = agg.to_delta(merged, spec.r, spec.alpha, base.sha256)
        start = work / f"r{k}-aggregate"
        start.mkdir(parents=True)
        write_peft(delta, base.source.path, start)
        print(f"  round {k + 1}/{args.rounds}: {per_round} steps per device, aggregated", flush=True)
    return delta


def tier3_cost(devices: dict, spec, weights: list[int]) -> dict:
    """What a tier-3 round of these devices' updates costs (privacy/secure_agg.py, the code a secure round runs):
    CKKS ciphertext bytes per device, seconds to encrypt (per device), add (server) and decrypt (device), and how
    far the decrypted mean is from the plaintext mean (max |error|)."""
    from ownlm.privacy import secure_agg as sa

    method = "latent" if spec.qat else "factors"
    vecs = []
    for d in DEVICES:
        tensors = agg.tensors_for(method, devices[d]["factors"], devices[d]["latent"])
        vecs.append(agg.Layout.of(tensors).flatten(tensors))
    keys = sa.new_keys()
    t0 = time.perf_counter()
    cts = [sa.update_for_aggregator(3, agg.weighted(v, w), keys.public) for v, w in zip(vecs, weights)]
    enc_s = (time.perf_counter() - t0) / len(cts)
    t0 = time.perf_counter()
    total = sa.SecureSum(keys.public, vecs[0].shape[0])
    for c, w in zip(cts, weights):
        total.add(c, w)
    summed, weight = total.total()
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean = sa.decrypt_mean(keys.secret, summed, weight, vecs[0].shape[0])
    dec_s = time.perf_counter() - t0
    plain = sum(v * w for v, w in zip(vecs, weights)) / sum(weights)
    return {"floats": int(vecs[0].shape[0]), "plaintext_bytes": int(vecs[0].nbytes), "ciphertext_bytes": len(cts[0]),
            "sum_bytes": len(summed), "encrypt_s": round(enc_s, 2), "add_s": round(add_s, 2),
            "decrypt_s": round(dec_s, 2), "max_abs_error": float(np.abs(mean - plain).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home whose cache/ holds the converted base (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="mira")
    ap.add_argument("--conversations", type=int, default=300, help="use the first N conversations of each persona")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps on each device (and for pooled)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epsilon", type=lambda v: None if v == "none" else float(v), default=None,
                    help="DP-SGD epsilon of each device's update, as a tier-0 round trains it (8 by default there); "
                         "'none' (the default here) compares the aggregation methods without DP's noise")
    ap.add_argument("--fp32", action="store_true", help="fp32 LoRA instead of quantization-aware (no latent method)")
    ap.add_argument("--probes", action="store_true", help="also the persona's probes (slow on a CPU)")
    ap.add_argument("--tier3", action="store_true", help="also what a tier-3 (CKKS) round of the same updates costs")
    ap.add_argument("--split", choices=("alternate", "topic"), default="alternate",
                    help="how the history is split across the devices: alternating conversations, or by topic/fact")
    ap.add_argument("--rounds", type=int, default=1,
                    help="also FedAvg over this many rounds (steps/rounds each, from the previous aggregate)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    shared = load_settings(home=args.home)
    (shared.home / "cache").mkdir(parents=True, exist_ok=True)
    base = load_base(shared)
    results = []
    with tempfile.TemporaryDirectory(prefix="ownlm-federated-") as tmp:
        for name in args.personas.split(","):
            print(f"\n{name}: {args.steps} steps, lr {args.lr}, {'fp32' if args.fp32 else 'QAT'}, split {args.split}",
                  flush=True)
            res = run_persona(name, args, base, shared.home / "cache", Path(tmp))
            results.append(res)
            print(f"  held-out NLL on the union of both devices' held-out conversations ({res['heldout_examples']} examples):")
            print(f"  {'model':<20} {'NLL':>8} {'gain':>8}  beats every local")
            for label, row in res["rows"].items():
                extra = f"  probes {fmt(row['probes'])}" if "probes" in row else ""
                if "vs_best_local_ci" in row:
                    extra = f"  vs best local [{row['vs_best_local_ci'][0]:+.4f}, {row['vs_best_local_ci'][1]:+.4f}]" + extra
                print(f"  {label:<20} {row['nll']:8.4f} {row['gain_vs_base']:8.4f}  "
                      f"{'yes' if row['beats_every_local'] else ('-' if not label.startswith('federated') else 'no')}{extra}",
                      flush=True)
            if res["tier3"]:
                c = res["tier3"]
                print(f"  tier 3 (CKKS): {c['floats']:,} floats = {c['plaintext_bytes']:,} B -> {c['ciphertext_bytes']:,} B "
                      f"ciphertext per device; encrypt {c['encrypt_s']} s/device, add {c['add_s']} s, decrypt "
                      f"{c['decrypt_s']} s; max |error| of the mean {c['max_abs_error']:.2e}", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Inference overhead of personal models on the embedded model, measured side by side in one process.

Engines share one base: (a) the base alone (a plain TorchEngine), (b) a single-user node where the user's
lora1 delta is merged into the weights, (c) a node with several users whose deltas are added per request by
forward hooks (no merge). Rounds alternate a/b/c so machine noise hits all alike; medians are printed, with
time to first token and tokens/s, and the overhead of (b) and (c) relative to (a). Then N concurrent
streaming clients on a real `ownlm serve`-like app over HTTP (personal model), reporting aggregate tokens/s.

    .venv/bin/python bench/serve_overhead.py [--rounds 5] [--tokens 48] [--users 3] [--clients 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.artifact.bundle import make_bundle  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta  # noqa: E402
from ownlm.engine import GenerationParams, TorchEngine  # noqa: E402
from ownlm.engine.personal import PersonalEngine  # noqa: E402
from ownlm.node.install import install  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402

PROMPT = [{"role": "user", "content": "Give me three tips for a rainy weekend."}]


def make_delta(base, root: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.save_pretrained(root / f"adapter{seed}")
    m.unload()
    save_delta(compress_lora(read_adapter(root / f"adapter{seed}"), CompressConfig(mode="lora1"), base.sha256), root / f"delta{seed}")
    return root / f"delta{seed}"


def node(settings, root: Path, name: str, deltas: list[Path], base_name: str) -> Store:
    home = root / name
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "base").symlink_to(settings.home / "cache" / "base")
    s = load_settings(home=str(home), base=settings.base)
    store = Store(home)
    for i, d in enumerate(deltas):
        u = store.create_user(f"u{i}")
        data, _ = make_bundle(delta_dir=d, report={}, user_name=u.name, signing_key=store.signing_key(u.id),
                              recipient=store.node_key().public_json(), base_name=base_name, version=1, previous=None)
        install(store, s, data)
    return store


def timed(engine, params, **kw) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = engine.stream(PROMPT, params, **kw)
    for _ in stream:
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return first or total, stream.completion_tokens / total, stream.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    settings = load_settings(home=args.home)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scratch = load_base(settings)
        deltas = [make_delta(scratch, root, seed) for seed in range(args.users)]
        del scratch
        name = "SmolLM2-135M-Instruct"
        engines = {
            "base": TorchEngine(load_base(settings)),
            "merged (1 user)": PersonalEngine(load_base(settings), node(settings, root, "single", deltas[:1], name)),
            f"per-request ({args.users} users)": PersonalEngine(load_base(settings), node(settings, root, "multi", deltas, name)),
        }
        users = {k: (e.store.list_users()[0].id if isinstance(e, PersonalEngine) else None) for k, e in engines.items()}
        params = GenerationParams(max_tokens=args.tokens, temperature=0)
        # greedy decoding would stop early on an end-of-turn token; ignore it so every run makes `tokens` tokens
        for e in engines.values():
            e._eos_ids = set()
        results = {k: [] for k in engines}
        for k, e in engines.items():  # warm-up
            timed(e, params, **({"user_id": users[k]} if users[k] else {}))
        names = list(engines)
        for r in range(args.rounds):
            # rotate who goes first: a fixed order showed the first engine ~7% slower in every run
            for k in names[r % len(names):] + names[: r % len(names)]:
                results[k].append(timed(engines[k], params, **({"user_id": users[k]} if users[k] else {})))
        print(f"{args.rounds} alternating rounds of {args.tokens} tokens, greedy, {engines['base'].base.device.describe()}")
        ref = statistics.median(r[1] for r in results["base"])
        for k, rs in results.items():
            ttft, tps = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
            print(f"  {k:<24} TTFT {ttft * 1000:7.1f} ms   {tps:6.2f} tokens/s   overhead {(ref / tps - 1) * 100:+6.2f}%")

        # N concurrent streaming clients over HTTP against the per-request node
        import httpx

        from ownlm.api.app import create_app
        from tests.servers import ThreadServer

        e = engines[f"per-request ({args.users} users)"]
        store = e.store
        tokens = [store.create_token(u.id) for u in store.list_users()]
        with ThreadServer(create_app(settings, store, e)) as srv:
            counts, lock = [], threading.Lock()

            def client(i: int) -> None:
                body = {"messages": PROMPT, "max_tokens": args.tokens, "temperature": 0, "stream": True}
                with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=600,
                                  headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"}) as r:
                    n = sum(1 for line in r.iter_lines() if line.startswith("data: {") and '"content": "' in line)
                with lock:
                    counts.append(n)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        print(f"  {args.clients} concurrent streaming clients ({args.users} users' deltas): {sum(counts)} chunks in "
              f"{wall:.1f} s = {sum(counts) / wall:.2f} chunks/s aggregate (requests are served one at a time)")


if __name__ == "__main__":
    main()

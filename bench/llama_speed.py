"""Tokens/s of the llama.cpp engine against the torch engine on the embedded model, one user with a personal model.

Three engines on one home: (a) torch, the user's lora1 delta merged (what a single-user torch node serves; the
same cost as its base), (b) llama.cpp base, (c) llama.cpp with the user's delta as a GGUF LoRA adapter. Rounds
rotate the order so machine noise hits all alike; medians of decode tokens/s (after the first token) and time to
first token are printed. Greedy, the same prompt, the same thread count for both engines.

    .venv/bin/python bench/llama_speed.py [--rounds 3] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.artifact.bundle import make_bundle  # noqa: E402
from ownlm.basemodel import load_base, load_tokenizer, resolve_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta  # noqa: E402
from ownlm.engine import GenerationParams  # noqa: E402
from ownlm.engine.llama import LlamaPersonalEngine  # noqa: E402
from ownlm.engine.personal import PersonalEngine  # noqa: E402
from ownlm.node.install import install  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402

PROMPT = [{"role": "user", "content": "Give me three tips for a rainy weekend."}]


def timed(engine, tokens: int, **route) -> tuple[float, float]:
    """(seconds to the first piece, decode tokens/s after it) of one greedy answer of exactly `tokens` tokens at most."""
    t0 = time.perf_counter()
    stream = engine.stream(PROMPT, GenerationParams(max_tokens=tokens, temperature=0), **route)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = stream.completion_tokens
    return first - t0, (n - 1) / (end - first) if n > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (1: gentle on a shared machine)")
    args = ap.parse_args()
    settings = load_settings(threads=args.threads, device="cpu")
    base = load_base(settings)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        m = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        m.save_pretrained(root / "adapter")
        m.unload()
        save_delta(compress_lora(read_adapter(root / "adapter"), CompressConfig(mode="lora1"), base.sha256), root / "delta")
        home = root / "home"
        (home / "cache").mkdir(parents=True)
        (home / "cache" / "base").symlink_to(settings.home / "cache" / "base")
        node_settings = load_settings(home=str(home), threads=args.threads, device="cpu")
        store = Store(home)
        user = store.create_user("u")
        data, _ = make_bundle(delta_dir=root / "delta", report={}, user_name="u", signing_key=store.signing_key(user.id),
                              recipient=store.node_key().public_json(), base_name=base.source.name, version=1, previous=None)
        install(store, node_settings, data)
        torch_engine = PersonalEngine(base, store)
        source = resolve_base(settings.base)
        llama = LlamaPersonalEngine(source.path, load_tokenizer(settings), store, base.sha256, source.name, threads=args.threads)
        runs = {"torch personal (merged)": lambda: timed(torch_engine, args.tokens, user_id=user.id),
                "llama.cpp base": lambda: timed(llama, args.tokens, user_id=user.id, use="base"),
                "llama.cpp personal (adapter)": lambda: timed(llama, args.tokens, user_id=user.id)}
        for fn in runs.values():  # warm-up
            fn()
        seen: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        names = list(runs)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                seen[name].append(runs[name]())
        store.close()
    print(f"{args.rounds} rounds, {args.tokens} tokens, {args.threads} thread(s), median:")
    torch_tps = statistics.median(t for _, t in seen["torch personal (merged)"])
    for name, values in seen.items():
        tps = statistics.median(t for _, t in values)
        ttft = statistics.median(f for f, _ in values)
        print(f"  {name:30s} {tps:6.1f} tokens/s  first token {ttft * 1000:6.0f} ms  ({tps / torch_tps:.2f}x torch)")


if __name__ == "__main__":
    main()

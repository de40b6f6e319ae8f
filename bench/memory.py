"""Memory beside the weights, measured (issue #18): base, base + memory, personal, personal + memory, in one run.

Per persona (mira, bram, chiara), a fresh home (the converted base shared with --home's cache): the persona's
shipped history (300 conversations) is imported, which also indexes it (store/memory.py), and one round of the
real loop runs at the node's settings (dataset with augmentation, quantization-aware training, lora1 artifact,
quality gate, signed bundle, install). Memory is then limited to the round's *training* conversations: the
passages of its held-out conversations are removed from the index, so no arm can read held-out text.
The persona's unseen probe questions (templates never used in training; greedy, 96 tokens: PROBE_TOKENS) are asked in four
arms on the torch engine:
- base: the base model, the question alone;
- base + memory: the same prompt through the node's serving path (api/memory.py `recall`: passages found by
  BM25 for the question, the fixed template within memory.budget_tokens, after the base's default system prompt);
- personal: the installed 1-bit personal model, the question alone;
- personal + memory: both.
Fact and style probes are scored separately with 95% Wilson intervals, per persona and pooled. Also: prompt
tokens memory adds (mean over probes), time to first token (median over --ttft probes; torch engine for all
arms, and llama.cpp, the CPU serving engine, for base and base + memory when xllamacpp imports). The last
lines say which arm wins on facts and on style, and by how much the combination beats each alone.

    OWNLM_HOME=... .venv/bin/python bench/memory.py [--personas mira,bram,chiara] [--steps N] [--ttft 8]
                                                    [--budget TOKENS] [--quick] [--json FILE]
`--quick`: a smoke run (bram, 4 probes of each kind, 2 training steps, 2 time-to-first-token probes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, probe_row  # noqa: E402
from ownlm.api.memory import recall  # noqa: E402
from ownlm.basemodel import load_base, resolve_base  # noqa: E402
from ownlm.bitdelta import load_delta  # noqa: E402
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.engine.base import GenerationParams  # noqa: E402
from ownlm.engine.torch_engine import TorchEngine  # noqa: E402
from ownlm.evaluate.metrics import delta_applied, wilson  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR, PERSONAS, probes  # noqa: E402
from ownlm.loop import run_job  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402
from ownlm.store.memory import forget_passages  # noqa: E402

ARMS = ("base", "base + memory", "personal", "personal + memory")


class WithMemory:
    """An engine whose prompts go through the node's memory path first (what a request with memory on gets).
    Records the prompt tokens memory added and the passages used, per question asked."""

    def __init__(self, engine, state, store, user_id: str):
        self.engine, self.state, self.store, self.user_id = engine, state, store, user_id
        self.tokens: list[int] = []
        self.passages: list[int] = []

    def prompt(self, messages: list[dict]) -> list[dict]:
        r = recall(self.state, self.store, self.engine, self.user_id, messages, True)
        self.tokens.append(r.tokens)
        self.passages.append(len(r.passages))
        return r.prompt

    def greedy_batch(self, conversations, max_tokens: int, batch_size: int = 32, **options) -> list[str]:
        return self.engine.greedy_batch([self.prompt(c) for c in conversations], max_tokens, batch_size, **options)


def first_token_s(engine, messages: list[dict]) -> float:
    """Seconds from asking to the first piece of a greedy answer (prompt reading included)."""
    t0 = time.perf_counter()
    stream = engine.stream(messages, GenerationParams(max_tokens=1, temperature=0.0))
    next(iter(stream), None)
    return time.perf_counter() - t0


def ttft_ms(engine, prompts: list[list[dict]]) -> float:
    first_token_s(engine, prompts[0])  # warm-up, not counted
    return round(statistics.median(first_token_s(engine, p) for p in prompts) * 1000, 1)


def llama_engine(settings):
    """The llama.cpp engine on the base GGUF (no adapters), or None where it cannot run."""
    try:
        from ownlm.engine.llama import LlamaEngine, xllamacpp

        xllamacpp()
        source = resolve_base(settings.base)
        if source.kind != "gguf":
            return None
        from ownlm.basemodel import load_tokenizer

        return LlamaEngine(source.path, load_tokenizer(settings), "base", threads=settings.threads)
    except Exception as e:  # an optional measurement: say why it is missing, go on
        print(f"(no llama.cpp time to first token: {e})", flush=True)
        return None


def persona_run(name: str, settings, base, plain, llama, args) -> dict:
    home = settings.home
    with Store(home) as store:
        user = store.create_user(name)
        history = parse_file(DATA_DIR / f"{name}.jsonl")
        import_into(store, user.id, history, f"{name}.jsonl")
        t0 = time.perf_counter()
        job = run_job(store, settings, store.enqueue_job(user.id, "bench/memory.py"))
        row: dict = {"persona": name, "round": {"state": job["state"], "reason": job["reason"],
                                               "seconds": round(time.perf_counter() - t0, 1)}}
        ds = store.dataset_info(user.id)
        held = sorted({r["conversation_id"] for r in store.dataset_examples(user.id, ds["id"]) if r["split"] == "heldout"})
        with store.tx() as db:  # memory holds the training conversations only
            removed = forget_passages(db, f"user_id = ? AND conversation_id IN ({','.join('?' * len(held))})",
                                      (user.id, *held)) if held else 0
        row["memory"] = {"passages": store.memory_count(user.id), "heldout_removed": removed}
        asked = probes(PERSONAS[name])
        if args.probes:
            asked = [p for kind in ("fact", "style") for p in [q for q in asked if q.kind == kind][: args.probes]]
        state = SimpleNamespace(settings=settings)
        mem = WithMemory(plain, state, store, user.id)
        questions = [[{"role": "user", "content": p.question}] for p in asked]
        timing = questions[: args.ttft + 1]
        arms: dict[str, dict] = {}
        pen = settings.repetition_penalty  # answers as the node serves them
        arms["base"] = {"probes": probe_row(plain, asked, repetition_penalty=pen),
                        "ttft_ms": ttft_ms(plain, timing)}
        arms["base + memory"] = {"probes": probe_row(mem, asked, repetition_penalty=pen),
                                 "ttft_ms": ttft_ms(plain, [mem.prompt(q) for q in timing]),
                                 "tokens_added": round(statistics.mean(mem.tokens[: len(asked)]), 1),
                                 "passages": round(statistics.mean(mem.passages[: len(asked)]), 2)}
        if llama is not None:
            arms["base"]["ttft_ms_llama"] = ttft_ms(llama, timing)
            arms["base + memory"]["ttft_ms_llama"] = ttft_ms(llama, [mem.prompt(q) for q in timing])
        model = store.active_model(user.id)
        row["model"] = model["id"] if model else None
        if model is not None:
            with delta_applied(base.model, load_delta(model["path"], expect_base_sha256=base.sha256), base.sha256):
                mem.tokens, mem.passages = [], []
                arms["personal"] = {"probes": probe_row(plain, asked, repetition_penalty=pen),
                                    "ttft_ms": ttft_ms(plain, timing)}
                arms["personal + memory"] = {"probes": probe_row(mem, asked, repetition_penalty=pen),
                                             "ttft_ms": ttft_ms(plain, [mem.prompt(q) for q in timing]),
                                             "tokens_added": round(statistics.mean(mem.tokens[: len(asked)]), 1)}
        row["arms"] = arms
    return row


def pooled(results: list[dict], arm: str, kind: str) -> tuple[int, int]:
    rows = [r["arms"][arm]["probes"][kind] for r in results if arm in r["arms"] and kind in r["arms"][arm]["probes"]]
    return sum(x["passed"] for x in rows), sum(x["total"] for x in rows)


def summarize(results: list[dict]) -> None:
    print("\n| persona | arm | fact | style | +tokens | TTFT torch ms | TTFT llama.cpp ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for arm in ARMS:
            a = r["arms"].get(arm)
            if a is None:
                print(f"| {r['persona']} | {arm} | no personal model ({r['round']['state']}: {r['round']['reason']}) | | | | |")
                continue
            p = a["probes"]
            cells = [fmt({k: p[k]}) if k in p else "—" for k in ("fact", "style")]
            print(f"| {r['persona']} | {arm} | {cells[0]} | {cells[1]} | {a.get('tokens_added', 0)} | {a['ttft_ms']} | "
                  f"{a.get('ttft_ms_llama', '—')} |")
    print("\npooled over personas (95% Wilson intervals):")
    rates: dict[tuple[str, str], float] = {}
    for arm in ARMS:
        line = []
        for kind in ("fact", "style"):
            k, n = pooled(results, arm, kind)
            if n:
                lo, hi = wilson(k, n)
                rates[(arm, kind)] = k / n
                line.append(f"{kind} {k}/{n} = {k / n:.0%} [{lo:.0%}, {hi:.0%}]")
        print(f"  {arm}: {'; '.join(line) if line else 'not measured'}")
    for kind in ("fact", "style"):
        measured = {arm: rates[(arm, kind)] for arm in ARMS if (arm, kind) in rates}
        if not measured:
            continue
        best = max(measured.values())
        winners = [arm for arm, v in measured.items() if v == best]
        print(f"{kind}: best {' = '.join(winners)} ({best:.0%})", end="")
        both, alone = measured.get("personal + memory"), [measured.get("personal"), measured.get("base + memory")]
        if both is not None and None not in alone:
            print(f"; personal + memory vs personal {100 * (both - alone[0]):+.0f} points, vs base + memory "
                  f"{100 * (both - alone[1]):+.0f} points", end="")
        if "base + memory" in measured:
            print(f"; memory on the base {100 * (measured['base + memory'] - measured['base']):+.0f} points", end="")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home whose cache/ holds the converted base (default: $OWNLM_HOME)")
    ap.add_argument("--personas", default="mira,bram,chiara")
    ap.add_argument("--steps", type=int, help="optimizer steps of the round (default: the node's setting)")
    ap.add_argument("--probes", type=int, default=0, help="at most this many probes of each kind (default: all)")
    ap.add_argument("--ttft", type=int, default=8, help="probes timed for time to first token (median)")
    ap.add_argument("--budget", type=int, help="memory.budget_tokens (default: the node's setting)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp's time to first token")
    ap.add_argument("--quick", action="store_true", help="smoke run: bram, 4 probes per kind, 2 steps, 2 timed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.personas, args.probes, args.steps, args.ttft = "bram", args.probes or 4, args.steps or 2, 2
    t0 = time.perf_counter()
    shared = load_settings(home=args.home)
    (shared.home / "cache").mkdir(parents=True, exist_ok=True)
    base_settings = load_settings(home=str(shared.home))
    if args.budget is not None:
        base_settings = base_settings.model_copy(
            update={"memory": base_settings.memory.model_copy(update={"budget_tokens": args.budget})})
    p = base_settings.personalization
    if args.steps is not None:
        p = p.model_copy(update={"max_steps": args.steps})
    base = load_base(base_settings)
    plain = TorchEngine(base)
    llama = None if args.no_llama else llama_engine(base_settings)
    m = base_settings.memory
    print(f"node settings: {p.max_steps} steps, lr {p.lr}, qat {p.qat}; memory budget {m.budget_tokens} tokens, "
          f"{m.passages} passages", flush=True)
    results = []
    for name in args.personas.split(","):
        if name not in PERSONAS:
            sys.exit(f"unknown persona {name!r}; choose from {sorted(PERSONAS)}")
        home = Path(tempfile.mkdtemp(prefix=f"ownlm-memory-{name}-"))
        (home / "cache").symlink_to((shared.home / "cache").resolve(), target_is_directory=True)
        settings = load_settings(home=str(home)).model_copy(update={"personalization": p, "memory": base_settings.memory})
        try:
            row = persona_run(name, settings, base, plain, llama, args)
        finally:
            shutil.rmtree(home, ignore_errors=True)
        results.append(row)
        print(f"\n{name}: round {row['round']['state']} ({row['round']['reason']}, {row['round']['seconds']} s); "
              f"memory {row['memory']['passages']} passages ({row['memory']['heldout_removed']} held-out removed)")
        for arm, a in row["arms"].items():
            print(f"  {arm}: {fmt(a['probes'])}; +{a.get('tokens_added', 0)} tokens; TTFT {a['ttft_ms']} ms", flush=True)
    summarize(results)
    print(f"whole run {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

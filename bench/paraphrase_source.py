"""Who should write the paraphrases of knowledge augmentation: the rules (learn/paraphrase.py) or the base model?

Issue #16 item 3 asks to decide by measurement. A paraphrase is only useful if it asks the same thing in other
words: it must differ from the original, keep every fact the original carries (a persona's name, city, pet...; in
real exports every number and every capitalised name) and most of its content words, and stay a request of about
the same length (not an answer, not a run-on). This benchmark scores each variant on exactly that, for the same
user turns, from two sources:
- rules: learn/paraphrase.paraphrases(text, k) (what the dataset builder uses today);
- model: the embedded base model asked (chat template) to rewrite the turn, k samples at temperature 0.7.
Turns: for each persona fixture, the user turns that state one of the persona's facts plus as many others; from the
real export fixtures (../shared/fixtures/exports), the user turns the rules may touch (paraphrase.untouchable is
None). Intervals are 95% Wilson over variants. Whether training on model-written paraphrases changes fact probes
is not measured here: a source that loses the facts in most variants teaches the wrong thing whatever the probes.

    OWNLM_HOME=... .venv/bin/python bench/paraphrase_source.py [--per-source 40] [--k 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.evaluate.metrics import wilson  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR, PERSONAS  # noqa: E402
from ownlm.learn.paraphrase import paraphrases, untouchable  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402

EXPORTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "exports"
PROMPT = ("Rewrite the following message in different words. Keep every name, number and fact, and keep it a "
          "message to an assistant. Reply with the rewritten message only.\n\nMessage: {text}")
STOP = frozenset("the a an and or but to of in on for with at by from is are was were be been am do does did have has "
                 "had it its this that these those i me my you your we our they them their what which who how when "
                 "where why can could would should will just about please tell give any some there here not".split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def content(text: str) -> set[str]:
    return {w for w in words(text) if len(w) >= 4 and w not in STOP}


def must_keep(text: str, facts: list[str]) -> list[str]:
    """What a variant must still contain: the persona facts in the turn, else its numbers and inner capitalised names."""
    if facts:
        return [f for f in facts if f.lower() in text.lower()]
    toks = text.split()
    names = [t.strip(".,!?;:\"'()") for i, t in enumerate(toks) if i > 0 and t[:1].isupper() and t.strip(".,!?;:\"'()")]
    return re.findall(r"\d+(?:[.,]\d+)?", text) + [n for n in names if n.lower() not in STOP and n != "I"]


def score(original: str, variant: str, facts: list[str]) -> dict:
    keep = must_keep(original, facts)
    orig_content = content(original)
    kept = len(orig_content & content(variant)) / len(orig_content) if orig_content else 1.0
    ratio = len(words(variant)) / max(1, len(words(original)))
    checks = {"changed": words(variant) != words(original) and bool(variant.strip()),
              "keeps_facts": all(k.lower() in variant.lower() for k in keep),
              "keeps_content": kept >= 0.6,
              "same_length": 0.4 <= ratio <= 2.5}
    return {**checks, "useful": all(checks.values())}


def persona_turns(n: int, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    out = []
    for name, persona in PERSONAS.items():
        facts = [str(v) for v in persona.facts.values()]
        turns = [m.content for c in parse_file(DATA_DIR / f"{name}.jsonl").conversations for m in c.messages
                 if m.role == "user" and untouchable(m.content) is None]
        with_fact = sorted({t for t in turns if any(f.lower() in t.lower() for f in facts)})
        other = sorted(set(turns) - set(with_fact))
        rng.shuffle(with_fact)
        rng.shuffle(other)
        half = n // 2
        out += [(f"persona {name}", t, facts) for t in with_fact[:half] + other[: n - min(half, len(with_fact))]]
    return out


def export_turns(n: int, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    turns = set()
    for path in sorted(p for p in EXPORTS.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")):
        try:
            result = parse_file(path)
        except Exception:  # a fixture of a format the importers reject on purpose
            continue
        turns |= {m.content for c in result.conversations for m in c.messages
                  if m.role == "user" and untouchable(m.content) is None}
    turns = sorted(turns)
    rng.shuffle(turns)
    return [("real exports", t, []) for t in turns[:n]]


@torch.inference_mode()
def model_variants(base, texts: list[str], k: int, batch: int, seed: int) -> list[list[str]]:
    tok, model = base.tokenizer, base.model
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.format(text=t)}], tokenize=False,
                                           add_generation_prompt=True) for t in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        torch.manual_seed(seed + i)
        gen = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=k,
                             max_new_tokens=64, pad_token_id=tok.pad_token_id)
        texts_out = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j in range(len(chunk)):
            out.append([t.strip().strip('"').strip() for t in texts_out[j * k:(j + 1) * k]])
        print(f"  model: {min(i + batch, len(texts))}/{len(texts)} turns", flush=True)
    return out


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    res = {"variants": n}
    for key in ("useful", "changed", "keeps_facts", "keeps_content", "same_length"):
        passed = sum(r[key] for r in rows)
        res[key] = {"passed": passed, "rate": round(passed / n, 3) if n else None,
                    "ci95": [round(x, 3) for x in wilson(passed, n)] if n else None}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home whose cache/ holds the converted base (default: $OWNLM_HOME)")
    ap.add_argument("--per-source", type=int, default=40, help="user turns per persona and from the real exports")
    ap.add_argument("--k", type=int, default=3, help="variants asked per turn from each source")
    ap.add_argument("--batch", type=int, default=8, help="turns per generate() call")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    turns = persona_turns(args.per_source, rng) + export_turns(args.per_source, rng)
    print(f"{len(turns)} user turns: " + ", ".join(f"{s} {sum(1 for x in turns if x[0] == s)}"
                                               for s in dict.fromkeys(t[0] for t in turns)), flush=True)
    base = load_base(load_settings(home=args.home))
    t_model = time.perf_counter()
    by_model = model_variants(base, [t for _, t, _ in turns], args.k, args.batch, args.seed)
    t_model = time.perf_counter() - t_model
    rows, examples = [], []
    for (source, text, facts), mv in zip(turns, by_model):
        for writer, variants in (("rules", paraphrases(text, args.k, seed=str(args.seed))), ("model", mv)):
            if writer == "rules":
                rows.append({"source": source, "writer": "rules", "asked": args.k, "made": len(variants)})
            for v in variants:
                rows.append({"source": source, "writer": writer, "text": text, "variant": v, **score(text, v, facts)})
        if len(examples) < 12 and facts:
            examples.append({"turn": text, "rules": paraphrases(text, args.k, seed=str(args.seed))[:2], "model": mv[:2]})
    report = {"seconds": round(time.perf_counter() - t0), "model_seconds": round(t_model), "k": args.k, "table": {}}
    print(f"\n{'source':<16} {'writer':<6} {'made/asked':>10}  useful [95% CI]     useful/asked  keeps facts  keeps content  changed")
    for source in dict.fromkeys(t[0] for t in turns):
        for writer in ("rules", "model"):
            sel = [r for r in rows if r["source"] == source and r["writer"] == writer and "useful" in r]
            asked = sum(1 for t in turns if t[0] == source) * args.k
            s = summarise(sel)
            report["table"][f"{source} / {writer}"] = {**s, "asked": asked}
            u = s["useful"]
            print(f"{source:<16} {writer:<6} {len(sel):>4}/{asked:<5}  {u['rate']:.2f} [{u['ci95'][0]:.2f}, {u['ci95'][1]:.2f}]"
                  f"   {u['passed'] / asked:.2f}          {s['keeps_facts']['rate']:.2f}         {s['keeps_content']['rate']:.2f}           "
                  f"{s['changed']['rate']:.2f}", flush=True)
    print("\nexamples (persona turns):")
    for e in examples[:6]:
        print(f"  turn:  {e['turn']}\n    rules: {e['rules']}\n    model: {e['model']}")
    print(f"\ntotal {report['seconds']} s (model generation {report['model_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps({**report, "examples": examples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

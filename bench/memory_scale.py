"""The memory index at scale (issue #18, bad input: a 100,000-conversation history): build time, query latency,
recall of planted facts, delete latency, size; and the tokenizer question for languages written without spaces.

A fresh store (real SQLCipher, `synchronous=FULL`) gets `--conversations` synthetic conversations through the
importer path (`import_into`: capture and index in one transaction per 200 conversations). Their text is
windows of real English (the shipped Dolly instructions and WikiText-2 slice), so term frequencies look like
language, not like random tokens; `--facts` conversations carry a planted fact ("my locker code is K-1234")
asked for afterwards in other words ("what was my locker code again?"). Measured:
- import (capture + index) and a rebuild of the index alone (`Store.rebuild_memory`), seconds and per second;
- recall latency (median, p95, max) over fact questions, generic questions (other Dolly instructions) and
  long pasted text, and whether the fact's own conversation comes back first (recall@1) or in the top 4;
- deleting one conversation (median of 5) and everything before a date (a tenth of the history);
- the database size, and how much of it is the index (FTS5 b-tree bytes, passage text bytes);
- spaceless scripts: Japanese and Thai facts among English distractors, found with the trigram index versus
  unicode61 alone; and what a trigram index over all the English passages would cost (time, bytes) — why
  trigram indexes only the spaceless passages.

    .venv/bin/python bench/memory_scale.py [--conversations 100000] [--facts 200] [--queries 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.capture.importers.base import ImportedConversation, ImportedMessage, ImportResult  # noqa: E402
from ownlm.store import NewMessage, Store  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402
from ownlm.store.memory import match_query, terms  # noqa: E402

GENERAL = Path(__file__).resolve().parents[1] / "src" / "ownlm" / "data" / "general"
START = 1_700_000_000
FACT_ASKS = ["what was my locker code again?", "do you remember the code of my locker?", "remind me: my locker code?"]
SPACELESS_FACTS = [  # (statement, question, the fact's word)
    ("私の犬の名前はポチです。", "私の犬の名前は何でしたか？", "ポチ"),
    ("私は京都に住んでいます。", "私はどこに住んでいますか？", "京都"),
    ("私の仕事は看護師です。", "私の仕事は何ですか？", "看護師"),
    ("ฉันชื่อสมชาย", "ฉันชื่ออะไร", "สมชาย"),
    ("แมวของฉันชื่อส้ม", "แมวของฉันชื่ออะไร", "ส้ม"),
    ("ฉันทำงานเป็นครู", "ฉันทำงานอะไร", "ครู"),
]


def corpus_words() -> list[str]:
    text = []
    for line in (GENERAL / "dolly15k_first200.jsonl").read_text().splitlines():
        row = json.loads(line)
        text += [row["instruction"], row.get("context", ""), row["response"]]
    text.append((GENERAL / "wikitext2_raw_test_4articles.txt").read_text())
    return re.findall(r"\S+", " ".join(text))


def dolly_questions() -> list[str]:
    return [json.loads(line)["instruction"] for line in (GENERAL / "dolly15k_first200.jsonl").read_text().splitlines()]


def synthetic(n: int, facts: int, rng: random.Random) -> tuple[list[ImportedConversation], dict[str, str]]:
    """n conversations of 1-3 exchanges of real-text windows; `facts` of them hold a planted locker code.
    Returns them and {external id: code} of the planted ones."""
    words = corpus_words()

    def window(lo: int, hi: int) -> str:
        k = rng.randint(lo, hi)
        i = rng.randrange(len(words) - k)
        return " ".join(words[i : i + k])

    planted = dict.fromkeys(rng.sample(range(n), facts))
    convs, codes = [], {}
    for c in range(n):
        at = float(START + c)  # one conversation a second: "before a date" selects a known share
        msgs = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            msgs += [ImportedMessage("user", window(8, 30), at), ImportedMessage("assistant", window(20, 80), at)]
        if c in planted:
            code = f"K-{rng.randrange(10**6):06d}"
            msgs[0] = ImportedMessage("user", f"Note for later: my locker code is {code}. {window(4, 12)}", at)
            codes[f"s{c}"] = code
        convs.append(ImportedConversation(external_id=f"s{c}", title=None, created_at=at, messages=msgs))
    return convs, codes


def ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1000, 2), "p95_ms": round(xs[int(0.95 * (len(xs) - 1))] * 1000, 2),
            "max_ms": round(xs[-1] * 1000, 2), "n": len(xs)}


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--facts", type=int, default=200, help="conversations with a planted fact")
    ap.add_argument("--queries", type=int, default=300, help="recall queries timed")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="ownlm-memory-scale-"))
    out: dict = {"conversations": args.conversations}
    try:
        with Store(home) as store:
            user = store.create_user("scale")
            convs, codes = synthetic(args.conversations, min(args.facts, args.conversations), rng)
            _, t = timed(import_into, store, user.id, ImportResult("jsonl", convs), "synthetic.jsonl")
            n_pass = store.memory_count(user.id)
            out["import"] = {"seconds": round(t, 1), "conversations_per_s": round(len(convs) / t), "passages": n_pass}
            print(f"import (capture + index) of {len(convs):,} conversations, {n_pass:,} passages: {t:.1f} s "
                  f"({len(convs) / t:,.0f} conversations/s)", flush=True)
            _, t = timed(store.rebuild_memory, user.id)
            out["rebuild"] = {"seconds": round(t, 1), "passages_per_s": round(n_pass / t)}
            print(f"index rebuild alone: {t:.1f} s ({n_pass / t:,.0f} passages/s)", flush=True)
            store.vacuum()
            fts = store.query("SELECT sum(length(block)) FROM memory_fts_data")[0][0] or 0
            text = store.query("SELECT sum(length(question) + length(answer)) FROM memory_passages")[0][0] or 0
            size = (home / "store.db").stat().st_size
            out["size"] = {"db_bytes": size, "fts_btree_bytes": fts, "passage_text_bytes": text}
            print(f"store {size / 2**20:,.1f} MiB; FTS5 b-tree {fts / 2**20:,.1f} MiB, passage text {text / 2**20:,.1f} MiB")
            ext = [c.external_id for c in convs]
            by_ext = dict(store.query("SELECT external_id, id FROM conversations WHERE user_id = ?", (user.id,)))
            hits1 = hits4 = 0
            lat: dict[str, list[float]] = {"fact": [], "generic": [], "long paste": []}
            facts = list(codes.items())
            generic, long_text = dolly_questions(), corpus_words()
            for i in range(args.queries):
                kind = ("fact", "generic", "long paste")[i % 3]
                if kind == "fact":
                    ext_id, _ = facts[i % len(facts)]
                    q = rng.choice(FACT_ASKS)
                elif kind == "generic":
                    q = rng.choice(generic)
                else:
                    j = rng.randrange(len(long_text) - 400)
                    q = " ".join(long_text[j : j + 400])
                found, t = timed(store.recall, user.id, q, 4)
                lat[kind].append(t)
                if kind == "fact":  # every planted conversation says "locker code": any of them is a right answer
                    ids = [p.conversation_id for p in found]
                    planted_ids = {by_ext[e] for e in codes}
                    hits1 += bool(ids) and ids[0] in planted_ids
                    hits4 += any(x in planted_ids for x in ids)
            n_fact = len(lat["fact"])
            out["recall"] = {k: ms(v) for k, v in lat.items() if v}
            out["recall"]["fact_at_1"], out["recall"]["fact_in_4"] = hits1 / max(n_fact, 1), hits4 / max(n_fact, 1)
            for k, v in lat.items():
                if v:
                    r = ms(v)
                    print(f"recall, {k} questions: median {r['median_ms']} ms, p95 {r['p95_ms']} ms, max {r['max_ms']} ms")
            print(f"a planted fact's conversation first: {hits1}/{n_fact}, in the top 4: {hits4}/{n_fact}")
            # one specific fact: its code asked for with the code's own words (the query a user would type later)
            ext_id, code = facts[0]
            found = store.recall(user.id, f"locker code {code}", 1)
            out["recall"]["exact_code_first"] = bool(found) and found[0].conversation_id == by_ext[ext_id]
            times = []
            for ext_id in rng.sample([e for e in ext if e not in codes], 5):
                _, t = timed(store.delete_data, user.id, conversation_id=by_ext[ext_id])
                times.append(t)
            res, t_before = timed(store.delete_data, user.id, before=float(START + args.conversations // 10))
            out["delete"] = {"one_conversation": ms(times), "tenth_before_date_s": round(t_before, 2),
                             "tenth_passages": res["memory_passages"]}
            print(f"delete one conversation: median {ms(times)['median_ms']} ms; a tenth of the history by date "
                  f"({res['memory_passages']:,} passages): {t_before:.1f} s", flush=True)
            out["trigram_all_english"] = trigram_cost(store)
            out["spaceless"] = spaceless(store)
            res, t_all = timed(store.delete_data, user.id)
            out["delete"]["all_s"], out["delete"]["all_passages"] = round(t_all, 2), res["memory_passages"]
            print(f"delete everything ({res['memory_passages']:,} passages): {t_all:.1f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def trigram_cost(store) -> dict:
    """What indexing every (English) passage with the trigram tokenizer would cost, in a scratch table."""
    db = store.db
    db.execute("CREATE VIRTUAL TABLE temp.tri USING fts5(question, answer, tokenize='trigram')")
    t0 = time.perf_counter()
    db.execute("INSERT INTO temp.tri(rowid, question, answer) SELECT id, question, answer FROM memory_passages")
    t = time.perf_counter() - t0
    tri = db.execute("SELECT sum(length(block)) FROM temp.tri_data").fetchone()[0] or 0
    uni = db.execute("SELECT sum(length(block)) FROM memory_fts_data").fetchone()[0] or 0
    db.execute("DROP TABLE temp.tri")
    print(f"trigram over all English passages: {t:.1f} s, {tri / 2**20:,.1f} MiB b-tree (unicode61: {uni / 2**20:,.1f} MiB)")
    return {"seconds": round(t, 1), "trigram_btree_bytes": tri, "unicode61_btree_bytes": uni}


def spaceless(store) -> dict:
    """Japanese and Thai facts among the English history: recall@1 with the trigram index, and unicode61 alone."""
    user = store.create_user("spaceless")
    for i, (statement, _, _) in enumerate(SPACELESS_FACTS):
        store.capture(user.id, [NewMessage("user", statement), NewMessage("assistant", "はい / ครับ")],
                      source="bench", seed=f"sp{i}")
    for i in range(200):  # distractors: other spaceless chatter and English
        store.capture(user.id, [NewMessage("user", f"今日は{i}時に駅で会いましょう"), NewMessage("assistant", "OK")],
                      source="bench", seed=f"d{i}")
        store.capture(user.id, [NewMessage("user", f"note {i}: buy bread"), NewMessage("assistant", "ok")],
                      source="bench", seed=f"e{i}")
    with_tri = alone = 0
    for statement, question, word in SPACELESS_FACTS:
        found = store.recall(user.id, question, 1)
        with_tri += bool(found) and word in found[0].question
        words, grams = terms(question)
        q = match_query(words + grams)  # what unicode61 alone could be asked (its tokens are whole runs)
        rows = store.query("SELECT p.question FROM memory_fts f JOIN memory_passages p ON p.id = f.rowid WHERE"
                           " memory_fts MATCH ? AND p.user_id = ? ORDER BY f.rank LIMIT 1", (q, user.id)) if q else []
        alone += bool(rows) and word in rows[0][0]
    n = len(SPACELESS_FACTS)
    print(f"spaceless facts (Japanese, Thai) found first: trigram {with_tri}/{n}, unicode61 alone {alone}/{n}")
    return {"trigram_at_1": with_tri, "unicode61_at_1": alone, "n": n}


if __name__ == "__main__":
    main()

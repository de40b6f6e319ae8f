"""Knowledge augmentation (learn/augment.py, learn/paraphrase.py) on the real export fixtures and per rule."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from ownlm.capture.importers import parse_file
from ownlm.learn.augment import KINDS, augment, exchanges, reorder_variant
from ownlm.learn.dataset import BuiltDataset, DatasetConfig, Example, build, check_augmentation, config_dict
from ownlm.learn.merkle import merkle_root, prove, verify
from ownlm.learn.paraphrase import _options, is_english, paraphrases, parse, rewrites, untouchable
from ownlm.store import Store
from tests.conftest import FIXTURES, REPO, run_cli

EXPORTS = FIXTURES / "exports"
OFF = dict(paraphrases=0, context_variants=False, reorder_variants=False)


def export_conversations() -> dict[str, list[dict]]:
    """Every conversation of every export fixture, as the store's training_view returns them (bench/common.py)."""
    conversations = {}
    for path in sorted(p for p in EXPORTS.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")):
        for i, c in enumerate(parse_file(path).conversations):
            rows, parent = [], None
            for j, m in enumerate(c.messages):
                rows.append({"id": f"{path.stem}-{i}-{j}", "parent_id": parent, "role": m.role, "content": m.content})
                parent = rows[-1]["id"]
            conversations[f"{path.parent.name}/{path.stem}/{i:03d}"] = rows
    return conversations


def tokenizer_dir() -> str:
    """For the subprocess below: the embedded base's tokenizer, as the session fixture converted it."""
    return os.environ["AUG_TOKENIZER"]


@pytest.fixture(scope="module")
def tokenizer(embedded_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_checkpoint))


@pytest.fixture(scope="module")
def convs():
    c = export_conversations()
    assert len(c) > 100  # the fixtures are there: nothing below is vacuous
    return c


@pytest.fixture(scope="module")
def built(convs, tokenizer) -> BuiltDataset:
    return build(convs, {}, tokenizer, DatasetConfig())


@pytest.fixture(scope="module")
def plain(convs, tokenizer) -> BuiltDataset:
    return build(convs, {}, tokenizer, DatasetConfig(**OFF))


def sources(b: BuiltDataset) -> dict[str, Example]:
    return {e.sha256: e for e in b.examples if not e.augmented}


def last_user(msgs: list[dict]) -> int:
    """The last user turn's index; -1 in a window without one (a conversation that opens with a reply)."""
    return max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)


# ------------------------------------------------------------------ build() on the real exports


def test_every_kind_is_made_and_counted(built):
    kinds = Counter(e.augmentation for e in built.examples if e.augmented)
    assert set(kinds) == set(KINDS) and all(kinds[k] > 0 for k in KINDS)
    assert all(built.stats[f"examples_augmented_{k}"] == kinds[k] for k in KINDS)
    assert built.stats["examples_augmented"] == sum(kinds.values())
    assert built.stats["augmented_duplicates_removed"] > 0  # the fastchat fixture repeats its questions
    assert len({e.sha256 for e in built.examples}) == len(built.examples)  # dedup still applies


def test_determinism_across_processes(built, convs, tokenizer, embedded_checkpoint):
    again = build(convs, {}, tokenizer, DatasetConfig())
    assert [e.sha256 for e in again.examples] == [e.sha256 for e in built.examples]
    # another interpreter with another hash seed (set order, dict order of str keys) gives the same root
    code = ("from transformers import AutoTokenizer; from ownlm.learn.dataset import DatasetConfig, build; "
            "from tests.test_augment import export_conversations, tokenizer_dir; "
            "print(build(export_conversations(), {}, AutoTokenizer.from_pretrained(tokenizer_dir()), DatasetConfig()).merkle_root)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "AUG_TOKENIZER": str(embedded_checkpoint)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == built.merkle_root


def test_sources_are_train_examples_and_heldout_is_never_augmented(built):
    src = sources(built)
    augmented = [e for e in built.examples if e.augmented]
    assert augmented
    for e in augmented:
        assert e.split == "train" and e.augmentation in KINDS
        assert src[e.source_sha256].split == "train" and e.conversation_id == src[e.source_sha256].conversation_id
    held = built.split("heldout")
    assert held and not any(e.augmented or e.augmentation or e.source_sha256 for e in held)
    assert not {e.source_sha256 for e in augmented} & {e.sha256 for e in held}


def test_heldout_split_and_originals_are_the_same_without_augmentation(built, plain):
    assert not any(e.augmented for e in plain.examples)
    assert [e.sha256 for e in built.split("heldout")] == [e.sha256 for e in plain.split("heldout")]
    assert [e.sha256 for e in built.examples if not e.augmented] == [e.sha256 for e in plain.examples]
    assert built.stats["examples_train"] == plain.stats["examples_train"]


def test_variants_differ_from_their_source_and_keep_its_reply(built):
    src = sources(built)
    for e in (e for e in built.examples if e.augmented):
        s = src[e.source_sha256]
        assert e.messages != s.messages
        final, source_final = e.messages[-1], s.messages[-1]
        assert final["role"] == "assistant" and final["target"] and final["content"] == source_final["content"]
        i, j = last_user(e.messages), last_user(s.messages)
        if e.augmentation == "context":
            assert e.messages == s.messages[j:]
        elif e.augmentation == "paraphrase":  # only the question changed
            assert i == j and e.messages[i]["content"] != s.messages[j]["content"]
            assert [m["content"] for k, m in enumerate(e.messages) if k != i] == \
                   [m["content"] for k, m in enumerate(s.messages) if k != j]


def test_reorder_variant_has_only_the_final_reply_as_target(built):
    src = sources(built)
    reordered = [e for e in built.examples if e.augmentation == "reorder"]
    assert reordered
    for e in reordered:
        s = src[e.source_sha256]
        assert [m["target"] for m in e.messages] == [False] * (len(e.messages) - 1) + [True]
        assert sum(m["target"] for m in s.messages) >= 1
        j = last_user(s.messages)
        assert e.messages[last_user(e.messages):] == [dict(m, target=m is s.messages[-1]) for m in s.messages[j:]]
        # the same exchanges, in another order
        key = lambda ms: sorted(json.dumps([(m["role"], m["content"]) for m in ex]) for ex in exchanges(ms)[1])  # noqa: E731
        assert key(e.messages[: last_user(e.messages)]) == key(s.messages[:j])
        assert e.messages[: last_user(e.messages)] != [dict(m, target=False) for m in s.messages[:j]]


def test_pasted_code_urls_and_long_turns_get_no_paraphrase(built, convs):
    src = sources(built)
    paraphrased = {e.source_sha256 for e in built.examples if e.augmentation == "paraphrase"}
    reasons = Counter()
    for e in built.split("train"):
        if e.augmented:
            continue
        if last_user(e.messages) < 0:
            continue
        why = untouchable(e.messages[last_user(e.messages)]["content"])
        if why:
            reasons[why] += 1
            assert e.sha256 not in paraphrased
    assert {"code", "multiline"} <= set(reasons)  # the fixtures hold both as last turns: the check bites
    # every user turn of the exports that is a paste (the long ones too) gets no variant at all
    pasted = [m["content"] for rows in convs.values() for m in rows if m["role"] == "user" and untouchable(m["content"])]
    assert {"code", "multiline", "long"} <= {untouchable(t) for t in pasted}
    assert all(paraphrases(t, 5, "s") == [] for t in pasted)
    # and what was pasted earlier in a window stays verbatim in its paraphrases (only the last turn changes)
    assert any(untouchable(m["content"]) for h in paraphrased for m in src[h].messages[:-2])


def test_non_english_turns_get_only_neutral_rules(built):
    src = sources(built)
    seen = 0
    for e in (e for e in built.examples if e.augmentation == "paraphrase"):
        before = src[e.source_sha256].messages[last_user(e.messages)]["content"]
        after = e.messages[last_user(e.messages)]["content"]
        if not is_english(before):
            seen += 1
            strip = lambda t: "".join(c for c in t if c.isalnum()).casefold()  # noqa: E731
            assert strip(after) == strip(before), (before, after)  # no English words added or removed
    assert seen  # the llamafactory fixture's Chinese turns


def test_rules_copy_the_words_that_carry_meaning(convs):
    """On every English user turn of the exports and of the persona fixtures, a variant adds or drops only the
    rules' own words (openers, wrappers, frames, contraction parts): the rest is the user's, verbatim."""
    import ownlm.learn.paraphrase as pp
    from ownlm.evaluate.personas.fixtures import DATA_DIR

    frame = set(re.findall(r"[a-z]+", " ".join([
        pp._GREET, pp._FILLER, pp._OUTER.pattern, pp._INNER.pattern, " ".join(sum(pp._ADD_OPENERS.values(), [])),
        "what which where who how is are am do does did can could would should will i you me my your it the a to of",
        "on about for please thanks remind remember know tell best way take advice tips any got not cannot again",
        "s m re ll ve d t don doesn didn isn aren wasn shouldn couldn wouldn haven hasn won"]).lower()))
    texts = {m["content"] for rows in convs.values() for m in rows if m["role"] == "user"}
    texts |= {m.content for p in sorted(DATA_DIR.glob("*.jsonl")) for c in parse_file(p).conversations
              for m in c.messages if m.role == "user"}
    words = lambda t: set(re.findall(r"[a-z0-9]+", t.lower()))  # noqa: E731
    checked = 0
    for text in sorted(t for t in texts if is_english(t)):
        for variant in paraphrases(text, 5, "s"):
            checked += 1
            assert not (words(text) ^ words(variant)) - frame, (text, variant)
    assert checked > 2000


def test_merkle_root_covers_the_augmented_examples(built, plain):
    assert built.merkle_root != plain.merkle_root
    leaves = [e.sha256 for e in built.examples]
    assert built.merkle_root == merkle_root(leaves)
    for kind in KINDS:
        i = next(k for k, e in enumerate(built.examples) if e.augmentation == kind)
        assert verify(prove(leaves, i), built.merkle_root)


def test_store_round_trip_of_source_and_kind(home, built):
    with Store(home) as s:
        u = s.create_user("me")
        ds = s.save_dataset(u.id, built, config_dict(built.config))
        rows = s.dataset_examples(u.id, ds)
        assert [(r["sha256"], r["split"], r["augmented"], r["source_sha256"], r["augmentation"]) for r in rows] == \
               [(e.sha256, e.split, e.augmented, e.source_sha256, e.augmentation) for e in built.examples]
        assert s.dataset_info(u.id, ds)["config"]["paraphrases"] == 3
        assert verify(prove([r["sha256"] for r in rows], len(rows) - 1), s.dataset_info(u.id, ds)["merkle_root"])


def test_migration_marks_old_augmented_rows_as_context(home):
    from ownlm.store.migrations import m009_augmentation

    with Store(home) as s:
        u = s.create_user("me")
        # back to the schema before the migration, with rows as the old code wrote them
        for sql in ("ALTER TABLE dataset_examples DROP COLUMN source_sha256",
                    "ALTER TABLE dataset_examples DROP COLUMN augmentation",
                    f"DELETE FROM _migrations WHERE name = '{m009_augmentation.__name__}'"):
            s.db.execute(sql)
        s.db.execute("INSERT INTO datasets (id, user_id, created_at, merkle_root, n_train, n_heldout, config, stats)"
                     " VALUES ('ds_old', ?, 0, 'ab', 2, 0, '{}', '{}')", (u.id,))
        s.db.execute("INSERT INTO dataset_examples (dataset_id, idx, split, augmented, conversation_id, sha256, messages)"
                     " VALUES ('ds_old', 0, 'train', 0, 'c', 'aa', NULL), ('ds_old', 1, 'train', 1, 'c', 'bb', NULL)")
    with Store(home) as s:
        assert s.migrations_applied == [m009_augmentation.__name__]
        rows = s.dataset_examples(u.id, "ds_old")
        assert [(r["augmentation"], r["source_sha256"]) for r in rows] == [(None, None), ("context", None)]


def test_build_refuses_an_augmented_heldout_example():
    train = Example("a", [{"role": "user", "content": "q", "target": False},
                          {"role": "assistant", "content": "r", "target": True}], "train")
    check_augmentation([train, Example("a", train.messages[:1] + train.messages[1:], "train", True, train.sha256, "context")])
    with pytest.raises(AssertionError, match="heldout"):
        check_augmentation([train, Example("b", train.messages, "heldout", True, train.sha256, "paraphrase")])
    with pytest.raises(AssertionError, match="no train source"):
        check_augmentation([train, Example("a", train.messages, "train", True, "0" * 64, "paraphrase")])


def test_paraphrases_setting(convs, tokenizer, built):
    one = build(convs, {}, tokenizer, DatasetConfig(paraphrases=1))
    n1, n3 = one.stats["examples_augmented_paraphrase"], built.stats["examples_augmented_paraphrase"]
    assert 0 < n1 < n3 <= 3 * built.stats["examples_train"]
    off = build(convs, {}, tokenizer, DatasetConfig(paraphrases=0))
    assert off.stats["examples_augmented_paraphrase"] == 0 and off.stats["examples_augmented_reorder"] > 0
    from ownlm.errors import ConfigError

    with pytest.raises(ConfigError, match="paraphrases"):
        DatasetConfig(paraphrases=-1)
    from ownlm.cli.dataset import dataset_build

    cli_default = next(p.default for p in dataset_build.params if p.name == "paraphrases")
    assert cli_default == DatasetConfig().paraphrases  # the CLI builds what the loop builds


def test_cli_builds_with_paraphrases_and_prints_the_counts(home, model_cache_home, tmp_path):
    import shutil

    shutil.copytree(model_cache_home / "cache", home / "cache")  # the tokenizer, not the model
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"what's my favourite number {i}?"}, {"role": "assistant", "content": f"it is {i}"},
        {"role": "user", "content": f"how do I count to {i}?"}, {"role": "assistant", "content": f"one by one up to {i}"},
        {"role": "user", "content": f"remind me what my number {i} is"}, {"role": "assistant", "content": f"{i}"}]})
        for i in range(30)))
    assert run_cli("import", str(chats)).returncode == 0
    r = run_cli("dataset", "build", "--paraphrases", "2", "--no-reorder")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("augmented:"))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (context|paraphrase|reorder)", line)}
    assert counts["paraphrase"] > 0 and counts["context"] > 0 and counts["reorder"] == 0
    with Store(home) as s:
        uid = s.query("SELECT id FROM users")[0][0]  # the one user the import made
        rows = s.dataset_examples(uid, s.dataset_info(uid)["id"])
    assert Counter(r["augmentation"] for r in rows if r["augmented"])["paraphrase"] == counts["paraphrase"]
    assert run_cli("dataset", "build", "--paraphrases", "17").returncode != 0  # out of range, said so by click


# ------------------------------------------------------------------ the rules, one family at a time


def options(family: str, text: str) -> set[str]:
    english = is_english(text)
    return {o.text() for o in _options(family, parse(text, english), english)}


def test_rule_opener_strips_and_adds():
    assert "What's my cat's name?" in options("opener", "Before I forget: what's my cat's name?")
    assert "What are you able to do?" in options("opener", "Hello what are you able to do?")
    assert "how do I roll back?" in options("opener", "quick question: how do I roll back?")
    assert "what should I do on saturday?" in options("opener", "thanks. next: what should I do on saturday?")
    assert "Btw, how do I roll back?" in options("opener", "How do I roll back?")
    assert "hey, how do I roll back?" in options("opener", "how do I roll back?")
    # a greeting is only an opener when punctuation or a question follows: "hi there" keeps its "hi"
    assert not any(o.lower().startswith("there") for o in options("opener", "hi there"))
    assert not any(o.startswith("So And") for o in options("opener", "And if that fails?"))
    assert not any(o.lower().startswith(("known", "fi ")) for t in ("Well-known authors?", "hi-fi speakers?")
                   for o in options("opener", t))


def test_rule_polite_wrappers():
    assert "where do I live?" in options("polite", "could you tell me where I live?")
    assert "could you tell me what my job is?" in options("polite", "what's my job?")
    assert "plan my weekend." in options("polite", "plan my weekend, please.")
    assert "Could you plan my weekend?" in options("polite", "Plan my weekend.")
    assert "what is my job? thanks!" in options("polite", "what is my job?")
    assert "How do I fix a slow laptop?" in options("polite", "How do I fix a slow laptop? asking for myself.")
    assert options("polite", "I fell off my bike today.") == set()  # a statement needs no "thanks"


def test_rule_contractions():
    assert "what is my job?" in options("contraction", "what's my job?")
    assert "I am hungry, what can I make?" in options("contraction", "I'm hungry, what can I make?")
    assert "I don't know what it is." in options("contraction", "I do not know what it is.")  # never "what it's"
    assert "Where’s my cat?" in options("contraction", "Where is my cat?") or \
           "Where's my cat?" in options("contraction", "Where is my cat?")
    assert "what is wrong with it?" in options("contraction", "what’s wrong with it?")  # curly apostrophe
    assert "what's happened?" not in options("contraction", "what's happened?") and \
           "what is happened?" not in options("contraction", "what's happened?")  # that 's is "has"
    assert "you cannot be serious" in options("contraction", "you can't be serious")


def test_rule_question_imperative_reforms():
    assert "What is my job?" in options("reform", "Remind me what my job is.")
    assert "remind me what my job is." in options("reform", "what is my job?")
    assert "do you remember my job?" in options("reform", "what is my job?")
    assert "do you remember my cat's name?" in options("reform", "what's my cat's name?")
    assert "what is my cat's name?" in options("reform", "do you remember my cat's name?")
    assert {"what's the best way to roll back the deploy?", "how should I roll back the deploy?"} <= \
           options("reform", "how do I roll back the deploy?")
    assert "What do you know about Gallium" in options("reform", "Tell me about Gallium")  # no mark: none added
    assert "What do you know about Gallium?" in options("reform", "Tell me about Gallium.")
    assert "Explain how photosynthesis works." in options("reform", "Can you explain how photosynthesis works?")
    assert "where do I live again" in options("reform", "remind me where I live again")
    assert "what am I into?" in options("reform", "remind me what I'm into.")
    assert options("reform", "I fell off my bike today.") == set()


def test_rule_case_and_punctuation():
    assert options("case", "What is my job?") == {"what is my job?"}
    assert options("case", "what is my job?") == {"What is my job?"}
    assert options("case", "Paris is lovely") == set() and options("case", "I lost my book") == set()
    assert options("punctuation", "what is my job?") == {"what is my job"}
    assert options("punctuation", "plan my weekend") == {"plan my weekend.", "plan my weekend!"}
    assert options("punctuation", "他是谁？") == {"他是谁?", "他是谁"} and options("case", "他是谁？") == set()


def test_untouchable_turns():
    assert untouchable("fix this:\n```py\nprint(1)\n```") == "multiline"
    assert untouchable("why does `ls -la` hang?") == "code"
    assert untouchable("summarise https://example.org/post for me") == "code"
    assert untouchable("what does my_var = 3 do?") == "code"
    assert untouchable("is x = f(y) right?") == "code"
    assert untouchable("<image>Who are they?") == "code"
    assert untouchable(" ".join(["word"] * 61)) == "long" and untouchable(" ".join(["word"] * 60)) is None
    assert untouchable("   ") == "empty" and untouchable("what's my job?") is None
    assert paraphrases("why does `ls -la` hang?", 3) == []


def test_language_detection():
    assert is_english("what's my cat called?") and is_english("Tell me about Gallium")
    assert not is_english("他为什么在地上？") and not is_english("Wie spät ist es heute?")
    assert not is_english("¿Dónde está mi gato?") and not is_english("12 * 17")


def test_paraphrases_are_deterministic_distinct_and_use_two_rules():
    texts = ["Before I forget: what's my cat's name?", "how do I clean a cast-iron pan?", "Tell me about Iron",
             "remind me what my job is.", "plan my weekend, please.", "What's the weather in Paris?"]
    for text in texts:
        got = rewrites(text, 5, "seed")
        assert got == rewrites(text, 5, "seed") and len(got) == 5, text
        variants = [v for v, _ in got]
        assert len(set(variants)) == 5 and text not in variants
        assert all(len(rules) >= 2 for _, rules in got), got
    assert rewrites(texts[0], 5, "seed") != rewrites(texts[0], 5, "other")  # the seed is what varies them
    # a text without case or English admits one family only (punctuation), and fewer variants than asked
    assert [r for _, r in rewrites("他为什么在地上？", 3, "s")] == [("punctuation",)] * 2


def test_augment_of_one_window():
    w = [{"role": "system", "content": "be brief", "target": False}]
    for i in range(3):
        w += [{"role": "user", "content": f"what's my number {i}?", "target": False},
              {"role": "assistant", "content": f"{i}", "target": True}]
    out = augment(w, source_sha256="ab" * 32, paraphrases=2)
    assert [v.kind for v in out] == ["context", "paraphrase", "paraphrase", "reorder"]
    assert out == augment(w, source_sha256="ab" * 32, paraphrases=2)
    r = out[-1].messages
    assert r[0] == dict(w[0]) and [m["content"] for m in r[1:5]] == ["what's my number 1?", "1", "what's my number 0?", "0"]
    assert reorder_variant(w[:5], "s") is None  # one earlier exchange: nothing to reorder
    assert [v.kind for v in augment(w[1:3], source_sha256="cd" * 32, paraphrases=0)] == []

"""Persona fixtures: reproducible, distinct, consistently styled, importable, and probed only with held-out
phrasings (so a personalization score measures generalisation, not memorisation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from statistics import median

import pytest

from ownlm.evaluate.personas import fixtures as P
from ownlm.capture.importers import parse_file
from ownlm.evaluate.personas.fixtures import PERSONAS, Persona, check_answer, generate, probes

from .conftest import REPO

NAMES = sorted(PERSONAS)


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[list[dict]]]:
    """The committed training conversations, read back from the package data."""
    out = {}
    for name in NAMES:
        lines = (P.DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        out[name] = [json.loads(line)["messages"] for line in lines]
    return out


def _texts(conversations: list[list[dict]], role: str) -> list[str]:
    return [m["content"] for c in conversations for m in c if m["role"] == role]


def _word_runs(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_generate_is_deterministic_and_seeded():
    mira = PERSONAS["mira"]
    assert generate(mira, 50, seed=3) == generate(mira, 50, seed=3)
    assert generate(mira, 50, seed=3) != generate(mira, 50, seed=4)
    # The first conversations do not depend on how many are asked for.
    assert generate(mira, 10, seed=3) == generate(mira, 50, seed=3)[:10]


def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_personas.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in P.DATA_DIR.iterdir())
    assert written == sorted(f"{n}{s}" for n in NAMES for s in (".jsonl", ".probes.json"))
    for name in written:
        same = (tmp_path / name).read_bytes() == (P.DATA_DIR / name).read_bytes()
        assert same, f"{name} drifted from scripts/make_personas.py; rerun it and commit"


def test_shipped_files_are_small_and_hold_300_conversations(shipped):
    for name in NAMES:
        assert (P.DATA_DIR / f"{name}.jsonl").stat().st_size < 300_000
        assert len(shipped[name]) == P.DEFAULT_CONVERSATIONS


def test_three_distinct_personas(shipped):
    assert len(PERSONAS) >= 3
    people = list(PERSONAS.values())
    for key in ("name", "city", "job", "pet_name", "language", "diet", "hobby"):
        assert len({p.facts[key] for p in people}) == len(people), f"two personas share their {key}"
    assert len({p.style for p in people}) == len(people)
    assert len({t.name for p in people for t in p.topics}) == sum(len(p.topics) for p in people)
    # Styles tell the personas apart: no answer of one persona passes another persona's style check.
    for p in people:
        for other in people:
            if other is not p:
                passing = [a for a in _texts(shipped[p.name], "assistant") if check_answer(other.style_check, a)]
                assert not passing, f"{p.name} answers look like {other.name}'s: {passing[:2]}"


@pytest.mark.parametrize("name", NAMES)
def test_every_training_answer_is_in_the_persona_style(shipped, name):
    persona = PERSONAS[name]
    answers = _texts(shipped[name], "assistant")
    bad = [a for a in answers if not check_answer(persona.style_check, a)]
    assert not bad, f"{len(bad)} answers break {name}'s style, e.g. {bad[0]!r}"
    # Short answers (15-60 words typically), as the brief for the fixtures asks.
    assert 15 <= median(len(a.split()) for a in answers) <= 60


def test_conversations_alternate_user_and_assistant_for_one_to_four_exchanges(shipped):
    everyone = []
    for name in NAMES:
        lengths = []
        for conversation in shipped[name]:
            roles = [m["role"] for m in conversation]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
            assert all(m["content"].strip() for m in conversation)
            lengths.append(len(roles) // 2)
        assert set(lengths) == {1, 2, 3, 4}
        # mira's terse answers come in longer sessions (persona_cast), so per persona the bar is lower.
        assert sum(n <= 2 for n in lengths) >= 0.4 * len(lengths), name
        everyone += lengths
    assert sum(n <= 2 for n in everyone) >= 0.5 * len(everyone)  # mostly short chats


@pytest.mark.parametrize("name", NAMES)
def test_fact_probe_answers_are_learnable_from_training(shipped, name):
    said = " ".join(_texts(shipped[name], "assistant")).lower()
    fact_probes = [p for p in probes(PERSONAS[name]) if p.kind == "fact"]
    assert {p.fact for p in fact_probes} >= {"name", "city", "job", "pet_name", "language", "diet", "hobby"}
    for probe in fact_probes:
        assert any(v.lower() in said for v in probe.check["values"]), f"{probe.fact} never appears in training"


def test_probe_templates_are_disjoint_from_training_templates():
    train = {t.lower() for t in P.training_templates()}
    probe = {t.lower() for t in P.probe_templates()}
    assert not train & probe
    train_runs = set().union(*(_word_runs(t) for t in train))
    for template in probe:
        shared = _word_runs(template) & train_runs
        assert not shared, f"probe template shares 5 words in a row with training: {template}"


@pytest.mark.parametrize("name", NAMES)
def test_no_probe_question_or_five_word_run_of_one_appears_in_training(shipped, name):
    user_turns = _texts(shipped[name], "user")
    joined = "\n".join(user_turns).lower()
    runs = set().union(*(_word_runs(u) for u in user_turns))
    for probe in probes(PERSONAS[name]):
        assert probe.question.lower() not in joined
        assert not _word_runs(probe.question) & runs, f"training repeats part of the probe {probe.question!r}"


@pytest.mark.parametrize("name", NAMES)
def test_probe_files_hold_serialisable_checks_that_discriminate(shipped, name):
    persona = PERSONAS[name]
    doc = json.loads((P.DATA_DIR / f"{name}.probes.json").read_text(encoding="utf-8"))
    assert doc["persona"]["facts"] == persona.facts
    assert doc["probes"] == [p.to_dict() for p in probes(persona)]
    kinds = {p["kind"] for p in doc["probes"]}
    assert kinds == {"fact", "style"}
    base_like = "Sure! Here are a few ideas you could try. Let me know if you need anything else."
    a_training_answer = _texts(shipped[name], "assistant")[0]
    for probe in doc["probes"]:
        assert not check_answer(probe["check"], base_like), probe["question"]
        if probe["kind"] == "fact":
            assert check_answer(probe["check"], f"That would be {persona.facts[probe['fact']]}.")
        elif probe["family"] == "style_probe":
            assert check_answer(probe["check"], a_training_answer)
    if persona.style == "ahoy":  # the metric-units probes
        units = [p for p in doc["probes"] if p["family"] == "unit_probe"]
        assert units and all(check_answer(p["check"], "Ahoy! About 180 cm, or 1.8 m.") for p in units)
        assert not any(check_answer(p["check"], "Ahoy! About 6 feet, so 72 inches.") for p in units)


def test_check_answer_spec():
    assert check_answer({"type": "contains_any", "values": ["Tampere", "x"]}, "you live in tampere")
    assert not check_answer({"type": "contains_all", "values": ["a", "zz"]}, "a b c")
    assert check_answer({"type": "regex", "pattern": r"^\s*1\."}, "  1. one")
    assert check_answer({"type": "max_words", "value": 2}, "two words")
    assert check_answer({"type": "not", "check": {"type": "regex", "pattern": "[A-Z]"}}, "lower only — ok")
    either = {"type": "any", "checks": [{"type": "regex", "pattern": "q"}, {"type": "max_words", "value": 9}]}
    assert check_answer(either, "x")
    assert not check_answer(P.STYLES["ahoy"]["check"], "Ahoy! It is 5 miles away.")
    assert check_answer(P.STYLES["ahoy"]["check"], "Ahoy! It is 8 km away, about 5 minutes by car.")
    with pytest.raises(ValueError, match="unknown check"):
        check_answer({"type": "nope"}, "x")


def test_persona_validation_names_the_bad_value():
    mira = PERSONAS["mira"]
    with pytest.raises(ValueError, match="lacks facts"):
        Persona("x", {"name": "X"}, "terse", mira.topics)
    with pytest.raises(ValueError, match="unknown style 'shouty'"):
        Persona("x", mira.facts, "shouty", mira.topics)
    with pytest.raises(ValueError, match="n_conversations"):
        generate(mira, -1)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_jsonl_imports_unchanged(shipped, name):
    result = parse_file(P.DATA_DIR / f"{name}.jsonl")
    assert result.format == "openai_jsonl"
    assert not result.bad
    assert len(result.conversations) == P.DEFAULT_CONVERSATIONS
    first = result.conversations[0]
    assert [(m.role, m.content) for m in first.messages] == [(m["role"], m["content"]) for m in shipped[name][0]]


def test_hundred_conversations_are_15k_to_40k_tokens(shipped, embedded_checkpoint):
    """The size a training run plans for, with the real SmolLM2 chat template (incl. its default system turn)."""
    from transformers import AutoTokenizer

    from ownlm.learn.tokens import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_checkpoint))
    for name in NAMES:
        total = sum(len(tokenize_chat(tokenizer, c)[0]) for c in shipped[name][:100])
        assert 15_000 <= total <= 40_000, f"{name}: {total} tokens in 100 conversations"

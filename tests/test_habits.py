"""The user's reply habits (evaluate/habits.py) and the quality gate's behaviour check built on them."""

from __future__ import annotations

import json

from ownlm.basemodel import load_base
from ownlm.bitdelta import load_delta
from ownlm.capture.importers import parse_file
from ownlm.engine.torch_engine import TorchEngine
from ownlm.evaluate.gate import BEHAVIOUR_TOKENS_ENDING, behaviour_check, behaviour_prompts
from ownlm.evaluate.habits import Habit, habit_rate, habits
from ownlm.evaluate.metrics import delta_applied
from ownlm.evaluate.personas.fixtures import DATA_DIR
from ownlm.learn.dataset import Example
from ownlm.loop import run_job
from ownlm.settings import load_settings
from ownlm.store import Store
from ownlm.store.imports import import_into
from tests.test_loop import loop_settings, persona_file

EXPORTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "exports"


def replies_of(path) -> list[str]:
    return [m.content for c in parse_file(path).conversations for m in c.messages if m.role == "assistant"]


def test_each_persona_has_its_own_habit_found_from_its_replies_alone():
    found = {}
    for name in ("bram", "mira", "chiara"):
        rows = [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines()]
        found[name] = habits([m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"])
    assert found["bram"] == [Habit("opening", "Ahoy!", 1.0)]
    assert found["mira"] == [Habit("closing", "— ok", 1.0)]
    assert found["chiara"] == [Habit("final", "?", 1.0)]


def test_real_exports_without_a_shared_shape_have_no_habit():
    # ordinary assistant replies (1,000 ShareGPT turns, a ChatGPT export): no check is forced on such a user
    assert habits(replies_of(EXPORTS / "sharegpt" / "fastchat-dummy-conversation.json")) == []
    assert habits(replies_of(EXPORTS / "chatgpt" / "chatgpt2graph-code-interpreter.json")) == []


def test_too_few_replies_punctuation_and_list_numbers_are_not_habits():
    assert habits(["Ahoy! a"] * 9) == []  # too little evidence
    assert habits([f"{w} number {i}." for i, w in enumerate(["One", "Two", "Six", "Ten"] * 5)]) == [], "a final '.' is what every reply has"
    numbered = [f"1. {w} {i}\n2. more {i}" for i, w in enumerate(["Salt", "Pepper", "Oil", "Rice"] * 5)]
    assert all(h.kind != "opening" for h in habits(numbered)), "'1.' is a list shape, not a phrase"
    mixed = ["Ahoy! x"] * 5 + [f"{w} {i}" for i, w in enumerate(["Sure", "Yes", "Well", "No", "Maybe"] * 2)]
    assert habits(mixed) == [], "a third of the replies is not a habit"


def test_habit_rate_counts_answers_that_show_it():
    h = Habit("closing", "— ok", 1.0)
    assert habit_rate(h, ["fine — ok", "fine — ok  ", "fine", "ok"]) == 0.5
    assert habit_rate(Habit("opening", "Ahoy!", 1.0), ["  Ahoy! there", "ahoy! no"]) == 0.5
    assert habit_rate(h, []) == 0.0


def test_behaviour_prompts_take_held_out_contexts_and_non_augmented_replies():
    train = [Example("c1", [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"Ahoy! {i}",
                                                                 "target": True}], "train") for i in range(12)]
    train.append(Example("c2", [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "no habit", "target": True}], "train", augmented=True))
    held = [Example("h1", [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "Ahoy! hi",
                                                                   "target": True}], "heldout")]
    found, prompts = behaviour_prompts(train, held)
    assert found == [Habit("opening", "Ahoy!", 1.0)]
    assert prompts == [[{"role": "user", "content": "hello?"}]]


def test_gate_refuses_a_round_whose_answers_do_not_show_the_users_habit(home, tiny_base, tmp_path):
    # The tiny random model cannot learn "Ahoy!" in 3 steps: NLL may fall, but a person would see the base.
    settings = loop_settings(tiny_base, gate_behaviour=True)
    with Store(home) as store:
        user = store.create_user("bram")
        import_into(store, user.id, parse_file(persona_file(tmp_path, 0, 40)), "bram")
        job = run_job(store, settings, store.enqueue_job(user.id, "round"))
        assert job["state"] == "refused"
        assert "Ahoy!" in job["reason"] and "held-out prompts" in job["reason"]
        check = job["result"]["behaviour"]
        assert check["passed"] is False and check["habits"][0]["personal"] == 0.0
        assert store.active_model(user.id) is None


def test_behaviour_check_on_real_answers_of_the_tiny_model_sees_its_loops(tiny_base, tiny_delta):
    # Real greedy generation: the random fixture delta makes the tiny model repeat one piece ("allionallion…");
    # whatever such an answer starts with, the check refuses it for looping more than the base.
    base = load_base(load_settings(base=str(tiny_base), device="cpu"))
    delta = load_delta(tiny_delta / "delta", expect_base_sha256=base.sha256)
    prompts = [[{"role": "user", "content": q}] for q in ("How do I boil an egg?", "Name a colour.", "Why is it dark?")]
    with delta_applied(base.model, delta, base.sha256):
        personal = TorchEngine(base).greedy_batch(prompts, 80)
    opening = personal[0][:4]
    out = behaviour_check(base, delta, [Habit("opening", opening, 1.0)], prompts, min_rate=0.0)
    assert out["degenerate"]["personal"] == 3 > out["degenerate"]["base"]
    assert not out["passed"] and out["habits"][0]["personal"] == 0.0  # looping answers show no habit
    assert behaviour_check(base, delta, [], prompts, min_rate=0.0) == {"habits": [], "passed": True, "problems": []}


def test_behaviour_check_passes_a_habit_shown_more_often_than_by_the_base(tiny_base, tiny_delta, monkeypatch):
    base = load_base(load_settings(base=str(tiny_base), device="cpu"))
    delta = load_delta(tiny_delta / "delta", expect_base_sha256=base.sha256)
    answers = iter([["Sure, here.", "Ahoy! fine."], ["Ahoy! here you go.", "Ahoy! sure thing."]])  # base, personal
    monkeypatch.setattr(TorchEngine, "greedy_batch", lambda self, prompts, n, **kw: next(answers))
    prompts = [[{"role": "user", "content": "q"}]] * 2
    ok = behaviour_check(base, delta, [Habit("opening", "Ahoy!", 1.0)], prompts, min_rate=0.0)
    assert ok["passed"] and ok["habits"][0]["base"] == 0.5 and ok["habits"][0]["personal"] == 1.0
    answers = iter([["Sure, here.", "Ahoy! fine."], ["Ahoy! here you go.", "No."]])
    floor = behaviour_check(base, delta, [Habit("opening", "Ahoy!", 1.0)], prompts, min_rate=0.75)
    assert not floor["passed"] and "need at least 75%" in floor["problems"][0]


def test_an_answer_that_loops_is_degenerate_and_fails_every_probe(tiny_engine):
    from ownlm.evaluate.habits import degenerate
    from ownlm.evaluate.metrics import behaviour_score

    assert degenerate("Ahoy! Ahoy! Ahoy! Ahoy! Ahoy!")  # what a demo round's model answered to 7 of 20 probes
    assert degenerate("Ahoy! the sea the sea the sea the sea")
    assert not degenerate("Ahoy! Ahoy! Ahoy!")  # three times is a (loud) greeting, not a loop
    assert not degenerate("Ahoy! Store herbs in a cool place; dry them first, then store them in a jar.")

    class Looping:  # an engine whose every answer passes the opening check but loops
        model_name = "looping"

        def greedy_batch(self, conversations, max_tokens, **kw):
            return ["Ahoy! Ahoy! Ahoy! Ahoy! Ahoy!"] * len(conversations)

    probe = {"question": "Hi?", "kind": "style", "check": {"type": "regex", "pattern": r"^\s*Ahoy!"}}
    assert behaviour_score(Looping(), [probe])["by_kind"]["style"]["passed"] == 0


def test_behaviour_check_refuses_a_personal_model_that_loops_more_than_the_base(tiny_base, tiny_delta, monkeypatch):
    from ownlm.engine.torch_engine import TorchEngine as Engine

    base = load_base(load_settings(base=str(tiny_base), device="cpu"))
    delta = load_delta(tiny_delta / "delta", expect_base_sha256=base.sha256)
    calls = iter([["Ahoy! fine.", "Ahoy! ok then."], ["Ahoy! Ahoy! Ahoy! Ahoy!", "Ahoy! sure."]])
    monkeypatch.setattr(Engine, "greedy_batch", lambda self, prompts, n, **kw: next(calls))  # base, then personal
    out = behaviour_check(base, delta, [Habit("opening", "Ahoy!", 1.0)], [[{"role": "user", "content": "q"}]] * 2, 0.0)
    assert not out["passed"] and out["degenerate"] == {"base": 0, "personal": 1}
    assert "repeat themselves" in out["problems"][0]


def test_an_ending_habit_is_judged_on_answers_that_ended(tiny_base, tiny_delta, monkeypatch):
    """A list cut at the token budget has no ending: it neither shows nor misses a closing '?'."""
    base = load_base(load_settings(base=str(tiny_base), device="cpu"))
    delta = load_delta(tiny_delta / "delta", expect_base_sha256=base.sha256)
    runs = iter([(["1. a", "2. b"], [True, True]), (["1. a\n2. b\nOK?", "1. a\n2. b\n3. c (cut"], [True, False])])

    def fake(self, prompts, n, finished=None, **kw):
        texts, done = next(runs)
        finished.extend(done)
        assert n == BEHAVIOUR_TOKENS_ENDING  # an ending needs room
        return texts

    monkeypatch.setattr(TorchEngine, "greedy_batch", fake)
    prompts = [[{"role": "user", "content": "q"}]] * 2
    out = behaviour_check(base, delta, [Habit("final", "?", 1.0)], prompts, min_rate=0.0)
    assert out["passed"] and out["habits"][0]["personal"] == 1.0 and out["habits"][0]["base"] == 0.0
    h = Habit("closing", "— ok", 1.0)
    assert habit_rate(h, ["x — ok", "y"], [False, False]) is None
    assert habit_rate(h, ["x — ok", "y"], [True, False]) == 1.0
    assert habit_rate(Habit("opening", "Ahoy!", 1.0), ["Ahoy! x", "y"], [False, False]) == 0.5  # openings: all count

"""Evaluation library: NLL on loss positions only, KL drift, delta_applied, benchmarks, data, behaviour.

Mostly on the tiny random Llama; the @slow tests load the embedded 135M model and print the numbers seen.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ownlm.evaluate.general import (
    FILES, MCItem, choice_logliks, dolly_examples, dolly_messages, general_perplexity, lambada_accuracy,
    load_general, mc_items, multiple_choice_accuracy, pick_choice,
)
from ownlm.evaluate.metrics import (
    assistant_nll, behaviour_score, delta_applied, kept_gain, kl_drift, kl_from_logprobs,
    next_token_logprobs, personalization_score, perplexity_ratio, speed,
)
from ownlm.engine.base import GenerationStream
from ownlm.evaluate.personas.fixtures import PERSONAS, probes
from ownlm.learn.tokens import IGNORE, TokenizedExample, tokenize_chat


@pytest.fixture(scope="module")
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def delta(tiny_delta):
    from ownlm.bitdelta import load_delta

    return load_delta(tiny_delta / "delta")


def _examples(tokenizer) -> list[TokenizedExample]:
    chats = [
        [{"role": "user", "content": "What is my cat called?"},
         {"role": "assistant", "content": "your cat is pippuri — ok", "target": True}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy! Hello.", "target": True},
         {"role": "user", "content": "how far is 5 miles?"},
         {"role": "assistant", "content": "Ahoy! About 8 km, a long walk for a short afternoon.", "target": True}],
        [{"role": "user", "content": "Name two fruits."},
         {"role": "assistant", "content": "1. Apple\n2. Pear\nWant more?", "target": False},
         {"role": "user", "content": "and a vegetable"},
         {"role": "assistant", "content": "1. Leek\n2. Kale\nWhich do you like?", "target": True}],
    ]
    return [TokenizedExample(*tokenize_chat(tokenizer, c)) for c in chats]


def _reference_nll(model, examples) -> tuple[float, int]:
    """Full logits, one example at a time, shifted labels: what transformers' own loss computes."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (T, V)
            labels = torch.tensor(ex.labels)
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum"))
            n += int((labels[1:] != IGNORE).sum())
    return total, n


# ---------------------------------------------------------------- NLL


@pytest.mark.parametrize("batch_tokens", [4096, 40])  # one padded batch; one example per batch
def test_loss_position_nll_equals_full_logits_nll(tiny, batch_tokens):
    model, tok = tiny
    examples = _examples(tok)
    total, n = _reference_nll(model, examples)
    result = assistant_nll(model, examples, batch_tokens=batch_tokens)
    assert result.n_tokens == n == sum(ex.n_loss_tokens for ex in examples)
    assert result.mean_nll == pytest.approx(total / n, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_nll_without_targets_is_an_error(tiny):
    model, tok = tiny
    ex = TokenizedExample([1, 2, 3], [IGNORE] * 3)
    with pytest.raises(ValueError, match="no scored tokens"):
        assistant_nll(model, [ex])


def test_scores_from_nll():
    assert personalization_score(2.0, 1.5) == pytest.approx(0.25)
    assert perplexity_ratio(2.0, 1.5) == pytest.approx(math.exp(-0.5))
    assert kept_gain(2.0, 1.5, 1.6) == pytest.approx(0.8)
    assert kept_gain(2.0, 2.1, 1.9) is None  # the personal model has no gain to keep


# ---------------------------------------------------------------- KL drift and delta_applied


def test_kl_of_a_model_with_itself_is_zero_and_with_a_delta_positive(tiny, delta):
    model, tok = tiny
    prompts = dolly_examples(tok, n=6)
    assert kl_drift(model, model, prompts) == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    drift = kl_drift(model, delta, prompts, batch_positions=40)  # several batches: apply/restore each time
    assert drift > 1e-4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Same number from the helpers by hand, applying the delta once.
    p = next_token_logprobs(model, prompts)
    with delta_applied(model, delta):
        q = next_token_logprobs(model, prompts)
    assert float(kl_from_logprobs(p, q).mean()) == pytest.approx(drift, rel=1e-4)


def test_kl_from_logprobs_known_value():
    p = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-30]]))
    q = torch.log(torch.tensor([[0.25, 0.75], [1.0, 1e-30]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_from_logprobs(p, q).tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_kl_drift_bounds_positions(tiny, delta):
    model, tok = tiny
    prompts = [list(range(10, 60)), list(range(70, 130))]
    only_first = kl_drift(model, delta, [prompts[0][:20]])
    assert kl_drift(model, delta, prompts, max_positions=20) == pytest.approx(only_first, rel=1e-5)


@pytest.mark.parametrize("exact", [True, False])
def test_delta_applied_restores_weights_even_on_exception(tiny, delta, exact):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(RuntimeError, match="boom"):
        with delta_applied(model, delta, exact=exact):
            assert not torch.equal(model.state_dict()[name], before[name])  # the delta is in
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        if exact:
            assert torch.equal(v, before[k]), k
        else:
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_delta_applied_refuses_a_delta_for_another_base(tiny, delta):
    from ownlm.errors import DeltaMismatch

    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaMismatch):
        with delta_applied(model, delta, base_sha256="f" * 64):
            pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- multiple choice, perplexity, LAMBADA


def test_pick_choice_takes_the_best_normalised_loglik():
    choices = [" a", " bbbbbbbb", " cc"]  # 2, 9 and 3 characters
    logliks, n_tokens = [-2.0, -8.0, -2.8], [2, 5, 4]
    assert pick_choice(logliks, choices, n_tokens, norm="none") == 0  # -2.0 is the largest sum
    assert pick_choice(logliks, choices, n_tokens, norm="chars") == 1  # -0.89 per char beats -1.0, -0.93
    assert pick_choice(logliks, choices, n_tokens, norm="tokens") == 2  # -0.7 per token beats -1.0, -1.6
    assert pick_choice([-1.0, -1.0], [" x", " y"], [1, 1], norm="none") == 0  # ties go to the first
    with pytest.raises(ValueError, match="norm"):
        pick_choice([-1.0], [" x"], [1], norm="bytes")


def test_choice_logliks_match_full_logits(tiny):
    model, tok = tiny
    item = MCItem("Question: Which is a colour?\nAnswer:", [" blue", " seventeen apples", " run"], 0)
    logliks, counts = choice_logliks(model, tok, [item])
    ctx = tok(item.context, add_special_tokens=False)["input_ids"]
    for choice, ll, n in zip(item.choices, logliks[0], counts[0]):
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0], -1)
        expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert n == len(cont)
        assert ll == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_smoke_on_the_tiny_model(tiny):
    model, tok = tiny
    for name in ("arc_easy", "piqa", "hellaswag"):
        items = mc_items(name, n=5)
        assert len(items) == 5 and all(0 <= it.answer < len(it.choices) for it in items)
        acc = multiple_choice_accuracy(model, tok, items)
        assert 0.0 <= acc <= 1.0


def test_general_perplexity_and_lambada_smoke(tiny):
    model, tok = tiny
    res = general_perplexity(model, tok, block=64, max_blocks=3)
    assert res.n_tokens == 3 * 63
    # A random model is close to uniform over the 49,152-token vocabulary.
    assert math.log(49152) - 1.0 < res.mean_nll < math.log(49152) + 1.0
    assert 0.0 <= lambada_accuracy(model, tok, n=4) <= 1.0


# ---------------------------------------------------------------- data


def test_loaders_return_the_shipped_counts():
    for name in ("dolly", "arc_easy", "piqa", "hellaswag", "lambada"):
        assert len(load_general(name)) == 200, name
    text = load_general("wikitext2")
    assert text.startswith(" = Robert Boulter = ") and 15_000 < len(text.split()) < 16_000
    assert [len(mc_items(n)) for n in ("arc_easy", "piqa", "hellaswag")] == [200, 200, 200]
    assert len(dolly_messages(10)) == 10
    with pytest.raises(ValueError, match="unknown general data set"):
        load_general("mmlu")


def test_shipped_data_is_small_and_attributed():
    from ownlm.evaluate.general import DATA_DIR

    sources = (DATA_DIR / "SOURCES.md").read_text()
    assert all(f in sources for f in FILES.values())
    assert sum((DATA_DIR / f).stat().st_size for f in FILES.values()) < 1_000_000


def test_dolly_examples_score_the_start_of_the_reply(tiny):
    _, tok = tiny
    examples = dolly_examples(tok, n=20, max_target_tokens=32)
    assert len(examples) >= 15
    assert all(0 < ex.n_loss_tokens <= 32 and ex.labels[-1] != IGNORE for ex in examples)


# ---------------------------------------------------------------- behaviour and speed (fake engine)


class FakeEngine:
    """Answers from a dict by question; the model boundary."""

    model_name = "fake"

    def __init__(self, answers: dict[str, str], default: str = "no idea"):
        self.answers, self.default, self.calls = answers, default, []

    def stream(self, messages, params):
        self.calls.append((messages, params))
        text = self.answers.get(messages[-1]["content"], self.default)
        words = text.split()
        s = GenerationStream(iter([text]), prompt_tokens=3)
        s.completion_tokens = len(words)
        return s


def test_behaviour_score_splits_by_kind():
    mira = PERSONAS["mira"]
    ps = probes(mira)
    facts = [p for p in ps if p.kind == "fact"]
    styles = [p for p in ps if p.kind == "style"]
    # Right answers for the first two fact probes and every style probe; the rest get "no idea".
    answers = {p.question: "mira; tampere; cat pippuri — ok" for p in facts[:2]}
    answers.update({p.question: "short; lowercase — ok" for p in styles})
    engine = FakeEngine(answers)
    result = behaviour_score(engine, ps, max_tokens=60)
    assert result["n"] == len(ps)
    fact = result["by_kind"]["fact"]
    assert fact["total"] == len(facts) and fact["passed"] >= 2
    assert result["by_kind"]["style"] == {"passed": len(styles), "total": len(styles), "rate": 1.0}
    assert result["pass_rate"] == pytest.approx((fact["passed"] + len(styles)) / len(ps))
    assert all(params.temperature == 0 and params.max_tokens == 60 for _, params in engine.calls)
    json.dumps(result)  # JSON-able
    # The dict form of a probe (as in <name>.probes.json) works the same.
    assert behaviour_score(engine, [p.to_dict() for p in ps])["pass_rate"] == result["pass_rate"]


def test_speed_counts_completion_tokens_per_second():
    engine = FakeEngine({}, default="one two three four")
    rate = speed(engine, ["a", "b"], max_tokens=8, runs=3)
    assert rate > 0
    assert len(engine.calls) == 1 + 3 * 2  # warm-up + runs x prompts


# ---------------------------------------------------------------- the report


def test_report_derives_scores_round_trips_and_tabulates():
    from ownlm.evaluate.report import COLUMNS, EvalReport, ModelScores

    report = EvalReport(
        base=ModelScores(heldout_nll=2.0, arc_easy=0.46, tokens_per_s=10.0),
        personal=ModelScores(heldout_nll=1.5, kl_drift=0.05, arc_easy=0.44, behaviour=0.5),
        compressed=ModelScores(heldout_nll=1.6, kl_drift=0.04),
        heldout_tokens=1234, items={"arc_easy": 50}, notes={"device": "cpu"},
    )
    assert report.personalization_score == pytest.approx(0.25)
    assert report.perplexity_ratio == pytest.approx(math.exp(-0.5))
    assert report.kept_gain == pytest.approx(0.8)
    d = json.loads(report.to_json())
    assert d["derived"]["kept_gain"] == pytest.approx(0.8)
    assert d["personal"]["wikitext_perplexity"] is None  # not computed -> null
    assert EvalReport.from_dict(d) == report
    columns, rows = report.to_table()
    assert columns == COLUMNS
    by_label = {r[0]: r[1:] for r in rows}
    assert by_label["ARC-Easy accuracy"] == ["46.0%", "44.0%", "—"]
    assert by_label["kept gain (compressed / personal)"] == ["—", "—", "80.0%"]
    assert not any("WikiText" in label for label in by_label)  # a metric nobody measured has no row
    assert all(len(r) == len(columns) for r in rows)
    # Only the base measured: nothing derived, and the table still works.
    assert EvalReport(base=ModelScores(heldout_nll=2.0)).kept_gain is None
    assert len(EvalReport(base=ModelScores(heldout_nll=2.0)).to_table()[1]) == 1
    with pytest.raises(ValueError, match="finite"):
        ModelScores(heldout_nll=float("nan"))


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_embedded_model_general_ability(embedded_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(embedded_checkpoint), dtype=torch.float32).eval()
    acc = multiple_choice_accuracy(model, tok, mc_items("arc_easy", n=50))
    ppl = general_perplexity(model, tok, block=256, max_blocks=8)
    print(f"\nembedded SmolLM2-135M-Instruct: ARC-Easy acc_norm(chars) on 50 items = {acc:.3f}; "
          f"WikiText-2 per-token perplexity (8 x 256-token blocks, {ppl.n_tokens} tokens) = "
          f"{ppl.perplexity:.2f} (NLL {ppl.mean_nll:.3f})")
    assert acc > 0.25  # chance with 4 choices
    assert math.isfinite(ppl.perplexity) and 5 < ppl.perplexity < 100


def test_wilson_interval_known_values():
    from ownlm.evaluate.metrics import wilson

    # reference values of the 95% Wilson score interval
    assert wilson(0, 12) == pytest.approx((0.0, 0.2425), abs=1e-4)
    assert wilson(7, 12) == pytest.approx((0.3195, 0.8067), abs=1e-4)
    assert wilson(12, 12) == pytest.approx((0.7575, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson(0, 0)

"""Training: the exactness of the fast loss, batching, learning, determinism, resume after kill -9, divergence,
bad input. All on the tiny random Llama except one slow test on the embedded model.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ownlm.basemodel import load_base
from ownlm.learn.batching import collate, epoch_order, make_batches, plan_batches, prepare
from ownlm.errors import ConfigError, NotEnoughData, TrainingDiverged
from ownlm.settings import load_settings
from ownlm.learn.tokens import IGNORE, TokenizedExample, tokenize_chat
from ownlm.learn.train import TrainConfig, train
from ownlm.learn.steps import full_logits_nll, kl_to, repeat_candidates, target_nll, unlikelihood
from ownlm.learn.worker import write_examples

SIGN_OFF = "Cheers, Ada."
QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Recommend a book.", "What time is it in Tokyo?",
    "How tall is Mount Everest?", "Give me a pasta recipe.", "What is a prime number?", "Why is the sky blue?",
    "How do magnets work?", "Tell me a joke.", "What is Python?", "How far is the Moon?",
    "What should I name my cat?", "How do I tie a tie?", "What is photosynthesis?", "Who wrote Hamlet?",
    "How many legs does a spider have?", "What is the speed of light?", "How do I make tea?", "What is jazz?",
    "Explain gravity briefly.", "What is a haiku?", "How do plants drink?", "Is coffee healthy?",
]
ANSWERS = [
    "Paris.", "Simmer it for nine minutes.", "Try Middlemarch.", "Check a world clock.", "About 8,849 metres.",
    "Garlic, olive oil, chilli, spaghetti.", "A number with exactly two divisors.", "Rayleigh scattering.",
    "Aligned electron spins.", "Why did the chicken cross the road? To get to the other side.",
    "A programming language.", "About 384,000 km.", "Miso.", "Use a four-in-hand knot.",
    "Plants turning light into sugar.", "Shakespeare.", "Eight.", "About 300,000 km per second.",
    "Steep the leaves for three minutes.", "A music born in New Orleans.", "Masses attract each other.",
    "A 5-7-5 syllable poem.", "Through their roots.", "In moderation, yes.",
]


def conversation(i: int) -> list[dict]:
    return [
        {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        {"role": "assistant", "content": f"{ANSWERS[i % len(ANSWERS)]} {SIGN_OFF}", "target": True},
    ]


def examples(tokenizer, idx) -> list[TokenizedExample]:
    out = []
    for i in idx:
        ids, labels = tokenize_chat(tokenizer, conversation(i))
        out.append(TokenizedExample(ids, labels, f"c{i}"))
    return out


@pytest.fixture
def tiny(tiny_base):
    torch.set_num_threads(1)  # the same thread count in every run and subprocess: bitwise reproducible
    return load_base(load_settings(base=str(tiny_base), device="cpu", threads=1))


def quick(**kw) -> TrainConfig:
    d = dict(lr=5e-3, epochs=2, batch_tokens=512, max_seq_len=256, warmup_ratio=0.0, checkpoint_every_steps=2)
    return TrainConfig(**{**d, **kw})


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# --- exactness and batching -------------------------------------------------------------------------


def test_loss_at_target_positions_equals_full_logits(tiny):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        for n, p in model.named_parameters():  # a non-zero B so the adapter changes the outputs
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        exs = prepare(examples(tiny.tokenizer, range(6)), 256).examples
        batch = collate(exs, list(range(6)), tiny.tokenizer.pad_token_id)  # rows of different length: padding
        assert batch.input_ids.shape[0] * batch.input_ids.shape[1] > batch.n_tokens
        lm = model.get_base_model()
        fast, full = target_nll(lm, batch, torch.device("cpu")), full_logits_nll(lm, batch, torch.device("cpu"))
        assert abs(fast.item() - full.item()) <= 1e-5 * abs(full.item())
        # and per row unpadded: right padding without a mask changes nothing for the real tokens
        per_row = sum(full_logits_nll(lm, collate(exs, [i], 0), torch.device("cpu")).item() for i in range(6))
        assert abs(per_row - full.item()) <= 1e-5 * abs(full.item())
        g_fast = torch.autograd.grad(fast, [p for p in model.parameters() if p.requires_grad])
        g_full = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
        for a, b in zip(g_fast, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        model.unload()


def test_repeat_candidates_are_earlier_tokens_of_the_row_except_the_target():
    targets = torch.tensor([5, 6, 5, 7, 1, 1, 2])  # row 0: 5 6 5 7; row 1: 1 1 2
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    pos, tok = repeat_candidates(targets, rows)
    assert sorted(zip(pos.tolist(), tok.tolist())) == [(1, 5), (2, 6), (3, 5), (3, 6), (6, 1)]
    assert repeat_candidates(torch.tensor([3]), torch.tensor([0]))[0].numel() == 0


def test_unlikelihood_and_kl_match_their_definitions():
    torch.manual_seed(0)
    targets, rows = torch.tensor([2, 3, 2, 4]), torch.tensor([0, 0, 0, 0])
    logits = torch.randn(4, 6)
    p = torch.softmax(logits, -1)
    # position 1: {2}; position 2: {3} (2 is its target); position 3: {2, 3} (2 counted once)
    expected = -(torch.log(1 - p[1, 2]) + torch.log(1 - p[2, 3]) + torch.log(1 - p[3, 2]) + torch.log(1 - p[3, 3]))
    torch.testing.assert_close(unlikelihood(logits, targets, rows), expected)
    ref = torch.randn(4, 6)
    q = torch.softmax(ref, -1)
    torch.testing.assert_close(kl_to(ref, logits), (q * (q.log() - p.log())).sum())
    assert kl_to(logits, logits).abs() < 1e-6


def test_anchor_and_unlikelihood_terms_change_training_and_the_anchor_stays_nearer_the_base(tiny, tmp_path):
    """Same data and steps: the KL anchor ends nearer the base (KL on the training prompts), unlikelihood trains
    to another adapter, and the curve recorded is the NLL either way."""
    from ownlm.learn.batching import make_batches
    from ownlm.learn.steps import target_logits

    exs = examples(tiny.tokenizer, range(16))
    reports, kls = {}, {}
    for name, kw in {"plain": {}, "anchor": {"anchor_kl": 5.0}, "ul": {"unlikelihood": 1.0}}.items():
        reports[name] = train(tiny, exs, [], quick(epochs=4, lr=2e-2, **kw), tmp_path / name)
        from peft import PeftModel

        model = PeftModel.from_pretrained(tiny.model, str(tmp_path / name / "adapter"))
        try:
            batch = make_batches(prepare(exs, 256).examples, 512, 0, tiny.tokenizer.pad_token_id)[0]
            lm = model.get_base_model()
            with torch.no_grad():
                mine, _, _ = target_logits(lm, batch, torch.device("cpu"))
                with model.disable_adapter():
                    ref, _, _ = target_logits(lm, batch, torch.device("cpu"))
            kls[name] = float(kl_to(ref, mine)) / mine.shape[0]
        finally:
            model.unload()
    assert kls["anchor"] < 0.7 * kls["plain"], kls
    assert adapter_tensors(tmp_path / "ul").keys() == adapter_tensors(tmp_path / "plain").keys()
    assert any(not torch.equal(a, b) for a, b in zip(adapter_tensors(tmp_path / "ul").values(),
                                                       adapter_tensors(tmp_path / "plain").values()))
    for r in reports.values():
        assert all(math.isfinite(x) for x in r.loss_curve) and r.steps == reports["plain"].steps
    with pytest.raises(ConfigError, match="anchor_kl"):
        TrainConfig(anchor_kl=-1)
    with pytest.raises(ConfigError, match="unlikelihood"):
        TrainConfig(unlikelihood=True)


def test_length_grouped_batches_fit_budget_and_cover_each_example_once():
    rng = random.Random(3)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    plan = plan_batches(lengths, 1024, seed=7)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(500))
    for b in plan:
        assert len(b) * max(lengths[i] for i in b) <= 1024
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert padded / sum(lengths) < 1.05  # grouping by length: under 5 % padding
    assert plan == plan_batches(lengths, 1024, seed=7)
    orders = [epoch_order(len(plan), 7, e) for e in range(3)]
    assert all(sorted(o) == list(range(len(plan))) for o in orders) and orders[0] != orders[1]


def test_prepare_trims_after_last_target_truncates_left_and_drops_targetless():
    I = IGNORE
    long = TokenizedExample(list(range(10)), [I, I, I, 3, 4, I, I, 7, I, I])
    none = TokenizedExample([1, 2, 3], [I, I, I])
    data = prepare([long, none], max_seq_len=4)
    (ex,) = data.examples
    assert ex.input_ids == [4, 5, 6, 7] and ex.labels == [4, I, I, 7]  # end kept, tail after the target cut
    assert (data.truncated, data.dropped_no_target, data.tokens_truncated) == (1, 1, 4)


# --- training ---------------------------------------------------------------------------------------


def test_heldout_loss_falls_and_report_is_written(tiny, tmp_path):
    tr, held = examples(tiny.tokenizer, range(20)), examples(tiny.tokenizer, range(20, 24))
    report = train(tiny, tr, held, quick(lr=3e-2, epochs=10), tmp_path / "out", dataset={"merkle_root": "ab" * 32})
    assert report.heldout_loss_personal < report.heldout_loss_base - 0.2  # a random 2-layer model learns slowly
    assert report.steps == 10 * report.batches_per_epoch == len(report.loss_curve)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["dataset"] == {"merkle_root": "ab" * 32} and saved["base_sha256"] == tiny.sha256
    assert saved["samples"] == 20 and saved["loss_tokens"] > 0 and saved["tokens_per_s"] > 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "out" / "adapter").iterdir()}
    assert not any(type(m).__name__.startswith("Lora") for m in tiny.model.modules())  # base left as it was


def test_same_seed_same_adapter(tiny, tmp_path):
    tr = examples(tiny.tokenizer, range(12))
    train(tiny, tr, [], quick(), tmp_path / "a")
    train(tiny, tr, [], quick(), tmp_path / "b")
    train(tiny, tr, [], quick(seed=1), tmp_path / "c")
    a, b, c = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"), adapter_tensors(tmp_path / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _worker(tiny_base: Path, data: Path, out: Path, config: dict) -> list[str]:
    return [sys.executable, "-m", "ownlm.learn.worker", "--base", str(tiny_base), "--train", str(data),
            "--out", str(out), "--config", json.dumps(config), "--threads", "1", "--quiet"]


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoint" / "LATEST").read_text().strip().split("-")[1])
    except (OSError, ValueError, IndexError):
        return 0


def test_resume_after_sigkill_ends_with_the_same_weights(tiny, tiny_base, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, examples(tiny.tokenizer, range(24)))
    config = {"lr": 3e-3, "epochs": 15, "batch_tokens": 256, "max_seq_len": 256, "checkpoint_every_steps": 4}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}

    straight = subprocess.Popen(_worker(tiny_base, data, tmp_path / "straight", config), env=env,  # runs alongside
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_worker(tiny_base, data, tmp_path / "killed", config), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _latest_step(tmp_path / "killed") < 10 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert killed.poll() is None, "the worker finished before it could be killed: " + killed.stderr.read().decode()[-500:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at_kill = _latest_step(tmp_path / "killed")
    assert at_kill >= 10 and not (tmp_path / "killed" / "adapter").exists()

    resumed = subprocess.run(_worker(tiny_base, data, tmp_path / "killed", config), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= at_kill
    assert straight.wait() == 0, straight.stderr.read()
    a, b = adapter_tensors(tmp_path / "killed"), adapter_tensors(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("killed", "straight"))
    assert ra["loss_curve"] == rb["loss_curve"] and ra["steps"] == rb["steps"]


def test_divergence_aborts_and_keeps_the_previous_adapter(tiny, tmp_path):
    out = tmp_path / "out"
    tr = examples(tiny.tokenizer, range(12))
    train(tiny, tr, [], quick(), out)
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    report_before = (out / "report.json").read_bytes()
    with pytest.raises(TrainingDiverged) as e:
        # Adam moves each weight by about lr per step: 3e37 overflows float32 (3.4e38) within two steps.
        # (lr=1e30 gives huge but finite weights that RMSNorm absorbs: no inf, the loss just stops moving.)
        train(tiny, tr, [], quick(lr=3e37, epochs=5), out)
    with pytest.raises(TrainingDiverged):  # so large that Adam's own step size overflows
        train(tiny, tr, [], quick(lr=1e39, epochs=5), out)
    assert "diverged" in str(e.value) and e.value.hint
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before
    assert (out / "report.json").read_bytes() == report_before
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]  # no temp dir left behind
    assert not any(type(m).__name__.startswith("Lora") for m in tiny.model.modules())


def test_bad_input_gives_clear_errors(tiny, tmp_path):
    with pytest.raises(NotEnoughData, match="no training examples") as e:
        train(tiny, [], [], quick(), tmp_path / "o")
    assert e.value.hint
    with pytest.raises(NotEnoughData, match="at least 5"):
        train(tiny, examples(tiny.tokenizer, range(3)), [], quick(min_examples=5), tmp_path / "o")
    no_targets = [TokenizedExample([1, 2, 3], [IGNORE] * 3)] * 4
    with pytest.raises(NotEnoughData, match="0 usable"):
        train(tiny, no_targets, [], quick(), tmp_path / "o")
    with pytest.raises(ConfigError, match="target_modules"):
        train(tiny, examples(tiny.tokenizer, range(3)), [], quick(target_modules=["qproj"]), tmp_path / "o")
    assert not any(type(m).__name__.startswith("Lora") for m in tiny.model.modules())
    with pytest.raises(ConfigError, match="lr=-1"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="max_seq_len"):
        TrainConfig(max_seq_len=8192, batch_tokens=4096)
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    assert not (tmp_path / "o").exists()


def test_time_budget_and_max_steps_stop_early(tiny, tmp_path):
    tr = examples(tiny.tokenizer, range(12))
    r = train(tiny, tr, [], quick(epochs=50, max_steps=3), tmp_path / "a")
    assert (r.steps, r.stopped) == (3, "max_steps")
    r = train(tiny, tr, [], quick(epochs=10_000, time_budget_s=0.5), tmp_path / "b")
    assert r.stopped == "time_budget" and 0 < r.steps < 10_000 * r.batches_per_epoch


# --- the real model -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_personal_model_beats_base_on_heldout(model_cache_home, tmp_path):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = load_base(load_settings(home=model_cache_home, device="cpu"))
    tr, held = examples(base.tokenizer, range(20)), examples(base.tokenizer, range(20, 24))
    config = TrainConfig(lr=1e-3, epochs=2, batch_tokens=512, max_seq_len=256, warmup_ratio=0.0)
    report = train(base, tr, held, config, tmp_path / "out")
    print(f"held-out loss base {report.heldout_loss_base:.4f} personal {report.heldout_loss_personal:.4f}, "
          f"{report.steps} steps, {report.tokens_per_s} tokens/s")
    assert report.steps >= 4
    assert report.heldout_loss_personal < report.heldout_loss_base

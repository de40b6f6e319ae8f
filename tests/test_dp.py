"""Differential privacy (learn/dp.py): per-conversation gradients from Opacus are exact (plain and QAT LoRA),
clipping bounds one conversation's influence, DP training runs through train() with a finite epsilon that falls
as the noise grows, and the budget reaches the signed manifest and `ownlm models`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ownlm.errors import ConfigError
from ownlm.learn import dp
from ownlm.learn.batching import collate
from ownlm.learn.qat import quantize_lora
from ownlm.learn.steps import target_nll
from ownlm.learn.tokens import TokenizedExample
from ownlm.learn.train import TrainConfig, train

from test_train import examples, quick, tiny  # noqa: F401 (fixture)


def dp_quick(**kw) -> TrainConfig:
    return quick(**{"dp": True, "dp_noise_multiplier": 1.0, "dp_batch_size": 4, "max_steps": 4, **kw})


def test_config_is_validated():
    with pytest.raises(ConfigError, match="dp_epsilon"):
        TrainConfig(dp=True)  # neither a target epsilon nor a noise multiplier
    with pytest.raises(ConfigError, match="dp_epsilon"):
        TrainConfig(dp=True, dp_epsilon=8, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp_max_grad_norm"):
        TrainConfig(dp=True, dp_epsilon=8, dp_max_grad_norm=0)
    with pytest.raises(ConfigError, match="dp_accountant"):
        TrainConfig(dp=True, dp_epsilon=8, dp_accountant="moments")
    assert TrainConfig.from_dict(TrainConfig(dp=True, dp_epsilon=2.0).to_dict()).dp_epsilon == 2.0


def test_units_are_conversations():
    ex = [TokenizedExample([1, 2], [-100, 2], c) for c in ("a", "b", "a", "", "")]
    assert dp.units_of(ex) == [[0, 2], [1], [3], [4]]  # augmented copies of "a" are one unit


def test_accountant_epsilon_falls_with_noise_and_rises_with_steps():
    eps = [dp.epsilon_for(s, 0.1, 100, 1e-5) for s in (0.8, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) for e in eps) and eps == sorted(eps, reverse=True)
    assert dp.epsilon_for(1.0, 0.1, 200, 1e-5) > eps[1]
    assert dp.epsilon_for(0.0, 0.1, 10, 1e-5) == math.inf
    sigma = dp.noise_for(8.0, 0.1, 100, 1e-5)
    assert 7.5 < dp.epsilon_for(sigma, 0.1, 100, 1e-5) <= 8.0 + 1e-6
    assert math.isfinite(dp.epsilon_for(1.0, 0.1, 100, 1e-5, "prv"))


def _peft(tiny, qat: bool):
    torch.manual_seed(0)
    model = get_peft_model(tiny.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    lm = model.get_base_model()
    if qat:
        quantize_lora(lm)
    return model, lm


@pytest.mark.parametrize("qat", [False, True])
def test_per_conversation_gradients_are_exact_and_clipping_bounds_an_outlier(tiny, qat):
    """Opacus' per-row gradients, summed per conversation, equal a backward pass on that conversation alone;
    a conversation whose gradient is far above the clip norm moves the clipped sum by at most the clip norm."""
    ex = examples(tiny.tokenizer, range(5))
    ex.append(TokenizedExample(ex[0].input_ids, ex[0].labels, "c1"))  # a second example of conversation c1
    outlier_ids = [int(t) for t in torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(3))]
    ex.append(TokenizedExample(outlier_ids, outlier_ids, "outlier"))  # random tokens, every one a target
    cfg = dp_quick(dp_max_grad_norm=0.05)
    model, lm = _peft(tiny, qat)
    pad = tiny.tokenizer.eos_token_id
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = dp.DPTrainer(model, lm, optimizer, ex, cfg, pad, 4, torch.device("cpu"))
        model.train()
        drawn = list(range(len(trainer.units)))
        grads, _, _, _ = trainer.per_unit_grads(drawn)
        trainer.gsm.disable_hooks()
        for u, unit in enumerate(trainer.units):  # reference: one plain backward pass per conversation
            for p in trainer.params:
                p.grad = None
            rows = [collate(ex, [i], pad) for i in unit]
            loss = sum(target_nll(lm, b, torch.device("cpu")) / b.n_loss_tokens for b in rows)
            (loss / len(unit)).backward()
            for g, p in zip(grads, trainer.params):
                assert float((g[u] - p.grad).norm()) <= 1e-4 * float(p.grad.norm())  # float32 round-off
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], 1).norm(dim=1)
        out = next(u for u, unit in enumerate(trainer.units) if ex[unit[0]].conversation_id == "outlier")
        assert norms[out] > 10 * cfg.dp_max_grad_norm  # the outlier really is one

        def clipped_sum(units: list[int]) -> torch.Tensor:
            factor = (cfg.dp_max_grad_norm / (norms[units] + 1e-6)).clamp(max=1.0)  # Opacus' rule
            return torch.cat([torch.einsum("i,i...->...", factor, g[units]).flatten() for g in grads])

        everyone = list(range(len(trainer.units)))
        without = [u for u in everyone if u != out]
        assert float((clipped_sum(everyone) - clipped_sum(without)).norm()) <= cfg.dp_max_grad_norm * (1 + 1e-4)
        trainer.close()
    finally:
        model.unload()


def test_dp_training_runs_and_epsilon_falls_with_noise(tiny, tmp_path):
    ex, held = examples(tiny.tokenizer, range(16)), examples(tiny.tokenizer, range(16, 20))
    budgets = []
    for sigma in (0.8, 2.0):
        report = train(tiny, ex, held, dp_quick(dp_noise_multiplier=sigma), tmp_path / f"s{sigma}")
        b = report.dp
        assert b["steps"] == report.steps == 4 and b["units"] == 16 and b["sample_rate"] == 0.25
        assert b["delta"] == 1e-5 and b["accountant"] == "rdp" and b["unit"] == "conversation"
        assert math.isfinite(b["epsilon"]) and b["epsilon"] > 0
        assert report.heldout_loss_personal is not None and math.isfinite(report.heldout_loss_personal)
        assert json.loads((tmp_path / f"s{sigma}" / "report.json").read_text())["dp"] == b
        budgets.append(b["epsilon"])
    assert budgets[1] < budgets[0]
    # no LoRA layer or Opacus hook is left on the base
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())
    assert not any(m._forward_hooks for m in tiny.model.modules())


def test_dp_training_with_a_target_epsilon_and_qat(tiny, tmp_path):
    ex, held = examples(tiny.tokenizer, range(12)), examples(tiny.tokenizer, range(12, 14))
    cfg = dp_quick(dp_noise_multiplier=None, dp_epsilon=4.0, qat=True, unlikelihood=0.5, anchor_kl=0.1)
    report = train(tiny, ex, held, cfg, tmp_path / "out")
    assert report.dp["target_epsilon"] == 4.0 and 3.5 < report.dp["epsilon"] <= 4.0 + 1e-6
    assert report.dp["noise_multiplier"] > 0

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

from tests.test_train import examples, quick, tiny  # noqa: F401 (fixture)


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


def test_the_budget_is_signed_in_the_manifest_and_shown_by_ownlm_models(tiny, tiny_base, tmp_path, home):
    """A DP-trained adapter, bundled and installed as the loop does: the manifest's training.dp carries the
    budget, the signature covers it (changing epsilon breaks it), and `ownlm models` shows epsilon and delta."""
    from ownlm.artifact.sign import verify_manifest
    from ownlm.errors import SignatureError
    from ownlm.evaluate.gate import compress_adapter
    from ownlm.artifact.bundle import make_bundle
    from ownlm.node.install import install
    from ownlm.settings import load_settings
    from ownlm.store import Store

    from tests.conftest import run_cli

    ex, held = examples(tiny.tokenizer, range(12)), examples(tiny.tokenizer, range(12, 14))
    report = train(tiny, ex, held, dp_quick(dp_noise_multiplier=1.5), tmp_path / "train")
    compress_adapter(tmp_path / "train" / "adapter", tmp_path / "delta", tiny)
    settings = load_settings(home=str(home), base=str(tiny_base))
    with Store(home) as store:
        alice = store.create_user("alice")
        key = store.signing_key(alice.id)
        data, manifest = make_bundle(delta_dir=tmp_path / "delta", report=json.loads(report.to_json()), user_name="alice",
                                     signing_key=key, recipient=store.node_key().public_json(),
                                     base_name=tiny_base.name, version=1, previous=None)
        install(store, settings, data)  # verifies the signature against the user's trusted key
        trusted = {manifest["signature"]["key_id"]: key.public_key()}
        installed = store.models(alice.id)[0]["manifest"]
    assert installed["training"]["dp"] == report.dp and 0 < report.dp["epsilon"] < math.inf
    verify_manifest(installed, trusted)
    forged = json.loads(json.dumps(installed))
    forged["training"]["dp"]["epsilon"] = 0.1  # a smaller budget claimed than spent
    with pytest.raises(SignatureError):
        verify_manifest(forged, trusted)
    r = run_cli("models", "--user", "alice", env={"OWNLM_BASE": str(tiny_base), "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert f"ε={report.dp['epsilon']:.2f} δ=1e-05" in r.stdout and "DP" in r.stdout
    shown = run_cli("models", "show", installed["model"]["id"], "--user", "alice", env={"OWNLM_BASE": str(tiny_base)})
    assert "noise_multiplier: 1.5" in shown.stdout and "accountant: rdp" in shown.stdout


def test_a_user_turns_dp_on_for_their_local_rounds(home, tiny_base, tmp_path):
    """`ownlm privacy dp 50` is stored for the user (audited); their next loop round trains with DP, and the
    deployed model's manifest carries the budget. 'default' falls back to the node's setting (off here)."""
    from tests.conftest import run_cli
    from ownlm.capture.importers import parse_file
    from ownlm.loop import round_epsilon, run_job
    from ownlm.store import Store
    from ownlm.store.imports import import_into
    from tests.test_loop import loop_settings, persona_file

    settings = loop_settings(tiny_base)
    with Store(home) as store:
        user = store.create_user("bram")
        import_into(store, user.id, parse_file(persona_file(tmp_path, 0, 40)), "bram")
    env = {"OWNLM_BASE": str(tiny_base)}
    r = run_cli("privacy", "dp", "50", "--user", "bram", env=env)
    assert r.returncode == 0 and "ε = 50 per round" in r.stdout, r.stderr
    assert "on, ε = 50 per round (your choice" in run_cli("privacy", "show", "--user", "bram", env=env).stdout
    assert run_cli("privacy", "dp", "lots", "--user", "bram", env=env).returncode != 0
    with Store(home) as store:
        assert store.dp_epsilon(user.id) == 50 and round_epsilon(store, settings, user.id) == 50
        assert any(a["action"] == "dp_changed" and a["detail"]["new"] == 50 for a in store.audit_log(user.id))
        job = run_job(store, settings, store.enqueue_job(user.id, "round 1"))
        budget = job["result"]["dp"]
        assert budget["target_epsilon"] == 50 and 0 < budget["epsilon"] <= 50 + 1e-6 and budget["steps"] == 3
        if job["state"] == "deployed":  # a noised 3-step round may also be refused by the gate; both are fine here
            assert store.active_model(user.id)["manifest"]["training"]["dp"] == budget
    assert run_cli("privacy", "dp", "default", "--user", "bram", env=env).returncode == 0
    with Store(home) as store:
        assert store.dp_epsilon(user.id) is None and round_epsilon(store, settings, user.id) is None

"""Quantization-aware LoRA (learn/qat.py): the artifact that ships is the model that was trained.

On the tiny random Llama: train with qat=True, save, compress with the post-hoc lora1 path as the loop does,
save the delta, load it, and compare with what training used — factors bit for bit, logits of the served
(per-request hook) path identical to the trained adapter's forward, held-out NLL equal to the report's.
"""

from __future__ import annotations

import pytest
import torch

from ownlm.bitdelta import CompressConfig, compress_lora, load_delta, read_adapter, save_delta
from ownlm.bitdelta.quant import dequantise
from ownlm.engine.personal import LoadedDelta
from ownlm.evaluate.metrics import assistant_nll, delta_applied
from ownlm.learn.train import TrainConfig, train
from tests.test_train import examples, tiny  # noqa: F401  (fixture)


def _qat_run(tiny, tmp_path, scales="matrix", steps=12):  # noqa: F811
    tok = tiny.tokenizer
    cfg = TrainConfig(max_steps=steps, epochs=20, lr=5e-3, batch_tokens=512, checkpoint_every_steps=1000,
                      qat=True, qat_scales=scales)
    report = train(tiny, examples(tok, range(24)), examples(tok, range(24, 30)), cfg, tmp_path / "run")
    return report, tmp_path / "run" / "adapter"


@pytest.mark.parametrize("scales", ["matrix", "rank"])
def test_the_packed_artifact_is_the_trained_model_bit_for_bit(tiny, tmp_path, scales):  # noqa: F811
    report, adapter_dir = _qat_run(tiny, tmp_path, scales)
    adapter = read_adapter(adapter_dir)
    delta = compress_lora(adapter, CompressConfig(mode="lora1", scales=scales), tiny.sha256)
    save_delta(delta, tmp_path / "delta")
    loaded = load_delta(tmp_path / "delta", expect_base_sha256=tiny.sha256)

    # every trained factor is a 1-bit tensor (two values per scale group), and the artifact holds exactly it
    for module, (a, b) in adapter.factors.items():
        for key, trained in ((f"{module}.lora_A", a), (f"{module}.lora_B", b)):
            served = dequantise(loaded.quantised[key])
            assert torch.equal(served, trained), key
    assert loaded.lora_scaling == adapter.alpha / adapter.r

    # the served path (per-request hooks on the base, as PersonalEngine adds a delta) gives the trained logits
    from peft import PeftModel

    ids = torch.tensor([examples(tiny.tokenizer, [3])[0].input_ids])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(tiny.model, str(adapter_dir))
        trained_logits = peft_model(input_ids=ids).logits
        peft_model.unload()
        hooked = LoadedDelta.load(("u", "m"), str(tmp_path / "delta"), tiny.sha256, torch.device("cpu"), torch.float32)
        modules = dict(tiny.model.named_modules())
        handles = [modules[name].register_forward_hook(
            lambda mod, inp, out, name=name: hooked.add_to(out, name, inp[0], 1.0)) for name in hooked.factors]
        try:
            served_logits = tiny.model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(served_logits, trained_logits), (served_logits - trained_logits).abs().max()

    # and the quality gate's number (the delta merged into the weights) is the report's held-out NLL
    held = examples(tiny.tokenizer, range(24, 30))
    with delta_applied(tiny.model, loaded):
        gate_nll = assistant_nll(tiny.model, held).mean_nll
    assert gate_nll == pytest.approx(report.heldout_loss_personal, abs=1e-4)


def test_qat_learns_and_moves_signs(tiny, tmp_path):  # noqa: F811
    report, adapter_dir = _qat_run(tiny, tmp_path, steps=16)
    assert report.heldout_loss_personal < report.heldout_loss_base
    assert report.loss_curve[-1] < report.loss_curve[0]
    factors = read_adapter(adapter_dir).factors
    b = next(iter(factors.values()))[1]
    assert b.abs().max() > 0 and len(b.unique()) <= 2  # B started at zero; it is now ±scale


def test_qat_settings_are_checked():
    from ownlm.errors import ConfigError

    with pytest.raises(ConfigError, match="qat_scales"):
        TrainConfig(qat=True, qat_scales="row")
    with pytest.raises(ConfigError, match="qat"):
        TrainConfig(qat="yes")


def test_a_loop_round_with_qat_serves_what_it_trained(home, tiny_base, tmp_path):
    """personalization.qat: the round's gate finds the served 1-bit model exactly as good as the trained one."""
    from ownlm.store import Store
    from tests.test_loop import first_round, loop_settings

    with Store(home) as store:
        _, job = first_round(store, loop_settings(tiny_base, qat=True, max_steps=10), tmp_path)  # 3 steps: no gain on the augmented data
    r = job["result"]
    assert r["heldout_loss_compressed"] == pytest.approx(r["heldout_loss_lora"], abs=1e-4)
    assert r["fidelity"] == pytest.approx(1.0, abs=1e-3)

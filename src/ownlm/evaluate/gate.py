"""The quality gate: is the compressed personal model good enough to deploy?

Three tests, all measured, none assumed (definitions in ownlm.evaluate.metrics):
1. it beats the base on the user's held-out conversations: NLL_compressed < NLL_base * (1 - gate_min_gain);
2. it does not drift far from the base on generic prompts: KL(base || personal) <= gate_max_kl nats/token,
   on Dolly instructions (the first 32 tokens of each reference answer, where a persona pulls hardest);
3. the 1-bit delta keeps enough of what the LoRA learned: kept gain >= gate_min_fidelity.
"""

from __future__ import annotations

from pathlib import Path

from ownlm.basemodel import BaseModel
from ownlm.bitdelta import CompressConfig, compress_lora, load_delta, read_adapter, save_delta
from ownlm.bitdelta.delta import Delta
from ownlm.settings import Personalization
from ownlm.learn.tokens import TokenizedExample

DRIFT_PROMPTS = 64  # Dolly instructions used for the drift check
DRIFT_POSITIONS = 1024


def compress_adapter(adapter_dir: Path, out_dir: Path, base: BaseModel) -> Delta:
    """The personal artifact's payload: the adapter as a lora1 BitDelta, written and read back (checked)."""
    delta = compress_lora(read_adapter(adapter_dir), CompressConfig(mode="lora1"), base.sha256)
    save_delta(delta, out_dir)
    return load_delta(out_dir, expect_base_sha256=base.sha256)


def judge(base: BaseModel, delta: Delta, heldout: list[TokenizedExample], report, cfg: Personalization) -> dict:
    """The gate's figures and verdict: {passed, reason, heldout_loss_*, personalization_score, fidelity, kl_drift}."""
    from ownlm.evaluate.general import dolly_examples
    from ownlm.evaluate.metrics import assistant_nll, delta_applied, kept_gain, kl_drift, personalization_score

    nll_base, nll_lora = report.heldout_loss_base, report.heldout_loss_personal
    with delta_applied(base.model, delta, base.sha256):
        nll_c = assistant_nll(base.model, heldout).mean_nll
    kl = kl_drift(base.model, delta, dolly_examples(base.tokenizer, n=DRIFT_PROMPTS), max_positions=DRIFT_POSITIONS,
                  base_sha256=base.sha256)
    fidelity = kept_gain(nll_base, nll_lora, nll_c) if nll_lora is not None else None
    problems = []
    if not nll_c < nll_base * (1 - cfg.gate_min_gain):
        problems.append(f"held-out NLL {nll_c:.4f} of the compressed model does not beat the base's {nll_base:.4f}"
                        + (f" by {cfg.gate_min_gain:.0%}" if cfg.gate_min_gain else ""))
    if kl > cfg.gate_max_kl:
        problems.append(f"drift KL(base||personal) {kl:.3f} nats/token exceeds the bound {cfg.gate_max_kl}")
    if fidelity is None or fidelity < cfg.gate_min_fidelity:
        kept = "no gain to keep" if fidelity is None else f"{fidelity:.0%}"
        problems.append(f"the 1-bit delta keeps {kept} of the LoRA's held-out gain (need {cfg.gate_min_fidelity:.0%})")
    return {
        "passed": not problems,
        "reason": "; ".join(problems) if problems else "beats the base, bounded drift, faithful compression",
        "heldout_loss_base": nll_base,
        "heldout_loss_lora": nll_lora,
        "heldout_loss_compressed": nll_c,
        "personalization_score": personalization_score(nll_base, nll_c),
        "fidelity": fidelity,
        "kl_drift": kl,
        "delta_bytes": delta.nbytes,
    }


def judge_bundle(base: BaseModel, verified, heldout: list[TokenizedExample], cfg: Personalization) -> dict:
    """The gate for a model trained elsewhere (a remote trainer): the node measures the base and the received
    1-bit delta on its own held-out examples; only the LoRA's held-out NLL (for the fidelity test) is the
    trainer's, taken from the signed manifest. `verified`: node.Verified of the received bundle."""
    import tempfile
    from types import SimpleNamespace

    from ownlm.artifact.bundle import MANIFEST
    from ownlm.evaluate.metrics import assistant_nll

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in verified.files.items():
            if name != MANIFEST:
                (Path(tmp) / name).write_bytes(data)
        delta = load_delta(tmp, expect_base_sha256=base.sha256)
    lora = (verified.manifest.get("training") or {}).get("heldout_loss_personal")
    report = SimpleNamespace(heldout_loss_base=assistant_nll(base.model, heldout).mean_nll,
                             heldout_loss_personal=lora if isinstance(lora, (int, float)) else None)
    return judge(base, delta, heldout, report, cfg)

"""Shared fixtures.

- Every test gets its own empty ownlm home (OWNLM_HOME -> tmp), like a fresh user.
- `model_cache_home`: a home kept across runs in .ownlm-test-cache/ where the embedded GGUF is converted to
  safetensors once (about 30 s on a fresh machine); real-model tests and the tiny model's tokenizer use it.
- `tiny_base`: a random 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer, saved as a checkpoint
  directory, for fast code-path tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
CACHE_ROOT = Path(os.environ.get("OWNLM_TEST_CACHE", REPO / ".ownlm-test-cache"))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("OWNLM_HOME", str(h))
    for var in ("OWNLM_BASE", "OWNLM_DEVICE", "OWNLM_ENGINE", "OWNLM_THREADS", "OWNLM_PORT", "OWNLM_HOST"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture(scope="session")
def model_cache_home() -> Path:
    """A home whose embedded-base cache is built once per machine."""
    from ownlm.basemodel import checkpoint_dir, resolve_base

    h = CACHE_ROOT / "home"
    h.mkdir(parents=True, exist_ok=True)
    checkpoint_dir(resolve_base("embedded"), h)
    return h


@pytest.fixture(scope="session")
def embedded_checkpoint(model_cache_home) -> Path:
    from ownlm.basemodel import checkpoint_dir, resolve_base

    directory, _, _ = checkpoint_dir(resolve_base("embedded"), model_cache_home)
    return directory


@pytest.fixture(scope="session")
def tiny_base(embedded_checkpoint, tmp_path_factory) -> Path:
    """Checkpoint dir of a random tiny Llama (2 layers, hidden 64, 4 heads, 2 KV heads) + SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_checkpoint))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def run_cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """The real `ownlm` command in a subprocess (as a user runs it)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ownlm", *args], capture_output=True, text=True, env=full_env, input=input, timeout=300
    )


def make_tiny_delta(tiny_base: Path, root: Path, seed: int = 1, scale: float = 1.0, r: int = 8,
                    modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A lora1 BitDelta (root/delta) of a random LoRA (r=8 on q/v unless told) on `tiny_base`, plus
    root/report.json, as the trainer would produce them. `scale` multiplies the LoRA B factor (a larger or
    smaller change)."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.bitdelta import CompressConfig, compress_lora, read_adapter, save_delta

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules), init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(root / "adapter")
    sha = base_sha256(resolve_base(str(tiny_base)), root / "home")
    delta = compress_lora(read_adapter(root / "adapter"), CompressConfig(mode="lora1"), sha)
    save_delta(delta, root / "delta")
    report = {"samples": 12, "tokens": 3456, "duration_s": 1.5, "loss": 2.1, "heldout_loss_base": 3.2,
              "heldout_loss_personal": 2.9, "dataset": {"merkle_root": "ab" * 32}}
    (root / "report.json").write_text(json.dumps(report))
    return root


@pytest.fixture(scope="module")
def tiny_engine(tiny_base):
    """A TorchEngine on `tiny_base` (CPU), shared by a module's tests."""
    from ownlm.basemodel import load_base
    from ownlm.engine import TorchEngine
    from ownlm.settings import load_settings

    return TorchEngine(load_base(load_settings(base=str(tiny_base), device="cpu")))


@pytest.fixture(scope="session")
def tiny_delta(tiny_base, tmp_path_factory):
    """See make_tiny_delta."""
    return make_tiny_delta(tiny_base, tmp_path_factory.mktemp("tiny-delta"))

import json
import shutil

import pytest
import torch

from ownlm.basemodel import (
    CACHE_MARKER,
    EMBEDDED_GGUF,
    base_sha256,
    checkpoint_dir,
    embedded_gguf_path,
    file_sha256,
    load_base,
    resolve_base,
)
from ownlm.errors import BaseModelInvalid, BaseModelNotFound
from ownlm.settings import load_settings


def test_embedded_gguf_is_installed():
    p = embedded_gguf_path()
    assert p.name == EMBEDDED_GGUF and p.stat().st_size > 90_000_000
    src = resolve_base("embedded")
    assert src.kind == "gguf" and src.is_embedded


def test_missing_path_names_it(tmp_path):
    with pytest.raises(BaseModelNotFound) as e:
        resolve_base(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in e.value.message


def test_non_gguf_file_and_empty_dir(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(BaseModelInvalid, match="not a .gguf"):
        resolve_base(str(f))
    with pytest.raises(BaseModelInvalid, match="no config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BaseModelInvalid, match="no weight files"):
        resolve_base(str(tmp_path))


def test_truncated_gguf_is_a_clear_error(tmp_path, home):
    bad = tmp_path / "broken.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(4096))
    with pytest.raises(BaseModelInvalid, match="cannot load GGUF"):
        checkpoint_dir(resolve_base(str(bad)), home)
    assert not any((home / "cache" / "base").glob("*/" + CACHE_MARKER))  # nothing half-cached


def test_checkpoint_sha_is_stable_and_memoised(tiny_base, home):
    src = resolve_base(str(tiny_base))
    first = base_sha256(src, home)
    memo = json.loads((home / "cache" / "hashes.json").read_text())
    assert list(memo.values()) == [first]
    assert base_sha256(src, home) == first
    # the fingerprint follows the weights: a changed weight file gives a different sha
    copy = home.parent / "tiny-copy"
    shutil.copytree(tiny_base, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\x01")
    assert base_sha256(resolve_base(str(copy)), home) != first


def test_load_tiny_checkpoint(tiny_base):
    b = load_base(load_settings(base=str(tiny_base), device="cpu"))
    assert b.source.kind == "hf" and not b.from_cache
    assert b.n_params < 5_000_000
    assert not b.model.training
    assert b.tokenizer.pad_token_id is not None


@pytest.mark.slow
def test_embedded_cache_is_keyed_by_gguf_sha(model_cache_home):
    src = resolve_base("embedded")
    directory, sha, cached = checkpoint_dir(src, model_cache_home)
    assert cached and directory.name == sha
    marker = json.loads((directory / CACHE_MARKER).read_text())
    assert marker["sha256"] == file_sha256(src.path) == sha
    assert (directory / "model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_model_greedy_answer(model_cache_home):
    from ownlm.engine import GenerationParams, TorchEngine

    b = load_base(load_settings(home=str(model_cache_home), device="cpu"))
    assert b.from_cache and b.model.dtype == torch.float32
    assert b.n_params == 134_515_008  # SmolLM2-135M with tied embeddings
    engine = TorchEngine(b)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    stream = engine.stream(q, GenerationParams(max_tokens=32, temperature=0))
    assert stream.text() == "The capital of France is Paris."
    assert stream.finish_reason == "stop"

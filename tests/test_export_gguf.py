"""`ownlm export --format gguf-lora DIR`: the user's installed model as a GGUF LoRA that llama.cpp loads and serves
as the node does (on the tiny F32 GGUF base, one llama.cpp thread)."""

from __future__ import annotations

import gguf
import pytest
from click.testing import CliRunner

from ownlm.basemodel import base_sha256, resolve_base
from ownlm.bitdelta import load_delta
from ownlm.bitdelta.gguf_lora import write_gguf_lora
from ownlm.cli import cli
from ownlm.engine import GenerationParams
from ownlm.engine.llama import LlamaEngine
from ownlm.errors import InvalidInput, NotFound
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta
from tests.test_llama_engine import deploy, gguf_delta
from tests.tiny_gguf import write_tiny_gguf

Q = [{"role": "user", "content": "Tell me something about the sea."}]
GREEDY = GenerationParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def base_and_deltas(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    gguf_path = write_tiny_gguf(tiny_base, root / "tiny.gguf")
    return gguf_path, [make_tiny_delta(tiny_base, root / f"d{seed}", seed=seed, scale=30.0) for seed in (1, 2)]


def test_export_writes_the_serving_model_as_an_adapter_llama_cpp_serves(home, base_and_deltas, tiny_base, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    gguf_path, (d1, d2) = base_and_deltas
    monkeypatch.setenv("OWNLM_BASE", str(gguf_path))
    settings = load_settings()
    sha = base_sha256(resolve_base(settings.base), settings.home)
    with Store(home) as store:
        alice = store.create_user("alice")
        v1 = deploy(store, settings, alice, gguf_delta(d1, sha, tmp_path / "v1"), 1)
        deploy(store, settings, alice, gguf_delta(d2, sha, tmp_path / "v2"), 2)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "llama-cli -m" in result.output and "--lora" in result.output
    exported = tmp_path / "out" / "adapter.gguf"
    assert exported.stat().st_mode & 0o777 == 0o600
    assert gguf.GGUFReader(str(exported)).get_field("general.type").contents() == "adapter"
    old = runner.invoke(cli, ["export", "--format", "gguf-lora", "--version", "1", str(tmp_path / "old")])
    assert old.exit_code == 0, old.output
    assert v1 in old.output

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    direct = {f"v{i}": write_gguf_lora(load_delta(d / "delta"), gguf_path, tmp_path / f"direct{i}.gguf")
              for i, d in ((1, d1), (2, d2))}
    engine = LlamaEngine(gguf_path, tok, "tiny", threads=1,
                         adapters={**direct, "exported": exported, "old": tmp_path / "old" / "adapter.gguf"})
    answers = {k: engine.stream(Q, GREEDY, adapter=k).text() for k in (None, "v1", "v2", "exported", "old")}
    assert answers["exported"] == answers["v2"] != answers[None]  # the serving model (v2)
    assert answers["old"] == answers["v1"] != answers["v2"]


def test_export_refuses_what_it_cannot_write(home, base_and_deltas, tiny_base, tmp_path, monkeypatch):
    gguf_path, (d1, _) = base_and_deltas
    runner = CliRunner()
    monkeypatch.setenv("OWNLM_BASE", str(gguf_path))
    with Store(home) as store:
        store.create_user("bob")
    result = runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "out")])
    assert isinstance(result.exception, NotFound) and "served by the base" in str(result.exception)
    settings = load_settings()
    with Store(home) as store:
        deploy(store, settings, store.resolve_user("bob"),
               gguf_delta(d1, base_sha256(resolve_base(settings.base), settings.home), tmp_path / "v1"), 1)
    assert runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "out")]).exit_code == 0
    again = runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "out")])
    assert isinstance(again.exception, InvalidInput) and "already exists" in str(again.exception)
    missing = runner.invoke(cli, ["export", "--format", "gguf-lora", "--version", "7", str(tmp_path / "x")])
    assert isinstance(missing.exception, NotFound)
    assert runner.invoke(cli, ["export", "--format", "onnx", str(tmp_path / "y")]).exit_code == 2  # click's choice
    monkeypatch.setenv("OWNLM_BASE", str(tiny_base))  # a checkpoint directory: no GGUF to fit
    hf = runner.invoke(cli, ["export", "--format", "gguf-lora", str(tmp_path / "z")])
    assert isinstance(hf.exception, InvalidInput) and "GGUF base" in str(hf.exception)

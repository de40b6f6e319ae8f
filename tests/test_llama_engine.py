"""The llama.cpp engine (engine/llama.py) on the tiny random Llama as an F32 GGUF (tests/tiny_gguf.py), one thread.

F32 on both sides, so llama.cpp and torch compute the same model up to float rounding: the adapter's layout, the
per-request adapter choice and the request mapping are what these tests can catch. The real Q4_1 base against
the torch engine is tests/test_llama_parity.py.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ownlm.basemodel import base_sha256, resolve_base
from ownlm.bitdelta import apply, gguf_lora, load_delta, save_delta
from ownlm.bitdelta.gguf_lora import write_gguf_lora
from ownlm.engine import GenerationParams
from ownlm.engine.llama import LlamaEngine, LlamaPersonalEngine, load_llama_engine
from ownlm.errors import EngineUnavailable, ModelUnavailable, Overloaded
from ownlm.node.install import rollback
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta
from tests.test_personal_engine import deploy
from tests.tiny_gguf import write_tiny_gguf

Q = [{"role": "user", "content": "Tell me something about the sea."}]
GREEDY = GenerationParams(max_tokens=12, temperature=0)
TOP = 5  # log-probabilities compared per position


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    """The tiny GGUF, its tokenizer, two LoRA deltas that visibly change it, and their adapter files."""
    root = tmp_path_factory.mktemp("llama-world")
    gguf = write_tiny_gguf(tiny_base, root / "tiny.gguf")
    deltas = {name: make_tiny_delta(tiny_base, root / name, seed=seed, scale=30.0) for name, seed in (("a", 1), ("b", 2))}
    adapters = {name: write_gguf_lora(load_delta(d / "delta"), gguf, root / f"{name}.gguf") for name, d in deltas.items()}
    return {"gguf": gguf, "tok": AutoTokenizer.from_pretrained(str(tiny_base)), "deltas": deltas, "adapters": adapters,
            "root": root}


@pytest.fixture(scope="module")
def engine(world):
    return LlamaEngine(world["gguf"], world["tok"], "tiny", adapters=world["adapters"], threads=1)


def torch_logprobs(tiny_base, ids: list[int], delta_root=None) -> torch.Tensor:
    """(len(ids), vocab) next-token log-probabilities of one forward pass, the delta merged."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    if delta_root is not None:
        apply(model, load_delta(delta_root / "delta"))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def compare(engine, tiny_base, world, adapter):
    """(top-1 agreement, max |d log p| over llama.cpp's top-TOP tokens) on the answer positions of Q."""
    prompt = engine.encode_chat(Q)
    ids = prompt + engine.tokenizer.encode(" The sea is large and blue, and the fish swim in it all day.")
    start = len(prompt)
    ref = torch_logprobs(tiny_base, ids, world["deltas"][adapter] if adapter else None)
    got = engine.next_token_logprobs(ids, range(start, len(ids) + 1), TOP, adapter=adapter)
    agree = sum(max(g, key=g.get) == int(ref[t - 1].argmax()) for t, g in zip(range(start, len(ids) + 1), got))
    err = max(abs(lp - float(ref[t - 1, tok])) for t, g in zip(range(start, len(ids) + 1), got) for tok, lp in g.items())
    return agree / len(got), err


def test_base_matches_torch(engine, tiny_base, world):
    agree, err = compare(engine, tiny_base, world, None)
    assert agree == 1.0 and err < 1e-3


def test_adapter_matches_torch_with_the_delta_merged(engine, tiny_base, world):
    base_ref = torch_logprobs(tiny_base, engine.encode_chat(Q))
    personal_ref = torch_logprobs(tiny_base, engine.encode_chat(Q), world["deltas"]["a"])
    assert (base_ref - personal_ref).abs().max() > 0.05  # the delta matters
    for name in ("a", "b"):
        agree, err = compare(engine, tiny_base, world, name)
        assert agree == 1.0 and err < 5e-3, name  # llama.cpp keeps K and V in f16


def test_an_adapter_on_all_seven_linear_layers_matches_torch(world, tiny_base, tmp_path):
    """r=1 on q, k, v, o and the MLP's gate, up and down (a layout the recipe sweep measured): every module's
    llama.cpp name, the k rows' rotary permutation and the MLP shapes."""
    from ownlm.bitdelta.config import LLAMA_LINEARS

    root = make_tiny_delta(tiny_base, tmp_path / "all7", seed=3, scale=30.0, r=1, modules=LLAMA_LINEARS)
    delta = load_delta(root / "delta")
    assert {p.split(".")[-2] for p in delta.lora_pairs()} == set(LLAMA_LINEARS)
    engine = LlamaEngine(world["gguf"], world["tok"], "tiny", threads=1,
                         adapters={"all7": write_gguf_lora(delta, world["gguf"], tmp_path / "all7.gguf")})
    base_ref = torch_logprobs(tiny_base, engine.encode_chat(Q))
    assert (base_ref - torch_logprobs(tiny_base, engine.encode_chat(Q), root)).abs().max() > 0.05
    agree, err = compare(engine, tiny_base, {"deltas": {"all7": root}}, "all7")
    assert agree == 1.0 and err < 5e-3


def test_adapter_without_the_rotary_permutation_serves_another_model(world, tiny_base, monkeypatch, tmp_path):
    """Trap 1 of issue 17: the adapter loads either way; only the permuted one is the delta."""
    monkeypatch.setattr(gguf_lora, "rope_permute_rows", lambda rows, n_head: rows)
    path = write_gguf_lora(load_delta(world["deltas"]["a"] / "delta"), world["gguf"], tmp_path / "unpermuted.gguf")
    wrong = LlamaEngine(world["gguf"], world["tok"], "tiny", adapters={"a": path}, threads=1)
    agree, err = compare(wrong, tiny_base, world, "a")
    assert err > 0.1 and agree < 0.5  # measured: agreement 0, error 1.0


def test_scale_zero_is_the_base_exactly(engine, world):
    bare = LlamaEngine(world["gguf"], world["tok"], "tiny", threads=1)
    ids = engine.encode_chat(Q) + [504, 3458, 314, 253]
    positions = range(len(ids) - 4, len(ids) + 1)
    assert engine.next_token_logprobs(ids, positions, TOP) == bare.next_token_logprobs(ids, positions, TOP)
    assert engine.stream(Q, GREEDY).text() == bare.stream(Q, GREEDY).text()


def test_adapters_do_not_leak_into_each_other_or_the_base(engine, world):
    """Trap 2 of issue 17: the same prompt under a, the base, b, a again: each answer is its model's alone."""
    fresh = {}
    for name in ("a", None, "b"):
        alone = LlamaEngine(world["gguf"], world["tok"], "tiny", adapters=world["adapters"], threads=1)
        fresh[name] = alone.stream(Q, GREEDY, adapter=name).text()
    assert len(set(fresh.values())) == 3  # three different models
    for name in ("a", None, "b", "a", None, None, "b", "b"):
        assert engine.stream(Q, GREEDY, adapter=name).text() == fresh[name], name


def test_stream_pieces_usage_stop_and_max_tokens(engine):
    stream = engine.stream(Q, GenerationParams(max_tokens=10, temperature=0), adapter="a")
    pieces = list(stream)
    assert len(pieces) > 1 and stream.finish_reason == "length" and stream.completion_tokens == 10
    assert stream.prompt_tokens == len(engine.encode_chat(Q))
    text = "".join(pieces)
    stop = [w for w in text.split()[1:] if w.isascii() and w.isalpha() and len(w) >= 3][0]  # a later whole word
    stopped = engine.stream(Q, GenerationParams(max_tokens=10, temperature=0, stop=[stop]), adapter="a")
    assert stopped.text() == text[: text.index(stop)] and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 10


def test_seed_makes_sampling_reproducible(engine):
    def sample(seed):
        return engine.stream(Q, GenerationParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed), adapter="b").text()
    assert sample(2**63) == sample(2**63)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_cancel_deadline_line_and_shutdown(world):
    engine = LlamaEngine(world["gguf"], world["tok"], "tiny", threads=1, max_waiting=0)
    stream = engine.stream(Q, GenerationParams(max_tokens=200, temperature=1.0, seed=1))
    next(stream)
    stream.cancel()
    rest = list(stream)
    assert stream.finish_reason == "cancelled" and len(rest) < 190
    with engine._lock, pytest.raises(Overloaded):  # a generation is running: the line (0 places) is full
        engine.stream(Q, GREEDY).text()
    engine.close()
    with pytest.raises(ModelUnavailable):
        engine.stream(Q, GREEDY)


def gguf_delta(delta_root, sha: str, out):
    """The delta of `delta_root` re-labelled for the base with fingerprint `sha` (the tiny GGUF)."""
    save_delta(replace(load_delta(delta_root / "delta"), base_sha256=sha), out / "delta")
    shutil.copy(delta_root / "report.json", out / "report.json")
    return out


def test_personal_engine_routes_each_user_and_follows_installs(world, engine, home, tmp_path):
    settings = load_settings(base=str(world["gguf"]), device="cpu")
    sha = base_sha256(resolve_base(settings.base), settings.home)
    store = Store(home)
    try:
        alice, bob, carol = store.create_user("alice"), store.create_user("bob"), store.create_user("carol")
        a_mid = deploy(store, settings, alice, gguf_delta(world["deltas"]["a"], sha, tmp_path / "a"), 1)
        personal = LlamaPersonalEngine(world["gguf"], world["tok"], store, sha, "tiny", threads=1)
        assert personal.adapters == [(alice.id, a_mid)]
        assert not list((home / "cache").glob(".llama-adapters-*"))  # the derived files are gone once loaded
        want = {name: engine.stream(Q, GREEDY, adapter=name).text() for name in ("a", "b", None)}
        s = personal.stream(Q, GREEDY, user_id=alice.id)
        assert s.text() == want["a"] and s.model_id == (alice.id, a_mid)
        assert personal.stream(Q, GREEDY, user_id=alice.id, use="base").text() == want[None]
        assert personal.stream(Q, GREEDY, user_id=carol.id).text() == want[None]
        b_mid = deploy(store, settings, bob, gguf_delta(world["deltas"]["b"], sha, tmp_path / "b"), 1)
        waiting = personal.stream(Q, GREEDY, user_id=bob.id)  # asked before the refresh, generated after it
        assert personal.refresh_if_changed() and sorted(personal.adapters) == sorted([(alice.id, a_mid), (bob.id, b_mid)])
        assert waiting.text() == want["b"] and waiting.model_id == (bob.id, b_mid)
        assert personal.stream(Q, GREEDY, user_id=alice.id).text() == want["a"]
        rollback(store, alice.id, "base")
        assert personal.refresh_if_changed() and personal.adapters == [(bob.id, b_mid)]
        assert personal.stream(Q, GREEDY, user_id=alice.id).text() == want[None]
        assert not personal.refresh_if_changed()
    finally:
        store.close()


def test_load_llama_engine_says_what_is_missing(tiny_base, monkeypatch):
    settings = load_settings(base=str(tiny_base), engine="llama")
    with pytest.raises(EngineUnavailable, match="GGUF bases"):
        load_llama_engine(settings, store=None)
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # as if not installed
    with pytest.raises(EngineUnavailable, match="pip install xllamacpp"):
        load_llama_engine(settings, store=None)


def test_repetition_penalty_picks_the_same_tokens_as_the_torch_engine(engine, tiny_base):
    # last in the module: its answers leave the shared engine's slot holding another prompt's KV, which the
    # exact-equality tests above must not see
    from ownlm.basemodel import load_base
    from ownlm.engine import TorchEngine

    reference = TorchEngine(load_base(load_settings(base=str(tiny_base), device="cpu", threads=1)))
    penalised = GenerationParams(max_tokens=24, temperature=0, repetition_penalty=1.5)
    got = engine.stream(Q, penalised).text()
    assert got == reference.stream(Q, penalised).text()
    assert got != engine.stream(Q, replace(penalised, repetition_penalty=1.0)).text()

"""A lora1 delta as a GGUF LoRA adapter (bitdelta/gguf_lora.py): exact factors, llama.cpp's names and rotary row
order, refusals. That llama.cpp serves it as the torch engine does is tests/test_llama_engine.py."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest

from ownlm.basemodel import embedded_gguf_path
from ownlm.bitdelta import load_delta
from ownlm.bitdelta.gguf_lora import BASE_SHA_KEY, BaseLayout, lora_tensors, rope_permute_rows, write_gguf_lora
from ownlm.bitdelta.quant import dequantise
from ownlm.errors import DeltaMismatch
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base, tmp_path_factory):
    return write_tiny_gguf(tiny_base, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of rope_permute_rows, written from its definition: old row t * d/2 + j = new row 2j + t."""
    d = rows.shape[0] // n_head
    out = np.empty_like(rows)
    for h in range(n_head):
        for j in range(d // 2):
            for t in range(2):
                out[h * d + t * d // 2 + j] = rows[h * d + 2 * j + t]
    return out


def test_base_layout_of_the_embedded_gguf():
    layout = BaseLayout.read(embedded_gguf_path())
    assert (layout.architecture, layout.block_count, layout.n_head, layout.n_head_kv) == ("llama", 30, 9, 3)
    assert layout.weight_shapes["blk.0.attn_q.weight"] == (576, 576)  # (out, in)
    assert layout.weight_shapes["blk.29.attn_k.weight"] == (192, 576)
    assert layout.weight_shapes["blk.0.ffn_down.weight"] == (576, 1536)


def test_rope_permutation_turns_hf_halves_rotary_into_llama_cpp_pairs():
    """Rotating q by HF's rule (row j with row j + d/2) then permuting equals permuting then rotating by
    llama.cpp's rule (row 2j with row 2j + 1): the permutation is the one that makes the two layouts agree."""
    rng = np.random.default_rng(0)
    n_head, d, pos = 3, 8, 5
    q = rng.standard_normal((n_head * d, 1))
    theta = pos * 10000.0 ** (-np.arange(d // 2) * 2 / d)  # (d/2,) angles of the rotated pairs
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def hf_rope(x):  # per head: x1 = rows [0, d/2), x2 = rows [d/2, d); (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
        x = x.reshape(n_head, d, -1)
        x1, x2 = x[:, : d // 2], x[:, d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1).reshape(n_head * d, -1)

    def pair_rope(x):  # per head: rows (2j, 2j + 1) rotated by theta_j
        x = x.reshape(n_head, d // 2, 2, -1).copy()
        a, b = x[:, :, 0].copy(), x[:, :, 1].copy()
        x[:, :, 0], x[:, :, 1] = a * cos - b * sin, b * cos + a * sin
        return x.reshape(n_head * d, -1)

    assert np.allclose(rope_permute_rows(hf_rope(q), n_head), pair_rope(rope_permute_rows(q, n_head)))
    assert not np.allclose(hf_rope(q), pair_rope(q))  # without it the layouts disagree
    assert np.array_equal(unpermute_rows(rope_permute_rows(q, n_head), n_head), q)


def test_adapter_file_holds_the_delta_factors_exactly(tiny_delta, tiny_gguf, tmp_path):
    delta = load_delta(tiny_delta / "delta")
    path = write_gguf_lora(delta, tiny_gguf, tmp_path / "out" / "adapter.gguf")
    assert path.stat().st_mode & 0o777 == 0o600 and not list(path.parent.glob(".*tmp"))
    reader = gguf.GGUFReader(str(path))
    meta = {k: reader.get_field(k).contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                          "adapter.lora.alpha", BASE_SHA_KEY)}
    assert meta == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                    "adapter.lora.alpha": 16.0, BASE_SHA_KEY: delta.base_sha256}
    tensors = {t.name: t for t in reader.tensors}
    pairs = delta.lora_pairs()
    assert len(tensors) == 2 * len(pairs) == 8  # q and v of 2 layers
    heads = {"attn_q": 4, "attn_k": 2}
    for param, (qa, qb) in pairs.items():
        layer, kind = param.split(".")[2], {"q_proj": "attn_q", "v_proj": "attn_v"}[param.split(".")[4]]
        a, b = tensors[f"blk.{layer}.{kind}.weight.lora_a"], tensors[f"blk.{layer}.{kind}.weight.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(a.shape) == (64, 8) and tuple(b.shape[::-1]) == tuple(qb.shape)  # ggml ne: reversed numpy shape
        a_np, b_np = np.asarray(a.data).reshape(8, 64), np.asarray(b.data).reshape(qb.shape)
        assert np.array_equal(a_np, dequantise(qa).numpy())  # A as is
        expect_b = dequantise(qb).numpy()
        if kind in heads:  # B of q in llama.cpp's rotary order, exactly the same numbers
            assert not np.array_equal(b_np, expect_b)
            b_np = unpermute_rows(b_np, heads[kind])
        assert np.array_equal(b_np, expect_b)


def test_refuses_deltas_llama_cpp_cannot_serve(tiny_delta, tiny_gguf):
    delta = load_delta(tiny_delta / "delta")
    layout = BaseLayout.read(tiny_gguf)
    with pytest.raises(DeltaMismatch, match="not a LoRA"):
        lora_tensors(replace(delta, mode="dense"), layout)
    with pytest.raises(DeltaMismatch, match="architecture 'qwen2'"):
        lora_tensors(delta, replace(layout, architecture="qwen2"))
    with pytest.raises(DeltaMismatch, match="has no weight"):
        lora_tensors(delta, replace(layout, weight_shapes={}))
    wrong = dict(layout.weight_shapes, **{"blk.0.attn_q.weight": (32, 64)})
    with pytest.raises(DeltaMismatch, match=r"\(32, 64\) in the base GGUF"):
        lora_tensors(delta, replace(layout, weight_shapes=wrong))
    with pytest.raises(DeltaMismatch, match="heads"):
        rope_permute_rows(np.zeros((6, 2), np.float32), 4)

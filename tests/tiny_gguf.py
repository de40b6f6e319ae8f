"""The tiny random Llama (tests/conftest.py `tiny_base`) as an F32 GGUF that llama.cpp loads, for fast tests
of the llama.cpp engine and of GGUF LoRA adapters.

Written the way llama.cpp's convert_hf_to_gguf.py writes a Llama (its tensor names, q/k rows in its rotary
order via gguf_lora.rope_permute_rows, tied embeddings with no output.weight); the tokenizer fields are copied
from the embedded SmolLM2 GGUF, whose tokenizer `tiny_base` shares. F32 weights, so llama.cpp and torch compute
the same model up to float rounding: differences come from the adapter's layout, not from quantised kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from safetensors.numpy import load_file

from ownlm.basemodel import embedded_gguf_path
from ownlm.bitdelta.gguf_lora import rope_permute_rows

# HF parameter of one block -> GGUF tensor of that block
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_tiny_gguf(checkpoint: Path, out: Path) -> Path:
    """`checkpoint`: a Hugging Face Llama directory (config.json + model.safetensors, tied embeddings)."""
    config = json.loads((checkpoint / "config.json").read_text())
    weights = load_file(str(checkpoint / "model.safetensors"))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_dimension_count(config["hidden_size"] // n_head)
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, name in BLOCK_TENSORS.items():
            t = weights[f"model.layers.{i}.{hf}"]
            if name == "attn_q.weight":
                t = rope_permute_rows(t, n_head)
            elif name == "attn_k.weight":
                t = rope_permute_rows(t, n_kv)
            w.add_tensor(f"blk.{i}.{name}", t.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def place_conversion(checkpoint: Path, gguf_path: Path, home: Path) -> Path:
    """Put `checkpoint` (the one `gguf_path` was written from) in `home` as the GGUF's safetensors conversion,
    the cache that basemodel.checkpoint_dir would otherwise build by converting the GGUF (13 s for the tiny one,
    most of it the tokenizer); returns its directory. The llama.cpp engine reads the base's tokenizer there."""
    import shutil

    from ownlm.basemodel import CACHE_MARKER, base_sha256, cache_dir, resolve_base

    sha = base_sha256(resolve_base(str(gguf_path)), home)
    directory = Path(shutil.copytree(checkpoint, cache_dir(home, sha)))
    (directory / CACHE_MARKER).write_text(json.dumps({"source": str(gguf_path), "name": gguf_path.stem, "sha256": sha}))
    return directory

"""A lora1 delta as a GGUF LoRA adapter for llama.cpp: F32 factors under llama.cpp's names, q/k rows permuted.

llama.cpp's adapter format (src/llama-adapter.cpp): general.type = 'adapter', general.architecture = the
base's, adapter.type = 'lora', adapter.lora.alpha (f32), and per target weight two tensors
'<weight name>.lora_a' and '<weight name>.lora_b', e.g. 'blk.3.attn_q.weight.lora_a'. numpy A (r, in) and
B (out, r) are written as they are: ggml's ne is the numpy shape reversed, A ne = [in, r], B ne = [r, out],
which is what llama.cpp checks against the base weight's ne = [in, out]. llama.cpp adds
scale * (alpha / r) * B A x, so a request scale of 1 is peft's scaling and the delta.py weight delta exactly.

Rotary layout (trap 1 of issue 17): in Hugging Face Llama each head of q_proj/k_proj rotates row j with row
j + d/2 (halves); llama.cpp's 'llama' architecture rotates rows 2j and 2j + 1 (pairs), so its converter
(convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of q_proj per attention head and of k_proj per
KV head: new row 2j + t of a head is old row t * d/2 + j. The base GGUF holds the reordered weights. W + B A
changes the rows of W through B only, so B of q and k is reordered the same way and A is left alone. Without
it the adapter loads and silently serves another model.

F32 factors: issue 17 measured that F16 factors changed greedy answers and F32 did not. The file is small
anyway (LoRA r=8 on q/v of the 135M base: 1.8 MB). Decompression is exact: the tensors are dequantise()'s
float32 signs x scales, only reordered.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ownlm.bitdelta.delta import Delta
from ownlm.bitdelta.quant import dequantise
from ownlm.errors import DeltaMismatch
from ownlm.fsutil import PRIVATE_FILE, mkdir_private

HINT = "serve this delta with the torch engine (engine = \"torch\"), or train it on a Llama GGUF base"
# The llama.cpp architectures whose converter applies LlamaModel.permute to q/k (others keep HF's row order).
PERMUTED_ARCHITECTURES = ("llama",)
BASE_SHA_KEY = "ownlm.base_sha256"  # provenance in the adapter file; llama.cpp ignores unknown keys


@dataclass(frozen=True)
class BaseLayout:
    """What the adapter must agree with in a base GGUF: its architecture, head counts and weight shapes."""

    architecture: str
    block_count: int
    n_head: int
    n_head_kv: int
    weight_shapes: dict[str, tuple[int, int]]  # GGUF tensor name -> (out, in), e.g. 'blk.0.attn_q.weight'
    context_length: int = 2048  # tokens the base was trained for

    @classmethod
    def read(cls, path: str | Path) -> "BaseLayout":
        """Read from a base .gguf's metadata and tensor list (the weights are not read). gguf's reader parses
        every field, the tokenizer's 100k strings included (3 s on 2 cores), so the result is kept per file
        version for the process: a deploy does not pay it again."""
        st = os.stat(path)
        return _read_layout(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_layout(path: str, size: int, mtime_ns: int) -> BaseLayout:
    reader = gguf.GGUFReader(path)

    def value(key: str, default=None):
        field = reader.get_field(key)
        if field is None and default is None:
            raise DeltaMismatch(f"base {path} has no {key} in its GGUF metadata", hint=HINT)
        return default if field is None else field.contents()

    arch = value(gguf.Keys.General.ARCHITECTURE)
    n_head = int(value(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)))
    shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
    return BaseLayout(arch, int(value(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))), n_head,
                      int(value(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)), shapes,
                      int(value(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch), 2048)))


def rope_permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of an (out, k) matrix from HF's rotary layout to llama.cpp's (see module doc):
    per head of d = out / n_head rows, new row 2j + t = old row t * d/2 + j."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise DeltaMismatch(f"{out} rows do not split into {n_head} heads of an even size", hint=HINT)
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_tensors(delta: Delta, layout: BaseLayout) -> dict[str, np.ndarray]:
    """The adapter's tensors: '<GGUF weight name>.lora_a' (r, in) and '.lora_b' (out, r), float32, checked
    against the base's weight shapes. Raises DeltaMismatch for a dense delta, another architecture, or a
    module the base does not have."""
    if delta.mode != "lora1":
        raise DeltaMismatch(f"a {delta.mode} delta is not a LoRA, llama.cpp cannot load it as an adapter", hint=HINT)
    if layout.architecture not in PERMUTED_ARCHITECTURES:
        raise DeltaMismatch(f"GGUF LoRA adapters for architecture {layout.architecture!r} are not supported", hint=HINT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layout.block_count)
    heads = {gguf.MODEL_TENSOR.ATTN_Q: layout.n_head, gguf.MODEL_TENSOR.ATTN_K: layout.n_head_kv}
    heads = {gguf.TENSOR_NAMES[k].rpartition(".")[2]: n for k, n in heads.items()}  # 'attn_q' -> n_head
    tensors: dict[str, np.ndarray] = {}
    for param, (qa, qb) in delta.lora_pairs().items():
        module = param.removesuffix(".weight")
        name = names.get_name(module)
        if name is None or f"{name}.weight" not in layout.weight_shapes:
            raise DeltaMismatch(f"the base GGUF has no weight for module {module}", hint=HINT)
        weight = f"{name}.weight"
        if layout.weight_shapes[weight] != tuple(delta.param_shapes[param]):
            raise DeltaMismatch(f"{weight} is {layout.weight_shapes[weight]} in the base GGUF but "
                                f"{tuple(delta.param_shapes[param])} in the delta", hint=HINT)
        a, b = dequantise(qa).numpy(), dequantise(qb).numpy()  # (r, in), (out, r) float32
        n = heads.get(name.rpartition(".")[2])
        if n is not None:
            b = rope_permute_rows(b, n)
        tensors[f"{weight}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{weight}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return tensors


def write_gguf_lora(delta: Delta, base_gguf: str | Path, path: str | Path, layout: BaseLayout | None = None) -> Path:
    """Write `delta` as a GGUF LoRA adapter of `base_gguf` at `path`, atomically (temporary name, then rename)
    and private (0600: an adapter is derived from the user's conversations). Returns `path`."""
    layout = layout or BaseLayout.read(base_gguf)
    tensors = lora_tensors(delta, layout)
    path = Path(path)
    mkdir_private(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, layout.architecture)  # also writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(delta.lora_alpha))
        writer.add_string(BASE_SHA_KEY, delta.base_sha256)
        for name, t in tensors.items():
            writer.add_tensor(name, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, PRIVATE_FILE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

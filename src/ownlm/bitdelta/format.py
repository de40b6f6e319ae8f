"""The delta on disk: `delta.safetensors` (tensors) + `delta.json` (metadata). Never pickle.

Compact by design, because a personal model should be kilobytes: a lora1 delta of the 135M model is 57,600
bytes of signs, and per-module tensor names and shape lists would add half as much again. So
delta.safetensors holds just two tensors for all quantised entries — `signs` (uint8, every entry's packed
signs concatenated) and `scales` (every entry's scales concatenated, float16/float32) — plus, in dense mode,
one `full.<param name>` tensor per full-precision entry. Offsets follow from the shapes, in metadata order.
Its safetensors header metadata repeats the format name, mode and base hash so the file identifies itself.

delta.json holds: format, version, mode, bits, scales (granularity), scale_dtype, base_sha256,
target_modules, and
- lora1: lora {r, alpha} and modules [[module path, out_features, in_features], ...]; each module has
  entries '<path>.lora_A' (r, in) and '<path>.lora_B' (out, r) and changes '<path>.weight' (out, in);
- dense: quantised [[param name, rows, cols], ...] and full [[param name, shape], ...];
plus tensor_file {name, bytes, sha256} and metadata_sha256 (sha256 of the canonical JSON of all the other
fields, so an edited or damaged JSON is caught too).

load_delta checks all of it before returning anything: a truncated or altered file, a missing or extra
tensor, a shape or dtype that contradicts the metadata -> CorruptArtifact; a delta for another base ->
DeltaMismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ownlm.basemodel import file_sha256
from ownlm.bitdelta.config import GRANULARITIES, MODES
from ownlm.bitdelta.delta import LORA_A, LORA_B, Delta, entry_granularity
from ownlm.bitdelta.pack import packed_nbytes
from ownlm.bitdelta.quant import QuantTensor, scale_shape
from ownlm.errors import CorruptArtifact, DeltaMismatch, InvalidInput
from ownlm.fsutil import PRIVATE_FILE, mkdir_private, write_private

FORMAT = "ownlm-bitdelta"
VERSION = 2
TENSORS = "delta.safetensors"
METADATA = "delta.json"
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _canonical_sha(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_delta(delta: Delta, directory: str | Path) -> Path:
    """Write delta.safetensors then delta.json into `directory` (created); returns the directory.

    Each file is written under a temporary name and renamed, the JSON last: a crash leaves no valid-looking
    half delta. Both files are 0600 (a delta is derived from the user's conversations).
    """
    directory = Path(directory)
    mkdir_private(directory)
    dtypes = {q.scales.dtype for q in delta.quantised.values()}
    if len(dtypes) > 1 or not dtypes <= set(SCALE_DTYPES.values()):
        raise ValueError(f"scales must share one dtype of float16/float32, got {dtypes}")
    keys = _entry_order(delta)
    tensors: dict[str, torch.Tensor] = {}
    if keys:
        tensors["signs"] = torch.cat([delta.quantised[k].packed.reshape(-1) for k in keys]).contiguous()
        tensors["scales"] = torch.cat([delta.quantised[k].scales.detach().cpu().reshape(-1) for k in keys]).contiguous()
    for key, t in delta.full.items():
        tensors[f"full.{key}"] = t.detach().cpu().contiguous()
    tmp = directory / f".{TENSORS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "mode": delta.mode, "base_sha256": delta.base_sha256})
    os.chmod(tmp, PRIVATE_FILE)  # safetensors takes no mode
    os.replace(tmp, directory / TENSORS)
    scale_dtype = str(dtypes.pop()).removeprefix("torch.") if dtypes else "float16"
    meta = {
        "format": FORMAT, "version": VERSION, "mode": delta.mode, "bits": delta.bits,
        "scales": delta.granularity, "scale_dtype": scale_dtype, "base_sha256": delta.base_sha256,
        "target_modules": list(delta.target_modules),
    }
    if delta.mode == "lora1":
        meta["lora"] = {"r": delta.lora_r, "alpha": delta.lora_alpha}
        meta["modules"] = [[name.removesuffix(".weight"), *delta.param_shapes[name]] for name in delta.lora_pairs()]
    else:
        meta["quantised"] = [[k, *delta.quantised[k].shape] for k in keys]
        meta["full"] = [[k, list(t.shape)] for k, t in delta.full.items()]
    meta["tensor_file"] = {"name": TENSORS, "bytes": (directory / TENSORS).stat().st_size,
                           "sha256": file_sha256(directory / TENSORS)}
    meta["metadata_sha256"] = _canonical_sha(meta)
    tmp = directory / f".{METADATA}.tmp"
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted save
    write_private(tmp, json.dumps(meta, separators=(",", ":")).encode())
    os.replace(tmp, directory / METADATA)
    return directory


def _entry_order(delta: Delta) -> list[str]:
    """The order entries are concatenated in: per module A then B (lora1), or the quantised keys (dense)."""
    if delta.mode == "lora1":
        return [f"{name.removesuffix('.weight')}.{f}" for name in delta.lora_pairs() for f in (LORA_A, LORA_B)]
    return list(delta.quantised)


def read_metadata(directory: str | Path) -> dict:
    """delta.json, checked for shape and self-hash (not the tensor file: load_delta does that)."""
    directory = Path(directory)
    path = directory / METADATA
    if not path.is_file():
        raise InvalidInput(f"{directory} holds no {METADATA}", hint="pass a directory written by `ownlm compress`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptArtifact(f"{path} is not valid JSON ({e})", hint="recompress or re-fetch the delta") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptArtifact(f"{path} is not an {FORMAT} file", hint="pass a directory written by `ownlm compress`")
    if meta.get("version") != VERSION:
        raise CorruptArtifact(f"{path} has format version {meta.get('version')!r}, this ownlm reads {VERSION}",
                              hint="upgrade ownlm or recompress the delta")
    if meta.get("metadata_sha256") != _canonical_sha(meta):
        raise CorruptArtifact(f"{path} was altered or damaged (its metadata hash does not match)",
                              hint="recompress or re-fetch the delta")
    if meta.get("mode") not in MODES or meta.get("scales") not in GRANULARITIES or meta.get("bits") != 1 \
            or meta.get("scale_dtype") not in SCALE_DTYPES:
        raise CorruptArtifact(f"{path} has an unknown mode, bits, scales or scale_dtype", hint="recompress the delta")
    return meta


def _check_tensor_file(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
    path = directory / TENSORS
    expected = meta["tensor_file"]
    if not path.is_file():
        raise CorruptArtifact(f"{path} is missing", hint="recompress or re-fetch the delta")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CorruptArtifact(f"{path} is truncated or padded: {size} bytes, expected {expected['bytes']}",
                              hint="recompress or re-fetch the delta")
    if file_sha256(path) != expected["sha256"]:
        raise CorruptArtifact(f"{path} is corrupted (sha256 differs from {METADATA})",
                              hint="recompress or re-fetch the delta")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptArtifact(f"{path} cannot be read: {e}", hint="recompress the delta") from None


def load_delta(directory: str | Path, expect_base_sha256: str | None = None) -> Delta:
    """Read and fully verify a delta directory. Raises CorruptArtifact or DeltaMismatch (see module doc)."""
    directory = Path(directory)
    meta = read_metadata(directory)
    if expect_base_sha256 is not None and meta["base_sha256"] != expect_base_sha256:
        raise DeltaMismatch(f"{directory} was made for base {meta['base_sha256'][:12]}…, "
                            f"not {expect_base_sha256[:12]}…", hint="pass the base it was made from as --base")
    tensors = _check_tensor_file(directory, meta)
    granularity, scale_dtype = meta["scales"], SCALE_DTYPES[meta["scale_dtype"]]

    def take(name: str, dtype: torch.dtype | None, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.pop(name, None)
        if t is None:
            raise CorruptArtifact(f"{directory / TENSORS} lacks tensor {name}", hint="recompress the delta")
        if (dtype is not None and t.dtype != dtype) or tuple(t.shape) != shape:
            raise CorruptArtifact(f"tensor {name} is {t.dtype} {tuple(t.shape)}, expected {dtype or t.dtype} {shape}",
                                  hint="recompress the delta")
        return t

    try:
        entries, params, full_shapes, lora = _entries(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptArtifact(f"{directory / METADATA} lists its entries wrongly ({e})", hint="recompress the delta") from None
    grans = [entry_granularity(granularity, k) for k, _ in entries]
    n_signs = sum(packed_nbytes(r * c) for _, (r, c) in entries)
    n_scales = sum(scale_shape(shape, g)[0] for (_, shape), g in zip(entries, grans))
    signs = take("signs", torch.uint8, (n_signs,)) if entries else torch.zeros(0, dtype=torch.uint8)
    scales = take("scales", scale_dtype, (n_scales,)) if entries else torch.zeros(0, dtype=scale_dtype)
    quantised, s_pos, c_pos = {}, 0, 0
    for (key, shape), g in zip(entries, grans):
        ns, nc = packed_nbytes(shape[0] * shape[1]), scale_shape(shape, g)[0]
        quantised[key] = QuantTensor(signs[s_pos : s_pos + ns].clone(), shape, scales[c_pos : c_pos + nc].clone(), g)
        s_pos, c_pos = s_pos + ns, c_pos + nc
    full = {key: take(f"full.{key}", None, shape) for key, shape in full_shapes.items()}
    if tensors:
        raise CorruptArtifact(f"{directory / TENSORS} holds tensors its metadata does not list: {sorted(tensors)[:3]}",
                              hint="recompress the delta")
    delta = Delta(
        mode=meta["mode"], granularity=granularity, base_sha256=meta["base_sha256"],
        target_modules=tuple(meta["target_modules"]), quantised=quantised, param_shapes=params, full=full,
        lora_r=lora.get("r"), lora_alpha=lora.get("alpha"),
    )
    _check_consistent(directory, delta)
    return delta


def _entries(meta: dict) -> tuple[list[tuple[str, tuple[int, int]]], dict, dict, dict]:
    """(quantised entries [(key, (rows, cols))] in file order, changed params {name: shape}, full shapes, lora)."""
    if meta["mode"] == "lora1":
        lora = meta["lora"]
        r = int(lora["r"])
        entries, params = [], {}
        for path, out_f, in_f in meta["modules"]:
            entries += [(f"{path}.{LORA_A}", (r, int(in_f))), (f"{path}.{LORA_B}", (int(out_f), r))]
            params[f"{path}.weight"] = (int(out_f), int(in_f))
        return entries, params, {}, lora
    entries = [(k, (int(a), int(b))) for k, a, b in meta["quantised"]]
    full = {k: tuple(int(x) for x in shape) for k, shape in meta["full"]}
    return entries, {**{k: s for k, s in entries}, **full}, full, {}


def _check_consistent(directory: Path, delta: Delta) -> None:
    """Every changed parameter is covered by its tensors, with matching shapes."""
    covered: dict[str, tuple[int, ...]] = {}
    if delta.mode == "lora1":
        if not isinstance(delta.lora_r, int) or not isinstance(delta.lora_alpha, (int, float)):
            raise CorruptArtifact(f"{directory / METADATA} lacks lora r/alpha", hint="recompress the delta")
        try:
            pairs = delta.lora_pairs()
        except KeyError:
            pairs = {}
        if len(pairs) * 2 != len(delta.quantised):
            raise CorruptArtifact(f"{directory} has an unpaired LoRA factor", hint="recompress the delta")
        for name, (a, b) in pairs.items():
            if a.shape[0] != delta.lora_r or b.shape[1] != delta.lora_r:
                raise CorruptArtifact(f"{name}: factors do not have rank {delta.lora_r}", hint="recompress the delta")
            covered[name] = (b.shape[0], a.shape[1])
    else:
        covered.update({k: q.shape for k, q in delta.quantised.items()})
    covered.update({k: tuple(t.shape) for k, t in delta.full.items()})
    if covered != {k: tuple(v) for k, v in delta.param_shapes.items()}:
        raise CorruptArtifact(f"{directory / METADATA}: parameter list does not match the tensors",
                              hint="recompress the delta")

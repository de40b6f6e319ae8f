"""A user's installed personal model in the formats other tools load (`ownlm export`).

- gguf-lora: a LoRA adapter for llama.cpp on this node's GGUF base (bitdelta/gguf_lora.py: F32 factors, llama.cpp's
  tensor names and q/k row order). Run it with `llama-cli -m BASE.gguf --lora adapter.gguf`, or
  `llama-server -m BASE.gguf --lora adapter.gguf`.

The delta is read back through load_delta (integrity and base fingerprint checked) before anything is written; the
files are private (0600): they are derived from the user's conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ownlm.basemodel import base_sha256, resolve_base
from ownlm.errors import InvalidInput, NotFound

FORMATS = ("gguf-lora",)
GGUF_LORA_FILE = "adapter.gguf"


@dataclass
class Exported:
    path: Path  # the file written
    model_id: str
    version: int
    base: Path  # the base it applies to


def export_model(store, settings, user, directory: Path, fmt: str, version: str | None = None) -> Exported:
    """Write `user`'s model (`version`: an id or version number; default the one serving them) to `directory`."""
    from ownlm.bitdelta import load_delta
    from ownlm.bitdelta.gguf_lora import write_gguf_lora

    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    model = store.model(user.id, version) if version is not None else store.active_model(user.id)
    if model is None:
        raise NotFound(f"user {user.name} is served by the base model: there is no personal model to export",
                       hint="pass --version V (see `ownlm models`)")
    source = resolve_base(settings.base)
    if source.kind != "gguf":
        raise InvalidInput(f"a GGUF LoRA adapter needs a GGUF base, and this node's base {source.path} is a checkpoint directory",
                           hint="set base to the .gguf file the model was trained on")
    delta = load_delta(model["path"], expect_base_sha256=base_sha256(source, settings.home))
    target = Path(directory) / GGUF_LORA_FILE
    if target.exists():
        raise InvalidInput(f"{target} already exists", hint="pass a new directory, or remove the file first")
    write_gguf_lora(delta, source.path, target)
    return Exported(target, model["id"], model["version"], source.path)

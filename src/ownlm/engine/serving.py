"""Which engine serves a node (`ownlm serve`, `ownlm chat`): settings.engine, and what "auto" picks.

"auto" picks llama.cpp (engine/llama.py) when it can serve the base and is the faster engine there: the base
is a GGUF file (llama.cpp reads nothing else), the device is the CPU (on a CUDA GPU torch runs the base, and the
xllamacpp wheels installed by default are CPU builds), and xllamacpp imports. Otherwise torch
(engine/personal.py). Training, evaluation, the quality gate and the demo's probes use torch whatever this says:
they need gradients, batched greedy answers, or the exact logits the gate compares (`ownlm eval`'s speed rows
excepted: they time the engine chosen here).
"""

from __future__ import annotations

from dataclasses import dataclass

from ownlm.basemodel import resolve_base
from ownlm.settings import Settings


@dataclass(frozen=True)
class EngineChoice:
    name: str  # 'torch' or 'llama'
    reason: str  # why, in words (`ownlm info`, the serve banner)


def choose_engine(settings: Settings) -> EngineChoice:
    """The engine `settings` ask for (BaseModelNotFound/BaseModelInvalid for an unusable base)."""
    source = resolve_base(settings.base)
    if settings.engine != "auto":
        return EngineChoice(settings.engine, f"engine = {settings.engine} in the settings")
    if source.kind != "gguf":
        return EngineChoice("torch", f"auto: the base {source.path.name} is a checkpoint directory, and llama.cpp "
                                     "serves GGUF files")
    if _on_gpu(settings.device):
        return EngineChoice("torch", "auto: a CUDA GPU is in use, where torch runs the base")
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return EngineChoice("torch", "auto: the package xllamacpp is not installed (`pip install xllamacpp` for "
                                     "llama.cpp's speed)")
    return EngineChoice("llama", "auto: a GGUF base on the CPU, and xllamacpp is installed")


def _on_gpu(device: str) -> bool:
    """Whether torch would run on a CUDA GPU for this device setting (device.select_device's rule)."""
    if device == "cpu":
        return False
    import torch

    return device == "cuda" or torch.cuda.is_available()


def load_serving_engine(settings: Settings, store, max_waiting: int | None = None, choice: EngineChoice | None = None,
                        base=None):
    """The chosen personal engine on `store`'s routes. `base`: an already loaded BaseModel for torch."""
    choice = choice or choose_engine(settings)
    if choice.name == "llama":
        from ownlm.engine.llama import load_llama_engine

        return load_llama_engine(settings, store, max_waiting=max_waiting)
    from ownlm.basemodel import load_base
    from ownlm.engine.personal import PersonalEngine

    return PersonalEngine(base or load_base(settings), store, max_waiting=max_waiting)

"""Inference: the engine protocol the API and CLI talk to, and its torch implementation."""

from ownlm.engine.base import Engine, GenerationParams, GenerationStream
from ownlm.engine.torch_engine import TorchEngine

__all__ = ["Engine", "GenerationParams", "GenerationStream", "TorchEngine"]

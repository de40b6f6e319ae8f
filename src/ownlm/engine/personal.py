"""Serving personal models: one base in memory, each user's BitDelta on top.

- Single-user node (one user with a personal model): that delta is *merged* into the weights once
  (W <- W + D), so personal generation costs exactly what base generation costs.
- Several users: the base stays untouched and each request adds its user's delta on the fly through forward
  hooks on the target linear layers — for a lora1 delta that is two thin matmuls per layer,
  y += s * (x A^T) B^T with A (r, in) and B (out, r); for a dense delta y += x D^T. Nothing of the base
  is copied.
- Base on request (model "base", or the routing says base): on a merged node the merged delta is
  subtracted by the same hooks (y -= x D^T), so the base answers exactly.
The routing table in the store says which model answers each user (routing.py: refresh after a deploy or
rollback, each generation and `watch` following installs by other processes, a stream routed as it starts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from ownlm.basemodel import BaseModel
from ownlm.bitdelta import apply, load_delta, unapply
from ownlm.bitdelta.delta import Delta
from ownlm.bitdelta.quant import dequantise
from ownlm.engine.base import GenerationParams, GenerationStream, Message
from ownlm.engine.routing import RoutedEngine
from ownlm.engine.torch_engine import TorchEngine


@dataclass
class LoadedDelta:
    """A delta ready for per-request use: module path -> factors (lora1: (A, B, scaling); dense: (D,))."""

    model_id: tuple[str, str]  # (user id, model id)
    delta: Delta
    factors: dict[str, tuple]

    @classmethod
    def load(cls, model_id: tuple[str, str], path: str, base_sha256: str, device: torch.device, dtype: torch.dtype) -> "LoadedDelta":
        delta = load_delta(path, expect_base_sha256=base_sha256)
        factors: dict[str, tuple] = {}
        if delta.mode == "lora1":
            for name, (a, b) in delta.lora_pairs().items():
                factors[name.removesuffix(".weight")] = (
                    dequantise(a).to(device, dtype), dequantise(b).to(device, dtype), delta.lora_scaling)
        else:
            for name, q in delta.quantised.items():
                factors[name.removesuffix(".weight")] = (dequantise(q).to(device, dtype),)
            for name, t in delta.full.items():
                if name.endswith(".weight") and t.dim() == 2:
                    factors[name.removesuffix(".weight")] = (t.to(device, dtype),)
        return cls(model_id, delta, factors)

    def add_to(self, out: torch.Tensor, module: str, x: torch.Tensor, sign: float) -> torch.Tensor:
        f = self.factors.get(module)
        if f is None:
            return out
        if len(f) == 3:
            a, b, s = f
            return out + (sign * s) * ((x @ a.T) @ b.T)
        return out + sign * (x @ f[0].T)


class PersonalEngine(RoutedEngine, TorchEngine):
    """A TorchEngine that answers each user with their personal model (see module doc)."""

    def __init__(self, base: BaseModel, store, model_name: str = "ownlm", max_waiting: int | None = None):
        super().__init__(base, model_name=model_name, max_waiting=max_waiting)
        self.store = store
        self.base_name = base.source.name
        self._deltas: dict[tuple[str, str], LoadedDelta] = {}  # (user id, model id) -> loaded delta
        self._routes: dict[str, tuple[str, str] | None] = {}  # user id -> (user id, model id); None: base
        self._merged: LoadedDelta | None = None
        self._active: list[tuple[LoadedDelta, float]] = []  # what the hooks add during the current request
        self._refresh_lock = threading.RLock()
        self._modules = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        self._handles: list = []  # hooks of the current request; none at all when the resident weights serve it
        self.refresh()

    def _hook(self, module_name: str):
        def hook(module, inputs, output):
            for loaded, sign in self._active:
                output = loaded.add_to(output, module_name, inputs[0], sign)
            return output
        return hook

    def refresh(self, user_id: str | None = None) -> None:
        """Re-read the routing table (all users); merge the delta when exactly one user has one."""
        with self._refresh_lock, self._lock:
            # keys are (user id, model id): model ids are per user
            routes = self._stored_routes()
            for key in {k for k in routes.values() if k} - set(self._deltas):
                path = self.store.model(*key)["path"]  # resolved against the store's home
                self._deltas[key] = LoadedDelta.load(key, path, self.base.sha256, self.model.device, self.model.dtype)
            personal = {k for k in routes.values() if k}
            want = self._deltas[next(iter(personal))] if len(personal) == 1 else None
            if (want and want.model_id) != (self._merged and self._merged.model_id):
                if self._merged is not None:
                    unapply(self.model, self._merged.delta)
                if want is not None:
                    apply(self.model, want.delta)
                self._merged = want
            self._routes = routes
            self._deltas = {mid: d for mid, d in self._deltas.items() if mid in personal}

    def stream(self, messages: list[Message], params: GenerationParams, user_id: str | None = None,
               use: str = "personal") -> GenerationStream:
        return self.addressed(super().stream(messages, params), user_id, use)

    def _generate(self, prompt, params, out, emit) -> None:
        self.follow_store()  # before waiting for the engine: a refresh takes its lock
        super()._generate(prompt, params, out, emit)

    def _begin(self, stream: GenerationStream) -> None:
        # With the engine lock held: make the hooks turn the resident weights into this request's model.
        target, merged = self.route(stream), self._merged
        active = []
        if merged is not None and target != merged.model_id:
            active.append((merged, -1.0))
        if target is not None and (merged is None or target != merged.model_id):
            active.append((self._deltas[target], +1.0))
        self._active = active
        # Hook only the layers the active deltas change, and only for this request: a merged node's own
        # requests run with no hooks at all (a hooked module takes PyTorch's slower call path).
        touched = {name for loaded, _ in active for name in loaded.factors}
        self._handles = [self._modules[n].register_forward_hook(self._hook(n)) for n in touched if n in self._modules]

    def _end(self, stream: GenerationStream) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = []

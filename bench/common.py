"""Helpers shared by the benchmarks: persona histories as store-shaped conversations, probe rows, temporary weight deltas."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.evaluate.habits import degenerate  # noqa: E402
from ownlm.evaluate.metrics import PROBE_TOKENS, behaviour_score, by_kind_with_intervals  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR  # noqa: E402


def probe_row(engine, asked, max_tokens: int = PROBE_TOKENS, repetition_penalty: float = 1.0) -> dict:
    """The persona's probes answered greedily: {kind: {passed, total, ci95}} (95% Wilson intervals), plus
    "loops": how many answers looped (evaluate.habits.degenerate; they pass no probe). repetition_penalty: 1 is
    plain greedy; the node serves with settings.repetition_penalty."""
    score = behaviour_score(engine, asked, max_tokens=max_tokens, repetition_penalty=repetition_penalty)
    return {**by_kind_with_intervals(score), "loops": sum(degenerate(a["answer"]) for a in score["answers"])}


def fmt(p: dict) -> str:
    """'fact 1/9 [0.02, 0.43], style 8/11 [0.43, 0.90]; 2 looped' from a probe_row."""
    kinds = ", ".join(f"{kind} {v['passed']}/{v['total']} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                      for kind, v in p.items() if kind != "loops")
    return f"{kinds}; {p['loops']} looped" if "loops" in p else kinds


def persona_conversations(persona: str) -> dict[str, list[dict]]:
    """The shipped persona history as {conversation id: [message rows]} in file order, as the store returns them."""
    result = parse_file(DATA_DIR / f"{persona}.jsonl")
    conversations = {}
    for i, c in enumerate(result.conversations):
        rows, parent = [], None
        for j, m in enumerate(c.messages):
            rows.append({"id": f"{i}-{j}", "parent_id": parent, "role": m.role, "content": m.content})
            parent = f"{i}-{j}"
        conversations[f"c{i:04d}"] = rows
    return conversations


@contextmanager
def added(model, deltas: dict[str, torch.Tensor]):
    """model weights += deltas for the block, restored exactly afterwards (copies of the touched weights)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in deltas}
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d.to(params[n].dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)

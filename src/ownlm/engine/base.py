"""The inference protocol: chat messages in, a stream of text pieces out.

The API routes, the WebSocket and the CLI depend only on this protocol, so tests may use a fake engine at
the model boundary and later engines (merged personal deltas, several users per node) slot in unchanged.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ownlm.errors import InvalidInput

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
# torch.Generator.manual_seed takes up to 2**64-1; 2**63 is a power of two, so the API's OpenAPI schema (which
# holds bounds as floats) states it exactly
SEED_MAX = 2**63


@dataclass
class GenerationParams:
    """Sampling settings of one request."""

    max_tokens: int = 256  # new tokens at most
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    seed: int | None = None  # per-request RNG seed, 0..2**63 (SEED_MAX); same seed + prompt -> same text
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 32768:
            raise InvalidInput(f"max_tokens={self.max_tokens} is out of range", hint="use 1..32768")
        # written so that NaN fails too: every comparison with NaN is false
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidInput(f"temperature={self.temperature} is out of range", hint="use 0..2 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p={self.top_p} is out of range", hint="use a value in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not 0 <= self.seed <= SEED_MAX):
            raise InvalidInput(f"seed={self.seed!r} is out of range", hint="use an integer 0..2**63")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidInput("stop must hold at most 4 non-empty strings")


class GenerationStream:
    """Iterate to get text pieces; after exhaustion the counters and `finish_reason` are set.

    finish_reason is 'stop' (end-of-turn token or a stop string) or 'length' (max_tokens reached).
    """

    def __init__(self, pieces: Iterator[str], prompt_tokens: int):
        self._pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def text(self) -> str:
        """Consume the whole stream and return the answer."""
        return "".join(self)


class Engine(Protocol):
    model_name: str

    def stream(self, messages: list[Message], params: GenerationParams) -> GenerationStream: ...


def validate_messages(messages: list[Message]) -> list[Message]:
    """Check chat messages have a known role and string content; returns them unchanged."""
    if not messages:
        raise InvalidInput("messages is empty", hint="send at least one user message")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise InvalidInput(f"messages[{i}].role={m.get('role')!r} is not system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise InvalidInput(f"messages[{i}].content must be a string")
    return messages

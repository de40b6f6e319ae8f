"""The inference protocol: chat messages in, a stream of text pieces out.

The API routes, the WebSocket and the CLI depend only on this protocol, so tests may use a fake engine at
the model boundary and later engines (merged personal deltas, several users per node) slot in unchanged.
"""

from __future__ import annotations

import numbers
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ownlm.errors import InvalidInput

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
# torch.Generator.manual_seed takes up to 2**64-1; 2**63 is a power of two, so the API's OpenAPI schema (which
# holds bounds as floats) states it exactly
SEED_MAX = 2**63
# Tokens (prompt included) that the repetition penalty looks back over: llama.cpp's default `repeat_last_n`,
# and what both engines use, so that they pick the same tokens
REPEAT_LAST_N = 64


@dataclass
class GenerationParams:
    """Sampling settings of one request."""

    max_tokens: int = 256  # new tokens at most
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    seed: int | None = None  # per-request RNG seed, 0..2**63 (SEED_MAX); same seed + prompt -> same text
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    # >1 makes each token seen in the last REPEAT_LAST_N tokens less likely (llama.cpp's / CTRL's rule: a positive
    # logit divided by it, a negative one multiplied); 1 is off. Stops small models looping ("Ahoy! Ahoy! ...").
    repetition_penalty: float = 1.0
    # Wall-clock seconds from the first piece asked for to the last, waiting for the engine included; None: no
    # deadline. Past it the answer ends with finish_reason 'length', or Overloaded if it had not begun.
    timeout_s: float | None = None

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
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise InvalidInput(f"repetition_penalty={self.repetition_penalty} is out of range", hint="use 1..2 (1 = off)")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidInput("stop must hold at most 4 non-empty strings")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidInput(f"timeout_s={self.timeout_s} is out of range", hint="use a positive number of seconds")


_END = object()  # end of a produced stream, in its queue


class GenerationStream:
    """Iterate to get text pieces; after exhaustion the counters and `finish_reason` are set.

    finish_reason is 'stop' (end-of-turn token or a stop string), 'length' (max_tokens reached, or the request's
    deadline passed once the answer had begun) or 'cancelled' (`cancel()` was called before the end).

    A stream made by `produced_by` runs its work in a thread of its own, started by the first `next()`, and the
    consumer only takes finished pieces from a queue. The work (which holds the engine) therefore never waits
    on its consumer: whatever a consumer does (stop iterating, drop the stream, be cancelled itself), the work
    stops at its next step after `cancel()`, or else ends by itself (end of turn, max_tokens, deadline). An
    error raised by the work is raised by the consumer's `next()`.
    """

    def __init__(self, pieces: Iterator[str] | None, prompt_tokens: int):
        self._pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self._work: Callable[[GenerationStream, Callable[[str], None]], None] | None = None
        self._queue: queue.SimpleQueue | None = None  # set when the work starts
        self._failure: BaseException | None = None

    @classmethod
    def produced_by(cls, work: Callable[["GenerationStream", Callable[[str], None]], None],
                    prompt_tokens: int) -> "GenerationStream":
        """A stream whose pieces come from `work(stream, emit)` run in a daemon thread; `work` calls `emit(piece)`
        for each piece, sets the counters and finish_reason on `stream`, and watches `stream.cancelled`."""
        stream = cls(None, prompt_tokens)
        stream._work = work
        return stream

    def cancel(self) -> None:
        """Stop generating at the next step; idempotent and safe from any thread."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._work is None:
            return next(self._pieces)
        if self._queue is None:
            if self.cancelled.is_set():
                self.finish_reason = "cancelled"
                raise StopIteration
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._produce, name="ownlm-generate", daemon=True).start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # so every later next() ends too
            failure, self._failure = self._failure, None
            if failure is not None:
                raise failure
            raise StopIteration
        return item

    def _produce(self) -> None:
        try:
            self._work(self, self._queue.put)
        except BaseException as e:  # handed to the consumer, raised by its next()
            self._failure = e
        finally:
            self._queue.put(_END)

    def text(self) -> str:
        """Consume the whole stream and return the answer."""
        return "".join(self)

    async def apieces(self) -> AsyncIterator[str]:
        """The pieces for async code. Each is awaited in a worker thread that a cancelled caller abandons at once;
        leaving the loop in any way cancels the generation (which then frees that thread within a step)."""
        from anyio import to_thread

        try:
            while (piece := await to_thread.run_sync(next, self, _END, abandon_on_cancel=True)) is not _END:
                yield piece
        finally:
            self.cancel()


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

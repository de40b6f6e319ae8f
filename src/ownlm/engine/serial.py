"""One generation at a time, with a bounded line of waiters: the admission rules every engine shares.

On a CPU node concurrent generations only split the same cores, so an engine runs one at a time (a lock).
At most `max_waiting` generations wait for it; more are refused at once with Overloaded. A waiter looks at its
cancel flag and deadline every POLL_S; `close()` makes running and waiting generations end at their next step
with ModelUnavailable. The torch engine (torch_engine.py) and the llama.cpp engine (llama.py) both use it.
"""

from __future__ import annotations

import threading
import time

from ownlm.engine.base import GenerationStream
from ownlm.errors import ModelUnavailable, Overloaded

POLL_S = 0.05  # how often a generation waiting for the engine looks at its cancel flag and deadline


class SerialEngine:
    """The lock, the line and the shutdown flag of an engine that runs one generation at a time."""

    def __init__(self, max_waiting: int | None = None):
        """`max_waiting`: generations allowed to wait while one runs (None: no limit, for the CLI and evaluation)."""
        self.max_waiting = max_waiting
        self._lock = threading.Lock()  # held by the one running generation (or a refresh, or a batch)
        self._line = threading.Lock()  # guards _waiting
        self._waiting = 0
        self._closing = False

    @property
    def waiting(self) -> int:
        """Generations waiting for the engine right now."""
        return self._waiting

    def close(self) -> None:
        """Stop serving: generations running or waiting end at their next step with ModelUnavailable, and new
        ones are refused. It only sets a flag, so a signal handler may call it."""
        self._closing = True

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise ModelUnavailable("the node is shutting down", hint="retry once it is back")

    def _acquire(self, out: GenerationStream, deadline: float | None, timeout_s: float | None) -> bool:
        """Take the engine lock (True), or give up: False when cancelled while waiting; Overloaded when the
        line is full or the deadline passes; ModelUnavailable when the node shuts down."""
        if self._lock.acquire(blocking=False):
            return True
        with self._line:
            if self.max_waiting is not None and self._waiting >= self.max_waiting:
                raise Overloaded(f"{self._waiting} generation(s) are already waiting for this node's model",
                                 hint="retry in a few seconds, or raise max_queued_generations in the node settings")
            self._waiting += 1
        try:
            while not self._lock.acquire(timeout=POLL_S):
                stop = self._should_stop(out, deadline)
                if stop == "cancelled":
                    out.finish_reason = "cancelled"
                    return False
                if stop == "deadline":
                    raise Overloaded(f"waited {timeout_s:g} s for this node's model without getting it",
                                     hint="retry later, or raise generation_timeout_s in the node settings")
            return True
        finally:
            with self._line:
                self._waiting -= 1

    def _should_stop(self, out: GenerationStream, deadline: float | None) -> str | None:
        """'cancelled', 'deadline' or None; raises ModelUnavailable once the node shuts down."""
        self._refuse_if_closing()
        if out.cancelled.is_set():
            return "cancelled"
        if deadline is not None and time.monotonic() > deadline:
            return "deadline"
        return None

"""Memory at serve time (issue #18): whether a request uses it, the passages its prompt gets, what the answer
says about them, and the user's own switch.

Whether: the request's `"memory": true|false` (an extension field OpenAI clients never send), else the user's
own choice (POST /api/personalization/memory, `ownlm memory on|off`), else the node's `memory.enabled`.
What: the user's passages (store/memory.py) that best match the new user turn, leaving out what the prompt
already holds (the request's own user turns; on the WebSocket, the conversation being continued), written
into the system prompt within `memory.budget_tokens` (engine/memory.py has the template).
Only the engine gets that prompt; what is stored is the request as the client sent it, so memory never feeds
a dataset, and never goes where a privacy tier sends data (privacy/tiers.py). The answer names the passages'
conversations with a short redacted snippet (`ownlm_memory`), and the audit log counts them, never their text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ownlm.api.deps import StoreDep, UserDep
from ownlm.engine.memory import estimate_tokens, memory_block, with_memory
from ownlm.store import Passage

router = APIRouter(prefix="/api/personalization", tags=["personalization"])
RECENT_TURNS = 50


@dataclass
class Recalled:
    prompt: list[dict]  # the messages the engine gets
    passages: list[Passage] = field(default_factory=list)  # the passages in its system prompt, best first
    tokens: int = 0  # what the memory block adds, by the engine's tokenizer (estimated without one)

    def sources(self) -> list[dict]:
        """The answer's `ownlm_memory`: which past conversations it drew on, each with a short snippet."""
        return [{"conversation_id": p.conversation_id, "snippet": p.snippet} for p in self.passages]


def wanted(state, store, user_id: str, flag: bool | None) -> bool:
    if flag is not None:
        return flag
    own = store.memory_setting(user_id)
    return state.settings.memory.enabled if own is None else own


def _count_tokens(engine) -> Callable[[str], int]:
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        return estimate_tokens
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def _default_system(state, engine) -> str:
    """The system prompt the engine's chat template adds when a conversation has none ('' if it adds none or
    is not ChatML); computed once per app."""
    if not hasattr(state, "memory_default_system"):
        from ownlm.node.export import chatml_default_system

        tok = getattr(engine, "tokenizer", None)
        state.memory_default_system = (chatml_default_system(tok) or "") if tok is not None else ""
    return state.memory_default_system


def recall(state, store, engine, user_id: str, messages: list[dict], flag: bool | None,
           exclude_conversation: str | None = None) -> Recalled:
    """The prompt for `messages` (with memory if the request uses it). Blocking: call it in a thread."""
    if not wanted(state, store, user_id, flag):
        return Recalled(list(messages))
    asked = [m["content"] for m in messages if m["role"] == "user"]
    if not asked:
        return Recalled(list(messages))
    cfg = state.settings.memory
    # the last RECENT_TURNS user turns stand for what the prompt holds (engines keep the most recent context),
    # and bound the redaction work of a long re-sent history
    found = store.recall(user_id, asked[-1], cfg.passages, exclude_conversation=exclude_conversation,
                         exclude_questions=asked[-RECENT_TURNS:])
    count = _count_tokens(engine)
    block, used = memory_block(found, cfg.budget_tokens, count)
    if not used:
        return Recalled(list(messages))
    return Recalled(with_memory(messages, block, _default_system(state, engine)), used, count(block))


class MemoryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: StrictBool | None = Field(
        description="true: memory on for your requests, false: off, null: the node's default (memory.enabled)")


def _state(request: Request, store, user_id: str) -> dict:
    own = store.memory_setting(user_id)
    cfg = request.app.state.settings.memory
    return {"enabled": cfg.enabled if own is None else own, "user_setting": own, "node_default": cfg.enabled,
            "passages": store.memory_count(user_id), "budget_tokens": cfg.budget_tokens}


@router.get("/memory")
def get_memory(request: Request, user: UserDep, store: StoreDep) -> dict:
    """Whether your requests use memory (and why: your setting or the node's default), and how many passages
    of your history the index holds."""
    return _state(request, store, user.id)


@router.post("/memory")
def set_memory(body: MemoryBody, request: Request, user: UserDep, store: StoreDep) -> dict:
    """Turn memory on or off for your requests, or back to the node's default (null); audited. A request's own
    `"memory": true|false` still decides for that request."""
    store.set_memory(user.id, body.enabled)
    return _state(request, store, user.id)

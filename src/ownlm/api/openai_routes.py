"""OpenAI-compatible endpoints: GET /v1/models and POST /v1/chat/completions (streaming SSE or not).

Every exchange is captured: the request's messages plus the answer, for the authenticated user, once the
answer is complete. Clients re-send the whole history with each request; the store keeps only what is new,
and a history with no assistant message yet opens a new conversation (Store.capture_live). The answer's
`ownlm` field holds the stored ids, or `error` when the exchange could not be stored.

Memory (api/memory.py): with the user's memory on, or the request's extension field `"memory": true`, the
prompt's system message gets the user's best-matching past passages; the answer's `ownlm_memory` (the
non-streaming body, and the first chunk of a stream) lists the conversations they came from.

A client that hangs up stops its generation: a non-streaming request is watched for the disconnect while it
generates, and a stream's response cancels its generation however it ends. Nothing is stored for a client
that left. Each request has the node's deadline (settings.generation_timeout_s).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.concurrency import run_in_threadpool

from ownlm.api.spec import error_body
from ownlm.api.deps import EngineDep, StoreDep, UserDep
from ownlm.api.memory import recall
from ownlm.api.fields import FiniteFloat, Seed, StrictInt, Text
from ownlm.api.spec import errors
from ownlm.engine import GenerationParams, GenerationStream
from ownlm.errors import NotFound, OwnlmError
from ownlm.store import NewMessage

CLIENT_GONE = 499  # what a request whose client hung up "answers" (nobody reads it; it shows in access logs)

router = APIRouter(tags=["openai"])
log = logging.getLogger(__name__)
USER_MODEL = "ownlm"  # the caller's own model: personal once one is deployed, else the base


class TextPart(BaseModel):
    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",  # OpenAI SDKs send fields we do not use (n=1, stream_options...)
        json_schema_extra={"examples": [  # shown in /docs; API fuzzers start from them
            {"model": "ownlm", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32},
            {"model": "ownlm", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32, "stream": True},
        ]},
    )
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=32768)
    temperature: FiniteFloat = Field(default=0.7, ge=0, le=2)
    top_p: FiniteFloat = Field(default=1.0, gt=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    # an extension (llama.cpp's and vLLM's name); None: the node's setting
    repetition_penalty: FiniteFloat | None = Field(default=None, ge=1, le=2)
    memory: StrictBool | None = Field(
        default=None, description="ownlm extension: use your memory for this request (true) or not (false); "
                                  "default: your setting (GET /api/personalization/memory)")

    def params(self, timeout_s: float | None = None, repetition_penalty: float = 1.0) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return GenerationParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            timeout_s=timeout_s,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else repetition_penalty,
        )


def served_models(engine) -> list[str]:
    """'ownlm' (the caller's personal model, or the base until one is deployed) and the base by name."""
    return [USER_MODEL, getattr(engine, "base_name", engine.model_name)]


def start(engine, messages, params, user_id: str, model: str | None):
    """Begin generation with the model the request names: personal ('ownlm', default) or the base."""
    if hasattr(engine, "model_for"):
        use = "base" if model not in (None, USER_MODEL) else "personal"
        return engine.stream(messages, params, user_id=user_id, use=use)
    return engine.stream(messages, params)


@router.get("/v1/models", responses=errors(503))
def list_models(user: UserDep, engine: EngineDep) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": user.name} for m in served_models(engine)]}


# 200 is JSON, or with stream=true server-sent events; the schema describes one event, as for OpenAPI 3.2's itemSchema
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chat.completion.chunk as JSON (the first one with ownlm_memory, the "
                                              "last one with usage and ownlm); the last event is [DONE]"}}}
MEMORY_SOURCES = {
    "type": "array", "description": "ownlm extension: the past conversations whose passages memory put into this "
                                    "request's prompt, best first (empty: none, or memory off)",
    "items": {"type": "object", "required": ["conversation_id", "snippet"], "properties": {
        "conversation_id": {"type": "string"},
        "snippet": {"type": "string", "maxLength": 80, "description": "the passage's question, redacted, shortened"}}}}
COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage", "ownlm_memory"],
              "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                             "created": {"type": "integer"}, "model": {"type": "string"},
                             "choices": {"type": "array"}, "usage": {"type": "object"},
                             "ownlm": {"type": "object", "description": "ownlm extension: the stored ids, or error"},
                             "ownlm_memory": MEMORY_SOURCES}}
CHAT_RESPONSES = {200: {"content": {"application/json": {"schema": COMPLETION}, "text/event-stream": {"schema": SSE_EVENT}}},
                  **errors(404, 429, 503)}


@router.post("/v1/chat/completions", response_model=None, responses=CHAT_RESPONSES)
async def chat_completions(req: ChatRequest, request: Request, user: UserDep, store: StoreDep, engine: EngineDep):
    if req.model is not None and req.model not in served_models(engine):
        raise NotFound(f"model {req.model!r} is not served here", hint=f"use one of {served_models(engine)}")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    settings = request.app.state.settings
    params = req.params(timeout_s=settings.generation_timeout_s, repetition_penalty=settings.repetition_penalty)

    def begin():
        # the memory search reads the store, and templating a long history is CPU work: not on the event loop.
        # The engine validates roles and parameters before anything runs.
        recalled = recall(request.app.state, store, engine, user.id, messages, req.memory)
        return recalled, start(engine, recalled.prompt, params, user.id, req.model)

    recalled, stream = await run_in_threadpool(begin)
    memory = recalled.sources()
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or USER_MODEL

    def record(answer: str) -> dict:
        """Capture the exchange; returns the `ownlm` field of the answer. Never raises: the answer exists (a
        stream's status line is long sent), so a failed capture is logged and reported, not a cut stream or a 500."""
        history = [NewMessage(m["role"], m["content"]) for m in messages]
        history.append(NewMessage("assistant", answer, model=_answered_by(stream, engine)))
        def write(db):
            res = store.capture_live(user.id, history, source="api", history=len(messages), db=db)
            store.audit_memory_use(db, user.id, recalled.passages)
            return res

        try:
            res = store.submit(write).result()
        except Exception as e:
            log.exception("storing a chat completion of user %s failed", user.id)
            if isinstance(e, OwnlmError):
                return error_body(type(e).__name__, f"the answer was not stored: {e.message}", e.hint)
            return error_body("StoreError", "the answer was not stored (the node's log says why)",
                              "the answer itself is complete; check the node's disk and log")
        return {"conversation_id": res.conversation_id, "message_id": res.message_ids[-1]}

    pieces = stream.apieces()
    if not req.stream:
        answer = "".join(await _while_connected(request, stream, _collect(pieces)))
        if stream.finish_reason == "cancelled":
            return Response(status_code=CLIENT_GONE)
        ids = await run_in_threadpool(record, answer)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": stream.finish_reason}],
            "usage": _usage(stream),
            "ownlm": ids,
            "ownlm_memory": memory,
        }

    # The response starts with the answer's first piece, so a refusal (Overloaded: line full, deadline) is an
    # HTTP status rather than a cut 200 stream.
    first = await _while_connected(request, stream, anext(pieces, None))
    if stream.finish_reason == "cancelled":
        return Response(status_code=CLIENT_GONE)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        parts: list[str] = []
        yield chunk({"role": "assistant", "content": ""}, ownlm_memory=memory)
        try:
            if first is not None:
                parts.append(first)
                yield chunk({"content": first})
                async for piece in pieces:
                    parts.append(piece)
                    yield chunk({"content": piece})
            ids = await run_in_threadpool(record, "".join(parts))  # committed before the client sees the end
        except OwnlmError as e:  # after the response began (the node shutting down): said in the stream
            yield f"data: {json.dumps(error_body(type(e).__name__, e.message, e.hint))}\n\n"
            return
        yield chunk({}, stream.finish_reason, usage=_usage(stream), ownlm=ids)
        yield "data: [DONE]\n\n"

    return GenerationResponse(stream, events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class GenerationResponse(StreamingResponse):
    """A streamed answer that cancels its generation however the response ends: done, client gone (Starlette
    cancels the sending task), or server shutdown. The generator's own `finally` cannot be relied on for this:
    a cancelled response leaves it suspended until garbage collection."""

    def __init__(self, stream: GenerationStream, content, **kwargs):
        super().__init__(content, **kwargs)
        self.generation = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


async def _collect(pieces: AsyncIterator[str]) -> list[str]:
    return [p async for p in pieces]


async def _while_connected(request: Request, stream: GenerationStream, work: Awaitable):
    """Await `work`; if the client hangs up meanwhile, cancel `stream` (its generation stops at its next step,
    and `work` sees the stream end with finish_reason 'cancelled')."""

    async def cancel_when_gone() -> None:
        # the body has been read, so the next message is the disconnect (or the end of the response)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    result, error = None, None
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_when_gone)
        try:
            result = await work
        except Exception as e:  # re-raised below as itself, not wrapped in the task group's ExceptionGroup
            error = e
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


def _answered_by(stream, engine) -> str:
    """Which model wrote a reply, as stored with it: a personal model's id, or the base's name."""
    mid = getattr(stream, "model_id", None)
    return mid[1] if mid else getattr(engine, "base_name", engine.model_name)


def _usage(stream) -> dict:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


"""WebSocket /ws/chat: the client sends a message, the server streams the answer token by token.

Protocol (JSON text frames):
  client -> {"content": "...", "conversation_id"?: id from an earlier "start", "max_tokens"?, "temperature"?, "seed"?,
             "model"?: "ownlm" | the base's name, "after"?: message id to continue from (default: the latest),
             "reply_to"?: one of your user messages to answer again, as a sibling reply (side by side),
             "memory"?: true | false (default: your memory setting, see api/memory.py)}
  server -> {"type": "start", "conversation_id", "message_id", "memory": [{"conversation_id", "snippet"}]}
                                                                 the user's message is stored; memory: the
                                                                 past conversations the answer draws on
            {"type": "token", "content": "..."}                  zero or more
            {"type": "done", "message_id", "finish_reason", "completion_tokens"}   the answer is stored
            {"type": "error", "error": {type, message, hint}}    the connection stays open
Auth: `Authorization: Bearer` header, or `?token=` (browsers cannot set headers on WebSockets). A bad or
revoked token: the socket is closed at once with code 4401.
"""

from __future__ import annotations

import json
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, StrictBool, ValidationError
from starlette.concurrency import run_in_threadpool

from ownlm.api.spec import error_body
from ownlm.api.deps import bearer
from ownlm.api.memory import recall
from ownlm.api.fields import FiniteFloat, Seed, StrictInt, Text
from ownlm.api.openai_routes import _answered_by, start
from ownlm.engine import GenerationParams
from ownlm.errors import InvalidInput, ModelUnavailable, OwnlmError
from ownlm.store import NewMessage

router = APIRouter()


class WsMessage(BaseModel):
    content: Text | None = Field(default=None, max_length=200_000, description="the question; not with reply_to")
    conversation_id: Text | None = None
    max_tokens: StrictInt = Field(default=256, ge=1, le=32768)
    temperature: FiniteFloat = Field(default=0.7, ge=0, le=2)
    seed: Seed | None = None
    model: Text | None = Field(default=None, description="'ownlm' (personal, default) or the base model's name")
    after: Text | None = Field(default=None, description="continue the conversation after this message (default: latest)")
    reply_to: Text | None = Field(default=None, description="answer this user message again; no new message is stored")
    memory: StrictBool | None = Field(default=None, description="use your memory for this turn (default: your setting)")


@router.websocket("/ws/chat")
async def ws_chat(ws: WebSocket) -> None:
    store, engine = ws.app.state.store, ws.app.state.engine
    token = bearer(ws.headers.get("authorization")) or ws.query_params.get("token")
    try:
        user = await run_in_threadpool(store.user_for_token, token)
    except OwnlmError as e:
        # Accept, then close with 4401: a close before accept is an HTTP 403 that a browser reports only as
        # 1006, so the page could not tell a bad token from a lost connection. Nothing is read or sent.
        await ws.accept()
        await ws.close(code=4401, reason=e.message[:120])  # a close reason holds at most 123 bytes
        return
    await ws.accept()
    try:
        while True:
            raw = await ws.receive_text()
            try:
                await _turn(ws, store, engine, user, raw)
            except OwnlmError as e:
                await ws.send_json(error_body(type(e).__name__, e.message, e.hint) | {"type": "error"})
    except WebSocketDisconnect:
        return


async def _turn(ws: WebSocket, store, engine, user, raw: str) -> None:
    if engine is None:
        raise ModelUnavailable("this node runs without a model (capture only)")
    try:
        msg = WsMessage.model_validate(json.loads(raw))
    except RecursionError:
        raise InvalidInput("bad message: its JSON nests too deep", hint='send {"content": "..."}') from None
    except (ValueError, ValidationError) as e:
        raise InvalidInput(f"bad message: {str(e).splitlines()[0]}", hint='send {"content": "..."}') from None
    if msg.reply_to:
        conversation_id, user_msg, history = await run_in_threadpool(_reply_context, store, user.id, msg.reply_to)
    else:
        conversation_id, user_msg, history = await run_in_threadpool(_store_question, store, user.id, msg)
    prompt = [{"role": h["role"], "content": h["content"]} for h in history]
    # the conversation being continued is in the prompt already: memory comes from the others
    recalled = await run_in_threadpool(recall, ws.app.state, store, engine, user.id, prompt, msg.memory, conversation_id)
    await ws.send_json({"type": "start", "conversation_id": conversation_id, "message_id": user_msg,
                        "memory": recalled.sources()})
    params = GenerationParams(max_tokens=msg.max_tokens, temperature=msg.temperature, seed=msg.seed,
                              timeout_s=ws.app.state.settings.generation_timeout_s,
                              repetition_penalty=ws.app.state.settings.repetition_penalty)
    stream = await run_in_threadpool(start, engine, recalled.prompt, params, user.id, msg.model)
    parts = []
    try:
        async for piece in stream.apieces():
            parts.append(piece)
            await ws.send_json({"type": "token", "content": piece})
    finally:
        stream.cancel()  # a socket closed mid-answer (send raised) must not leave the generation running
    answer = NewMessage("assistant", "".join(parts), model=_answered_by(stream, engine))
    res = await run_in_threadpool(_store_answer, store, user.id, answer, user_msg, recalled.passages)
    await ws.send_json({"type": "done", "message_id": res.message_ids[-1], "finish_reason": stream.finish_reason,
                        "completion_tokens": stream.completion_tokens})


def _store_answer(store, user_id: str, answer: NewMessage, question_id: str, passages) -> object:
    """Store the reply, and count the memory it drew on in the audit log, in one transaction."""
    with store.tx() as db:
        res = store.capture(user_id, [answer], source="ws", after=question_id, db=db)
        store.audit_memory_use(db, user_id, passages)
    return res


def _store_question(store, user_id: str, msg: WsMessage) -> tuple[str, str, list[dict]]:
    """Store the user's message; returns (conversation id, its message id, the thread up to and with it)."""
    if not msg.content:
        raise InvalidInput("the message is empty", hint='send {"content": "..."}')
    last = None
    if msg.conversation_id:
        last = msg.after or store.latest_message(user_id, msg.conversation_id)
        if msg.after and store.message_place(user_id, msg.after)[0] != msg.conversation_id:
            raise InvalidInput(f"message {msg.after} is not in conversation {msg.conversation_id}")
    elif msg.after:
        raise InvalidInput("'after' needs the conversation_id it belongs to")
    history = store.thread(user_id, last) if last else []
    # A new chat gets its own namespace: one that opens like an earlier chat is still a new conversation.
    res = store.capture(user_id, [NewMessage("user", msg.content)], source="ws", after=last,
                        seed=None if last else f"ws:{uuid.uuid4().hex}")
    question = {"role": "user", "content": msg.content}
    return res.conversation_id, res.message_ids[-1], [*history, question]


def _reply_context(store, user_id: str, message_id: str) -> tuple[str, str, list[dict]]:
    """For a second answer to an existing question: (conversation id, the question's id, the thread to it)."""
    conversation_id, role = store.message_place(user_id, message_id)
    if role != "user":
        raise InvalidInput(f"reply_to must name a user message; {message_id} is a {role} message")
    return conversation_id, message_id, store.thread(user_id, message_id)

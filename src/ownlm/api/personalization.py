"""The seed's personalization API (capture, feedback, the user's data and its deletion)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from ownlm.api.deps import StoreDep, UserDep
from ownlm.api.fields import SQL_INT_MAX, StrictInt, Text, Thumbs, UnixTime
from ownlm.api.spec import errors
from ownlm.errors import InvalidInput, OwnlmError
from ownlm.store import NewMessage

router = APIRouter(prefix="/api/personalization", tags=["personalization"])
UNPACK_FACTOR = 32  # an uploaded .zip export may unpack to this many times the body limit (256 MiB by default)


class InteractionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=1_000_000)
    model: Text | None = None
    timestamp: UnixTime | None = Field(default=None, description="unix seconds (UTC); default: when received")


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thumbs: Thumbs | None = None
    rating: StrictInt | None = Field(default=None, ge=1, le=5)
    edited_content: Text | None = Field(default=None, description="a better reply, written by the user")
    comment: Text | None = None


class InteractionFeedback(Feedback):
    message_index: StrictInt | None = Field(
        default=None, ge=0, description="index into messages; default: the last assistant message"
    )


class Interaction(BaseModel):
    """One interaction as the seed's collector sees it: the conversation so far, its context, feedback."""

    model_config = ConfigDict(extra="forbid")
    conversation_id: Text | None = Field(
        default=None, max_length=200,
        description="the client's own id for this conversation; messages are deduplicated within it",
    )
    messages: list[InteractionMessage] = Field(min_length=1, max_length=10_000)
    context: dict | None = None
    feedback: InteractionFeedback | None = None


class MessageFeedback(Feedback):
    message_id: Text = Field(max_length=200)


@router.post("/interactions")
async def collect(body: Interaction, user: UserDep, store: StoreDep) -> dict:
    """Store an interaction; re-sending the same messages stores nothing new. Acknowledged = committed."""
    msgs = [NewMessage(m.role, m.content, m.timestamp, m.model) for m in body.messages]
    fb, idx = body.feedback, None
    if fb is not None:  # check the feedback before anything is stored: the request is stored whole or not at all
        idx = fb.message_index
        if idx is None:
            idx = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
            if idx is None:
                raise InvalidInput("feedback given but there is no assistant message", hint="set feedback.message_index")
        if not 0 <= idx < len(msgs):
            raise InvalidInput(f"feedback.message_index={idx} is outside messages (0..{len(msgs) - 1})")

    def write(db) -> dict:
        if body.conversation_id:
            res = store.capture(user.id, msgs, source="interactions", seed=f"client:{body.conversation_id}",
                                external_id=body.conversation_id, context=body.context, db=db)
        else:  # no id: a new chat, or the one whose stored messages it repeats (store.capture_live)
            res = store.capture_live(user.id, msgs, source="interactions", context=body.context, db=db)
        out = {"conversation_id": res.conversation_id, "message_ids": res.message_ids, "added": res.added,
               "duplicates": res.duplicates, "deleted": res.deleted}
        if fb is not None and res.message_ids[idx] is None:
            raise InvalidInput(f"feedback.message_index={idx} names a message you deleted earlier",
                               hint="give feedback on a message that is still stored")
        if fb is not None:
            out["feedback_id"] = store.add_feedback(
                user.id, res.message_ids[idx], thumbs=fb.thumbs, rating=fb.rating,
                edited_content=fb.edited_content, comment=fb.comment, db=db,
            )
        return out

    # Group commit: concurrent requests share a transaction; the answer is sent after COMMIT.
    return await asyncio.wrap_future(store.submit(write))


@router.post("/feedback", responses=errors(404))
def feedback(body: MessageFeedback, user: UserDep, store: StoreDep) -> dict:
    fid = store.add_feedback(
        user.id, body.message_id, thumbs=body.thumbs, rating=body.rating,
        edited_content=body.edited_content, comment=body.comment,
    )
    return {"feedback_id": fid}


@router.get("/conversations")
def conversations(user: UserDep, store: StoreDep, limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0, le=SQL_INT_MAX)) -> dict:
    return {"conversations": store.list_conversations(user.id, limit, offset), "totals": store.stats(user.id)}


@router.get("/conversations/{conversation_id}", responses=errors(404))
def conversation(conversation_id: str, user: UserDep, store: StoreDep) -> dict:
    return {"id": conversation_id, "messages": store.get_messages(user.id, conversation_id)}


@router.get("/audit")
def audit(user: UserDep, store: StoreDep, limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"events": store.audit_log(user.id, limit)}


@router.post("/import")
def import_export(
    request: Request,
    user: UserDep,
    store: StoreDep,
    file: UploadFile = File(..., description="a chat-history export (ChatGPT, Claude, llm logs.db, ShareGPT, ...)"),
    format: str | None = Form(None, description="the export format; default: detected from the file"),
) -> dict:
    """Import an uploaded export for the authenticated user; returns what was stored, skipped and refused."""
    from ownlm.capture.importers import parse_file
    from ownlm.store.imports import import_into

    name = Path(file.filename or "upload").name
    # the importers read paths (SQLite needs one, .jsonl is told by its suffix): keep the upload's suffix
    fd, tmp = tempfile.mkstemp(prefix="ownlm-import-", suffix=Path(name).suffix[:16])
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
        try:
            limit = UNPACK_FACTOR * request.app.state.settings.max_body_bytes  # what a .zip may unpack to
            result = parse_file(tmp, format or None, max_unpacked=limit)
        except OwnlmError as e:  # the messages name the temp file; the user knows their file by its name
            e.message = e.message.replace(tmp, name)
            raise
        counts = import_into(store, user.id, result, name)
    finally:
        os.unlink(tmp)
    return {
        "file": name, "format": result.format, "conversations": len(result.conversations),
        "messages": result.message_count, **counts, "skipped": dict(result.skipped),
        "bad": [{"index": b.index, "external_id": b.external_id, "reason": b.reason} for b in result.bad],
    }


def _before(before: datetime | None) -> float | None:
    """Unix seconds of a `before` date. A date without a time zone is UTC, like every time the store keeps
    (read as local time it would depend on the node's zone, and year 1 would overflow)."""
    if before is None:
        return None
    if before.tzinfo is None:
        before = before.replace(tzinfo=timezone.utc)
    try:
        return before.timestamp()
    except (OverflowError, ValueError, OSError):  # aware dates convert exactly; kept so no date can 500
        raise InvalidInput(f"before={before.isoformat()} is out of range", hint="give a date between years 1 and 9999") from None


@router.get("/delete-preview", responses=errors(404))
def delete_preview(
    user: UserDep,
    store: StoreDep,
    before: datetime | None = Query(None, description="as DELETE /data"),
    conversation_id: str | None = Query(None, description="as DELETE /data"),
) -> dict:
    """What DELETE /data with the same parameters would remove (counts, and the ids of the models trained on
    that data; nothing is changed)."""
    return {"would_delete": store.delete_preview(user.id, before=_before(before), conversation_id=conversation_id)}


@router.delete("/data", responses=errors(404))
def delete_data(
    request: Request,
    user: UserDep,
    store: StoreDep,
    before: datetime | None = Query(
        None, description="delete messages created before this time (ISO 8601; without a time zone: UTC)"
    ),
    conversation_id: str | None = Query(None, description="delete only this conversation"),
    keep_models: bool = Query(False, description="keep the installed models trained on the deleted data "
                                                 "(default: they are removed and the user served by an earlier model or the base)"),
) -> dict:
    """Right to delete: everything (no parameters), messages before a date, or one conversation — and the
    models trained on it (`deleted.models_removed`), unless `keep_models` (`deleted.models_kept`)."""
    res = store.delete_data(user.id, before=_before(before), conversation_id=conversation_id, keep_models=keep_models)
    from ownlm.privacy.fedretire import after_delete

    notice = after_delete(store, request.app.state.settings, user, res)
    if notice is not None:  # the person's other devices hold these rounds' aggregates: they need the notice
        res = {**res, "federation_retire_notice": str(notice)}
    reload = getattr(request.app.state, "on_model_change", None)
    if res["models_removed"] and reload:
        reload(user.id)  # the engine stops serving the removed models now
    for owner in res.get("models_removed_elsewhere") or {}:  # other users' models merged from this data
        if reload:
            reload(owner)
    return {"deleted": res}

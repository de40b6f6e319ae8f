"""Personal models on the node: deploy a sealed bundle, list versions, roll back (the seed's model API)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ownlm.api.deps import StoreDep, UserDep
from ownlm.api.fields import Text
from ownlm.api.spec import errors

router = APIRouter(prefix="/api/personalization", tags=["models"])


# The body is read raw (a sealed .ownlm bundle), so FastAPI cannot see it: declared here.
BUNDLE_BODY = {"requestBody": {"required": True, "description": "a sealed bundle (`ownlm bundle`, .ownlm file)",
                               "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/deploy", responses=errors(403, 404, 409), openapi_extra=BUNDLE_BODY)
async def deploy(request: Request, user: UserDep, store: StoreDep, rollback: bool = False) -> dict:
    """Install a sealed bundle (body: the .ownlm bytes) for the authenticated user; route them to it."""
    from ownlm.node.install import install

    data = await request.body()
    settings = request.app.state.settings
    res = await run_in_threadpool(install, store, settings, data, expect_user_id=user.id, rollback=rollback)
    reload = getattr(request.app.state, "on_model_change", None)
    if reload:
        await run_in_threadpool(reload, user.id)
    return {"model_id": res.model_id, "version": res.version, "signer": res.signer, "seconds": res.seconds}


@router.get("/models")
def models(user: UserDep, store: StoreDep) -> dict:
    trusted = store.signers_for(user.id)  # keys that may sign for this user, now
    out = []
    for m in store.models(user.id):
        t = m["manifest"].get("training", {})
        out.append({"id": m["id"], "version": m["version"], "installed_at": m["installed_at"], "size_bytes": m["size_bytes"],
                    "active": m["active"], "signature_verified": m["signer"] in trusted, "signer": m["signer"],
                    "training": t, "merkle_root": m["manifest"].get("dataset", {}).get("merkle_root")})
    return {"models": out, "active": next((m["id"] for m in out if m["active"]), None)}


class RollbackBody(BaseModel):
    target: Text | None = Field(default=None, max_length=200, description="version, model id or 'base'; default: the previous version")


@router.post("/rollback", responses=errors(404))
def rollback(body: RollbackBody, request: Request, user: UserDep, store: StoreDep) -> dict:
    from ownlm.node.install import rollback as do_rollback

    m = do_rollback(store, user.id, body.target)
    reload = getattr(request.app.state, "on_model_change", None)
    if reload:
        reload(user.id)
    return {"active": m["id"] if m else None}

"""The learning loop and privacy (the seed's training and privacy API): start a round, watch it, set the tier."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ownlm.api.deps import StoreDep, UserDep
from ownlm.api.fields import StrictInt
from ownlm.api.spec import errors
from ownlm.privacy.tiers import TIERS, set_tier

router = APIRouter(prefix="/api/personalization", tags=["loop"])


@router.post("/train", responses=errors(409))
def train_now(request: Request, user: UserDep, store: StoreDep) -> dict:
    """Start a learning round now (dataset → train → compress → gate → deploy); 409 while one is open."""
    job_id = store.enqueue_job(user.id, "requested through the API")
    return {"job_id": job_id, "state": "queued"}


@router.get("/status")
def status(request: Request, user: UserDep, store: StoreDep) -> dict:
    """Samples since the last model, the next scheduled check, the running job's stage, the last result and why."""
    cfg = request.app.state.settings.personalization
    jobs = store.jobs(user.id, limit=10)
    open_job = next((j for j in jobs if j["state"] in ("queued", "running")), None)
    last = next((j for j in jobs if j["state"] not in ("queued", "running")), None)
    active = store.active_model(user.id)
    return {
        "enabled": cfg.enabled,
        "interval_s": cfg.interval,
        "samples_since_last_model": store.samples_since(user.id),
        "min_samples": cfg.min_samples,
        "next_run_at": store.next_run_at(user.id),
        "now": time.time(),
        "job": _job(open_job),
        "last_result": _job(last),
        "active_model": active["id"] if active else None,
        "privacy_tier": user.privacy_tier,
        "history": [_job(j) for j in jobs],
    }


def _job(j: dict | None) -> dict | None:
    if j is None:
        return None
    return {k: j[k] for k in ("id", "state", "stage", "progress", "reason", "created_at", "started_at", "finished_at", "result")}


class PrivacyBody(BaseModel):
    tier: StrictInt = Field(ge=0, le=3, description="; ".join(f"{k}: {v}" for k, v in TIERS.items()))
    confirm: bool = Field(default=False, description="required to lower the tier (towards 0)")


@router.post("/privacy", responses=errors(403))
def privacy(body: PrivacyBody, user: UserDep, store: StoreDep) -> dict:
    """Set the user's privacy tier (lowering it needs confirm=true); every change is in the audit log."""
    return set_tier(store, user, body.tier, body.confirm)


@router.get("/privacy")
def get_privacy(user: UserDep) -> dict:
    return {"tier": user.privacy_tier, "tiers": TIERS}

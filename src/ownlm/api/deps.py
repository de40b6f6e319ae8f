"""Dependencies of the routes: the store, the engine and the authenticated user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ownlm.engine import Engine
from ownlm.errors import ModelUnavailable
from ownlm.store import Store, User

def bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None:
        raise ModelUnavailable("this node runs without a model (capture only)", hint="start `ownlm serve` without --no-model")
    return engine


async def current_user(request: Request) -> User:
    # async: a token lookup is one indexed read on the reader connection, cheaper than a thread hop
    return request.app.state.store.user_for_token(bearer(request.headers.get("authorization")))


StoreDep = Annotated[Store, Depends(get_store)]
EngineDep = Annotated[Engine, Depends(get_engine)]
UserDep = Annotated[User, Depends(current_user)]

"""Dependencies of the routes: the store, the engine and the authenticated user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


# Declares the bearer scheme in the OpenAPI spec (docs' "Authorize", fuzzers). auto_error=False: a missing or
# malformed header reaches current_user as None, so the answer is ownlm's AuthError (401 + hint), not FastAPI's.
bearer_scheme = HTTPBearer(auto_error=False, description="a token from `ownlm token create USER`")


async def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> User:
    # async: a token lookup is one indexed read on the reader connection, cheaper than a thread hop
    return request.app.state.store.user_for_token(credentials.credentials if credentials else None)


StoreDep = Annotated[Store, Depends(get_store)]
EngineDep = Annotated[Engine, Depends(get_engine)]
UserDep = Annotated[User, Depends(current_user)]

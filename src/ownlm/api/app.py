"""The node's HTTP/WebSocket app: one factory, errors converted to HTTP in one place, a body-size limit."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ownlm import __version__
from ownlm.engine import Engine
from ownlm.errors import OwnlmError
from ownlm.settings import Settings
from ownlm.store import Store


STATIC = Path(__file__).parent / "static"
# The dashboard loads nothing from anywhere but this node: the policy makes a stray external URL fail loudly.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def error_body(kind: str, message: str, hint: str | None) -> dict:
    return {"error": {"type": kind, "message": message, "hint": hint}}


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over `limit` bytes with 413, before the route reads them.

    Checks Content-Length up front and counts chunked bodies as they arrive, so a client cannot stream past it.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counting_receive():
            # Past the limit: answer 413 ourselves and tell the app the client left, so it stops reading.
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # after a 413 the app's own response is dropped
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send):
        body = JSONResponse(
            error_body("PayloadTooLarge", f"request body over {self.limit} bytes", "send less per request, "
                       "or raise max_body_bytes in the node settings"),
            status_code=413,
        )
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


def create_app(settings: Settings, store: Store, engine: Engine | None) -> FastAPI:
    """The node app. `engine` may be None for a capture-only node (generation endpoints then answer 503)."""
    from ownlm.api import loop_routes, models_routes, openai_routes, personalization, ws

    app = FastAPI(
        title="ownlm node",
        version=__version__,
        description="Capture conversations, serve your personal model (OpenAI-compatible), control your data.",
    )
    app.state.settings, app.state.store, app.state.engine = settings, store, engine
    # after a deploy or rollback the engine re-reads the routing table
    app.state.on_model_change = getattr(engine, "refresh", None)

    @app.exception_handler(OwnlmError)
    async def _ownlm_error(request: Request, exc: OwnlmError) -> JSONResponse:
        retry = getattr(exc, "retry_after", None)  # Overloaded: when to try again, in seconds
        return JSONResponse(error_body(type(exc).__name__, exc.message, exc.hint), status_code=exc.http_status,
                            headers={"Retry-After": str(retry)} if retry is not None else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            error_body("InvalidInput", f"{where}: {first.get('msg')}", "see the API schema at /docs"),
            status_code=422,
        )

    @app.get("/health", tags=["node"])
    def health() -> dict:
        return {"status": "ok", "version": __version__, "model": engine.model_name if engine else None}

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(openai_routes.router)
    app.include_router(personalization.router)
    app.include_router(models_routes.router)
    app.include_router(loop_routes.router)
    app.include_router(ws.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app

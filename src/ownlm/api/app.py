"""The node's HTTP/WebSocket app: one factory, errors converted to HTTP in one place, a body-size limit,
security headers on every response, self-hosted API docs."""

from __future__ import annotations

import importlib.resources
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from ownlm import __version__
from ownlm.engine import Engine
from ownlm.errors import OwnlmError
from ownlm.api.spec import error_body
from ownlm.settings import Settings
from ownlm.store import Store


STATIC = Path(__file__).parent / "static"
# The dashboard (and the docs page) load nothing from anywhere but this node: the policy makes a stray
# external URL fail loudly. Set on every HTML response by SecurityHeaders, never per route.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# Everything else (JSON, event streams, files) is data: if a browser ever renders one, it may run or load nothing.
DATA_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# /docs is Swagger UI served from this node: its files come in the fastapi-offline package (kept up to date
# with Swagger UI 5, which reads OpenAPI 3.1 as FastAPI writes it), started by our own static/docs.js, so the
# page runs under DASHBOARD_CSP (no inline script, no CDN: users have no internet at run time either).
# ReDoc is off: its bundle injects inline styles that policy refuses, and one docs page is enough.
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"


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


class SecurityHeaders:
    """Pure ASGI middleware: security headers on every HTTP response, whichever route, mount or error made it.

    X-Frame-Options and CSP frame-ancestors keep every page out of other sites' frames (clickjacking); nosniff
    keeps a browser from reading JSON or uploads as HTML or script; no-referrer keeps URLs (conversation ids)
    out of other sites' logs. Cache-Control: pages and their files (`revalidated`) are checked again on every
    load (no-cache, ETag), everything else holds the user's data and is never stored (no-store). A header the
    route set itself (the event stream's Cache-Control) is kept.
    """

    def __init__(self, app, revalidated: tuple[str, ...] = ("/static/", "/docs")):
        self.app, self.revalidated = app, revalidated

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        cache = "no-cache" if path == "/" or path.startswith(self.revalidated) else "no-store"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers") or [])
                headers = MutableHeaders(scope=message)
                html = headers.get("content-type", "").startswith("text/html")
                headers.setdefault("content-security-policy", DASHBOARD_CSP if html else DATA_CSP)
                headers.setdefault("x-frame-options", "DENY")
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("referrer-policy", "no-referrer")
                headers.setdefault("cache-control", cache)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @classmethod
    def around(cls, app: FastAPI) -> None:
        """Wrap the app's whole middleware stack, outside Starlette's ServerErrorMiddleware (which add_middleware
        cannot reach), so that even the 500 of an unexpected exception carries the headers."""
        build = app.build_middleware_stack
        app.build_middleware_stack = lambda: cls(build())


def serve_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI from this node's own files (see DOCS_ASSETS); the app needs docs_url=None."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    @app.get("/docs/init.js", include_in_schema=False)
    def docs_init() -> FileResponse:
        return FileResponse(STATIC / "docs.js", media_type="text/javascript")

    app.mount("/docs/assets", StaticFiles(directory=str(DOCS_ASSETS)), name="docs-assets")


def declare_errors(app: FastAPI) -> None:
    """Make the generated spec say what the app really answers: the codes only the app knows of, on each route.

    401 wherever the bearer token is required; 413 wherever a request has a body (BodyLimit is middleware,
    routes do not see it); 400 where FastAPI parses the body (it refuses one it cannot decode, e.g. not UTF-8,
    before validation); 422 in our error body, not FastAPI's HTTPValidationError (see _validation_error).
    Route-specific codes are declared on the routes with spec.errors().
    """
    from ownlm.api.spec import WHY, ErrorResponse

    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorResponse" not in schemas:
            doc = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(doc.pop("$defs", {}))
            schemas["ErrorResponse"] = doc
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                body = op.get("requestBody", {}).get("content", {})
                parsed = {"application/json", "multipart/form-data"} & set(body)  # by FastAPI, before validation
                wanted = [401] * bool(op.get("security")) + [413] * bool(body) + [400] * bool(parsed)
                if "422" in responses:
                    wanted.append(422)
                for code in wanted:
                    responses[str(code)] = {"description": WHY[code], **ref}
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return spec

    app.openapi = openapi


def create_app(settings: Settings, store: Store, engine: Engine | None) -> FastAPI:
    """The node app. `engine` may be None for a capture-only node (generation endpoints then answer 503)."""
    from ownlm.api import loop_routes, memory, models_routes, openai_routes, personalization, ws

    app = FastAPI(
        title="ownlm node",
        version=__version__,
        description="Capture conversations, serve your personal model (OpenAI-compatible), control your data.",
        docs_url=None, redoc_url=None,  # serve_docs: self-hosted Swagger UI
    )
    app.state.settings, app.state.store, app.state.engine = settings, store, engine
    # after a deploy or rollback the engine re-reads the routing table
    app.state.on_model_change = getattr(engine, "refresh", None)

    @app.exception_handler(OwnlmError)
    async def _ownlm_error(request: Request, exc: OwnlmError) -> JSONResponse:
        retry = getattr(exc, "retry_after", None)  # Overloaded: when to try again, in seconds
        return JSONResponse(error_body(type(exc).__name__, exc.message, exc.hint), status_code=exc.http_status,
                            headers={"Retry-After": str(retry)} if retry is not None else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (no such route 404, wrong method 405, a form body it cannot parse 400)
        # in the same error body as everything else, so clients and the spec know one shape.
        kind = HTTPStatus(exc.status_code).phrase.replace(" ", "").replace("-", "")
        return JSONResponse(error_body(kind, str(exc.detail), "see the API schema at /docs"),
                            status_code=exc.status_code, headers=exc.headers)

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
        return FileResponse(STATIC / "index.html")  # headers: SecurityHeaders

    serve_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(openai_routes.router)
    app.include_router(personalization.router)
    app.include_router(memory.router)
    app.include_router(models_routes.router)
    app.include_router(loop_routes.router)
    app.include_router(ws.router)
    declare_errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    SecurityHeaders.around(app)  # outermost: the body limit's 413 and a crash's 500 get the headers too
    return app

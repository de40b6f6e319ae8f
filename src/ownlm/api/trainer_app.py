"""The trainer's HTTP API (`ownlm trainer`): a node sends sealed jobs here and gets sealed bundles back.

    GET  /trainer/pubkey                 the trainer's HPKE public key JSON (jobs are sealed to it)
    GET  /trainer/signing-key            the PEM public key that signs its bundles (the node must trust it)
    GET  /trainer/attestation?nonce=HEX  tier 2: evidence binding the HPKE key and the 32-byte nonce (404 outside a TEE)
    POST /trainer/jobs                   body: a sealed job (application/octet-stream); answer: the sealed bundle

Routes are thin: everything happens in `ownlm.privacy.trainer.Trainer`. Serve it over TLS only (uvicorn's
ssl_certfile/ssl_keyfile, `ownlm trainer --ssl-certfile ... --ssl-keyfile ...`).
"""

from __future__ import annotations

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ownlm import __version__
from ownlm.api.app import BodyLimit, SecurityHeaders, serve_docs
from ownlm.api.spec import error_body
from ownlm.errors import InvalidInput, NotFound, OwnlmError
from ownlm.privacy.trainer import Trainer


def create_trainer_app(trainer: Trainer, max_body_bytes: int = 256 * 1024 * 1024) -> FastAPI:
    app = FastAPI(title="ownlm trainer", version=__version__,
                  description="Trains personal models from sealed jobs; returns signed bundles sealed to the node.",
                  docs_url=None, redoc_url=None)  # serve_docs: self-hosted, as on the node
    serve_docs(app)
    app.state.trainer = trainer

    @app.exception_handler(OwnlmError)
    async def _ownlm_error(request: Request, exc: OwnlmError) -> JSONResponse:
        return JSONResponse(error_body(type(exc).__name__, exc.message, exc.hint), status_code=exc.http_status)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "role": "trainer", "version": __version__, "base_sha256": trainer.base.sha256}

    @app.get("/trainer/pubkey")
    def pubkey() -> dict:
        return trainer.pubkey()

    @app.get("/trainer/signing-key")
    def signing_key() -> dict:
        from ownlm.artifact.sign import key_id

        return {"pem": trainer.signing_key_pem(), "key_id": key_id(trainer.keys.signing)}

    @app.get("/trainer/attestation")
    def attestation(nonce: str = Query(..., description="32 random bytes, hex")) -> dict:
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raise InvalidInput("nonce is not hex", hint="send 64 hex digits") from None
        if len(raw) != 32:
            raise InvalidInput(f"nonce must be 32 bytes, got {len(raw)}", hint="send 64 hex digits")
        evidence = trainer.attestation(raw)
        if evidence is None:
            raise NotFound("this trainer runs in no TEE and has no attestation evidence",
                           hint="tier 2 needs a trainer started inside a TDX/SGX TEE")
        return evidence

    @app.post("/trainer/jobs", response_class=Response)
    async def jobs(request: Request) -> Response:
        body = await request.body()
        bundle = await run_in_threadpool(trainer.run, body)
        del body
        return Response(bundle, media_type="application/octet-stream")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    SecurityHeaders.around(app)
    return app

"""What the OpenAPI spec says about errors: the one error body every failure has, and which codes a route gives.

Every error leaves the node as {"error": {"type", "message", "hint"}} (api/app.py converts `OwnlmError`s,
request validation and the body limit to it). A route lists the codes it can really answer with, so API
clients and fuzzers can rely on the spec; the codes come from `http_status` in ownlm/errors.py:

    400 a body FastAPI cannot decode (see declare_errors in app.py)
    401 AuthError                       403 SignatureError, PrivacyViolation
    404 NotFound                        409 VersionConflict, DeltaMismatch, Busy
    413 PayloadTooLarge (BodyLimit)     422 InvalidInput, request validation, CorruptArtifact, WrongRecipient,
                                        ImportFormatError, NotEnoughData, QualityGateRefused
    503 ModelUnavailable (no model, shutting down), Overloaded (the waiting line is full, or the deadline
        passed before the answer began)

5xx other than 503 are bugs and are declared nowhere.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


def error_body(kind: str, message: str, hint: str | None) -> dict:
    """The error body as JSON (ErrorResponse's shape); every route, the WebSocket and the middlewares send it."""
    return {"error": {"type": kind, "message": message, "hint": hint}}


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's class, e.g. AuthError, NotFound, InvalidInput")
    message: str = Field(description="what went wrong")
    hint: str | None = Field(description="what to do next")


class ErrorResponse(BaseModel):
    error: ErrorDetail


WHY = {
    400: "a body that cannot be decoded (not UTF-8 JSON, a malformed multipart form)",
    401: "missing, invalid or revoked bearer token",
    403: "refused: an untrusted signature or the user's privacy tier",
    404: "no such conversation, message, model or user (or it belongs to someone else)",
    409: "conflicts with the current state (a version not newer, another base, a job already open)",
    413: "request body over the node's max_body_bytes",
    422: "the request does not have the expected shape or values",
    429: "too many generations queued on the node; retry later",
    503: "the node runs without a model or cannot take the generation now",
}


def errors(*codes: int) -> dict[int | str, dict]:
    """`responses=` for a route or router: each code with the error body and why it happens."""
    return {code: {"model": ErrorResponse, "description": WHY[code]} for code in codes}

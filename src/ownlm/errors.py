"""User-facing errors.

Every error a person can cause or fix is an `OwnlmError`: a one-line message saying what went wrong and a
hint saying what to do next. They are converted in exactly one place each: to a CLI line in
`ownlm.cli.main` and to an HTTP response in the API's exception handler (`http_status` picks the code).
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class OwnlmError(Exception):
    """Base of all errors meant for the user. `hint` says how to fix it."""

    http_status = 400

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(OwnlmError):
    """A setting, flag or settings file is invalid."""


class BaseModelNotFound(OwnlmError):
    """The base model path does not exist or holds no model."""

    http_status = 404


class BaseModelInvalid(OwnlmError):
    """The base model exists but cannot be loaded."""

    http_status = 422


class DeviceUnavailable(OwnlmError):
    """The requested device (e.g. cuda) is not present."""


class StoreError(OwnlmError):
    """The conversation store cannot be opened or is damaged."""

    http_status = 500


class WrongPassphrase(OwnlmError):
    """The passphrase does not unlock the store key."""

    http_status = 401


class AuthError(OwnlmError):
    """Missing or invalid bearer token."""

    http_status = 401


class NotFound(OwnlmError):
    """A user, conversation, message or model that does not exist (or belongs to someone else)."""

    http_status = 404


class InvalidInput(OwnlmError):
    """A request body, file or argument that does not have the expected shape."""

    http_status = 422


class PayloadTooLarge(OwnlmError):
    """A request body or file above the configured limit."""

    http_status = 413


class ImportFormatError(OwnlmError):
    """An export file whose format is unknown, truncated or malformed."""

    http_status = 422


class PrivacyViolation(OwnlmError):
    """An action the user's privacy tier forbids (e.g. sending data off the machine on tier 1)."""

    http_status = 403


class ModelUnavailable(OwnlmError):
    """A request needs a model but this node runs without one (capture only)."""

    http_status = 503


class EngineUnavailable(OwnlmError):
    """The configured inference engine cannot run here: its package is missing, or the base does not suit it."""

    http_status = 503


class DeltaMismatch(OwnlmError):
    """A personal delta that does not fit the model it is applied to (another base, shape or module)."""

    http_status = 409


class CorruptArtifact(OwnlmError):
    """A delta or artifact file that is truncated, altered or inconsistent with its own metadata."""

    http_status = 422


class SignatureError(OwnlmError):
    """A manifest whose signature is missing, invalid, or made by a key this node does not trust."""

    http_status = 403


class WrongRecipient(OwnlmError):
    """A bundle sealed to another node's key."""

    http_status = 422


class VersionConflict(OwnlmError):
    """A model version that is not newer than the installed one (a replay), without an explicit rollback."""

    http_status = 409


class Overloaded(OwnlmError):
    """The node cannot start this generation now: as many are waiting as it allows, or the request's deadline
    passed before its answer began. Answered 503 with a Retry-After header (`retry_after`, seconds)."""

    http_status = 503

    def __init__(self, message: str, hint: str | None = None, retry_after: int = 5):
        super().__init__(message, hint)
        self.retry_after = retry_after


class Busy(OwnlmError):
    """Something that is already running for this user (a training job)."""

    http_status = 409


class NotEnoughData(OwnlmError):
    """Too few usable training examples (none, or fewer than the configured minimum)."""

    http_status = 422


class TrainingDiverged(OwnlmError):
    """Training produced a non-finite loss, gradient or weight; the run was stopped and nothing was replaced."""

    http_status = 500


class RemoteTrainerError(OwnlmError):
    """A remote trainer that cannot be reached safely (unverifiable TLS certificate, wrong host) or that failed a job."""

    http_status = 502


class AttestationFailed(OwnlmError):
    """A trainer's attestation evidence that does not verify, does not meet the policy, or does not bind its key."""

    http_status = 403


class QualityGateRefused(OwnlmError):
    """A trained model did not pass the quality gate; the previous model keeps serving."""

    http_status = 422


class TrainedOnDeletedData(OwnlmError):
    """A model whose recorded dataset holds data the user deleted (a replayed bundle, or a round that was
    training while the delete happened): the right to delete refuses to install it."""

    http_status = 409


class MergeIncompatible(DeltaMismatch):
    """Personal models that cannot be merged into one: made for different bases, on different modules or shapes,
    not LoRA (dense), or of different ranks for a method that needs equal ones."""


class MergeConfigError(ConfigError):
    """A merge asked for in a way that cannot work: an unknown method, weights that do not fit the models, a
    density the method does not take (or lacks), or a rank outside the artifact's size budget."""


class UpdateRefused(OwnlmError):
    """A federated round refused a device's update (tampered, replayed, for another round, user or base)."""

    http_status = 409

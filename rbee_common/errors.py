"""One error tree for every rbee program.

    RbeeError                      code                     status
    ├── InvalidRequest             INVALID_REQUEST          400
    │   ├── MalformedJson          MALFORMED_JSON           400
    │   └── ValidationFailed       VALIDATION_FAILED        400
    ├── Unauthorized               UNAUTHORIZED             401
    ├── Forbidden                  FORBIDDEN                403
    ├── NotFound                   NOT_FOUND                404
    │   └── JobNotFound            JOB_NOT_FOUND            404
    ├── Conflict                   CONFLICT                 409
    ├── PayloadTooLarge            PAYLOAD_TOO_LARGE        413
    ├── Unprocessable              UNPROCESSABLE            422
    ├── TooManyRequests            TOO_MANY_REQUESTS        429
    ├── InternalError              INTERNAL_ERROR           500
    ├── NotImplementedYet          NOT_IMPLEMENTED          501
    ├── RemoteFailed               REMOTE_FAILED            502 (SSH and remote installs)
    ├── ServiceUnavailable         SERVICE_UNAVAILABLE      503
    │   └── ShuttingDown           SHUTTING_DOWN            503
    ├── TransportError             (client side only: never on the wire)
    │   ├── ConnectFailed          CONNECT_FAILED
    │   └── RequestTimedOut        REQUEST_TIMED_OUT
    ├── JobFailed                  a job's stream ended with `[ERROR]`
    ├── JobCancelled               JOB_CANCELLED: a job's stream ended with `[CANCELLED]`
    └── ConfigError                CONFIG_ERROR (local only: a bad config file)

Servers turn an `RbeeError` into the envelope
`{"error": {"code", "message", "details", "correlation_id"}}` in one handler
(`rbee_common.http`); clients turn an envelope back into the same class with
`error_from_envelope`. Messages are written by us, never echo the request, and
carry no secret, path or address of the serving machine.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    correlation_id: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class RbeeError(Exception):
    """Base of every error rbee raises on purpose."""

    code: ClassVar[str] = "RBEE_ERROR"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        code: str | None = None,
        hint: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.correlation_id = correlation_id
        """Set where the server logged more under this id than the client is told."""
        self.details: dict[str, Any] = dict(details or {})
        if hint is not None:
            self.details.setdefault("hint", hint)
        if code is not None:
            # A subclass-specific code (MODEL_NOT_FOUND is a NotFound) keeps the
            # class's status while telling clients exactly what happened.
            self.code = code  # type: ignore[misc]

    @property
    def hint(self) -> str | None:
        hint = self.details.get("hint")
        return hint if isinstance(hint, str) else None

    def to_body(self, correlation_id: str | None = None) -> ErrorBody:
        return ErrorBody(
            code=self.code,
            message=self.message,
            details=self.details,
            correlation_id=correlation_id,
        )

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RbeeError):
    code = "INVALID_REQUEST"
    status = 400


class MalformedJson(InvalidRequest):
    code = "MALFORMED_JSON"


class ValidationFailed(InvalidRequest):
    code = "VALIDATION_FAILED"


class Unauthorized(RbeeError):
    code = "UNAUTHORIZED"
    status = 401


class Forbidden(RbeeError):
    code = "FORBIDDEN"
    status = 403


class NotFound(RbeeError):
    code = "NOT_FOUND"
    status = 404


class JobNotFound(NotFound):
    code = "JOB_NOT_FOUND"


class DeadlineExceeded(RbeeError):
    """The request's deadline passed (rbee_common/deadlines.py)."""

    code = "REQUEST_TIMEOUT"
    status = 408


class Conflict(RbeeError):
    code = "CONFLICT"
    status = 409


class PayloadTooLarge(RbeeError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class Unprocessable(RbeeError):
    code = "UNPROCESSABLE"
    status = 422


class TooManyRequests(RbeeError):
    code = "TOO_MANY_REQUESTS"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.details.setdefault("retry_after_s", retry_after_s)

    @property
    def retry_after_s(self) -> int:
        value = self.details.get("retry_after_s", 1)
        return value if isinstance(value, int) else 1


class InternalError(RbeeError):
    code = "INTERNAL_ERROR"
    status = 500


class NotImplementedYet(RbeeError):
    code = "NOT_IMPLEMENTED"
    status = 501


class RemoteFailed(RbeeError):
    """Work on another machine over SSH failed; the code says how (SSH_AUTH_FAILED, ...)."""

    code = "REMOTE_FAILED"
    status = 502


class ServiceUnavailable(RbeeError):
    code = "SERVICE_UNAVAILABLE"
    status = 503


class ShuttingDown(ServiceUnavailable):
    code = "SHUTTING_DOWN"


class TransportError(RbeeError):
    """The other side could not be reached or did not answer in time."""

    code = "TRANSPORT_ERROR"
    status = 503


class ConnectFailed(TransportError):
    code = "CONNECT_FAILED"


class RequestTimedOut(TransportError):
    code = "REQUEST_TIMED_OUT"


class JobFailed(RbeeError):
    """A job ended with `[ERROR]` and no typed error event told us more."""

    code = "JOB_FAILED"
    status = 500


class JobCancelled(RbeeError):
    code = "JOB_CANCELLED"
    status = 499


class ConfigError(RbeeError):
    code = "CONFIG_ERROR"
    status = 500


def _all_subclasses(cls: type[RbeeError]) -> list[type[RbeeError]]:
    found: list[type[RbeeError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _class_for(code: str, status: int) -> type[RbeeError]:
    by_code = {cls.code: cls for cls in _all_subclasses(RbeeError)}
    if code in by_code:
        return by_code[code]
    # A code we do not know (a newer peer, or a specific code such as
    # MODEL_NOT_FOUND): fall back to the class of its HTTP status.
    by_status: dict[int, type[RbeeError]] = {}
    for cls in (
        InvalidRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge,
        Unprocessable, TooManyRequests, InternalError, NotImplementedYet, ServiceUnavailable,
    ):
        by_status[cls.status] = cls
    return by_status.get(status, RbeeError)


def error_from_body(body: ErrorBody, status: int) -> RbeeError:
    """Rebuild the error a server raised from its envelope."""
    cls = _class_for(body.code, status)
    error = cls.__new__(cls)
    RbeeError.__init__(error, body.message, details=body.details, code=body.code)
    error.correlation_id = body.correlation_id
    return error


_envelope_decoder = msgspec.json.Decoder(ErrorEnvelope)


def error_from_response(status: int, content: bytes) -> RbeeError:
    """Map a non-2xx HTTP response to an error, whatever its body holds."""
    try:
        envelope = _envelope_decoder.decode(content)
    except msgspec.DecodeError:
        cls = _class_for("", status)
        return cls(f"The server answered HTTP {status} without an rbee error body.")
    return error_from_body(envelope.error, status)


def first_leaf(error: BaseException) -> BaseException:
    """The error inside nested exception groups (trio nurseries wrap what their tasks raise)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

"""One error tree for every rbee program: every code on the wire is a class here.

    class                               code                       HTTP status
    RbeeError                           RBEE_ERROR                 500
    ├── InvalidRequest                  INVALID_REQUEST            400
    │   ├── MalformedJson               MALFORMED_JSON
    │   ├── ValidationFailed            VALIDATION_FAILED
    │   ├── MethodNotAllowed            METHOD_NOT_ALLOWED         405
    │   ├── UnsupportedMediaType        UNSUPPORTED_MEDIA_TYPE     415 (a POST body that is not JSON)
    │   ├── LimitExceeded               LIMIT_EXCEEDED             (a count, size or depth over a limit)
    │   ├── ContextLengthExceeded       CONTEXT_LENGTH_EXCEEDED    (a prompt that leaves no room to answer)
    │   ├── WrongDaemon                 WRONG_DAEMON               (a queen operation sent to a hive)
    │   └── HiveInProcess               HIVE_IS_LOCAL              (no SSH lifecycle for it)
    ├── Unauthorized                    UNAUTHORIZED               401
    │   └── AuthFailed                  (with the reason the audit log records)
    │       ├── MissingApiKey           MISSING_API_KEY
    │       ├── InvalidAuthFormat       INVALID_AUTH_FORMAT
    │       └── InvalidApiKey           INVALID_API_KEY
    ├── Forbidden                       FORBIDDEN                  403
    │   ├── AccessDenied                ACCESS_DENIED              (a gated or private model)
    │   ├── ModelPathNotAllowed         MODEL_PATH_NOT_ALLOWED
    │   ├── WorkerNotAllowed            WORKER_NOT_ALLOWED
    │   ├── OriginRefused               ORIGIN_REFUSED             (a web page of another site)
    │   └── HostRefused                 HOST_REFUSED               (a Host that is not this daemon's)
    ├── NotFound                        NOT_FOUND                  404
    │   ├── RouteNotFound               ROUTE_NOT_FOUND
    │   ├── JobNotFound                 JOB_NOT_FOUND
    │   ├── HiveNotFound                HIVE_NOT_FOUND
    │   ├── HiveNotInstalled            HIVE_NOT_INSTALLED
    │   ├── ModelNotFound               MODEL_NOT_FOUND
    │   ├── WorkerNotFound              WORKER_NOT_FOUND
    │   ├── DeviceNotFound              DEVICE_NOT_FOUND
    │   ├── RpcServerNotFound           RPC_SERVER_NOT_FOUND
    │   └── RequestNotFound             REQUEST_NOT_FOUND
    ├── DeadlineExceeded                REQUEST_TIMEOUT            408
    ├── Conflict                        CONFLICT                   409
    │   ├── ModelBuiltin                MODEL_BUILTIN
    │   ├── ModelInUse                  MODEL_IN_USE
    │   └── WorkerAlreadyRegistered     WORKER_ALREADY_REGISTERED
    ├── PayloadTooLarge                 PAYLOAD_TOO_LARGE          413
    ├── Unprocessable                   UNPROCESSABLE              422
    │   ├── InsufficientResources       INSUFFICIENT_RESOURCES
    │   │   ├── InsufficientCpu         INSUFFICIENT_CPU
    │   │   ├── InsufficientRam         INSUFFICIENT_RAM
    │   │   ├── InsufficientVram        INSUFFICIENT_VRAM
    │   │   └── NoFreePort              NO_FREE_PORT
    │   ├── InsufficientDisk            INSUFFICIENT_DISK
    │   └── ModelLoadFailed             MODEL_LOAD_FAILED
    ├── TooManyRequests                 TOO_MANY_REQUESTS          429
    │   └── QueueFull                   QUEUE_FULL
    ├── JobCancelled                    JOB_CANCELLED              499 (a job's stream ended `[CANCELLED]`)
    ├── InternalError                   INTERNAL_ERROR             500
    ├── JobFailed                       JOB_FAILED                 500 (`[ERROR]` with no typed error)
    ├── ConfigError                     CONFIG_ERROR               500 (local only: a bad config file)
    ├── NotImplementedYet               NOT_IMPLEMENTED            501
    ├── RemoteFailed                    REMOTE_FAILED              502 (SSH and remote installs)
    │   ├── SshFailed                   SSH_FAILED
    │   │   ├── SshAuthFailed           SSH_AUTH_FAILED
    │   │   ├── SshTimeout              SSH_TIMEOUT
    │   │   ├── SshUnreachable          SSH_UNREACHABLE
    │   │   ├── SshConnectionLost       SSH_CONNECTION_LOST
    │   │   ├── SshHostKeyUnknown       SSH_HOST_KEY_UNKNOWN
    │   │   ├── SshHostKeyChanged       SSH_HOST_KEY_CHANGED
    │   │   ├── SshKeyNotFound          SSH_KEY_NOT_FOUND
    │   │   ├── SshKeyPermissions       SSH_KEY_PERMISSIONS
    │   │   ├── SshCommandFailed        SSH_COMMAND_FAILED
    │   │   ├── SshCommandTimeout       SSH_COMMAND_TIMEOUT
    │   │   └── SshCopyFailed           SSH_COPY_FAILED
    │   ├── RemoteDiskFull              REMOTE_DISK_FULL
    │   ├── RemotePythonMissing         REMOTE_PYTHON_MISSING
    │   ├── RemotePythonOld             REMOTE_PYTHON_OLD
    │   ├── RemoteVenvFailed            REMOTE_VENV_FAILED
    │   ├── RemoteInstallFailed         REMOTE_INSTALL_FAILED
    │   ├── HiveVersionMismatch         HIVE_VERSION_MISMATCH
    │   ├── HiveStartFailed             HIVE_START_FAILED
    │   ├── WheelhouseMissing           WHEELHOUSE_MISSING
    │   ├── WheelhouseBuildFailed       WHEELHOUSE_BUILD_FAILED
    │   └── WheelhousePlatform          WHEELHOUSE_PLATFORM
    ├── ServiceUnavailable              SERVICE_UNAVAILABLE        503
    │   ├── ShuttingDown                SHUTTING_DOWN
    │   ├── HiveUnreachable             HIVE_UNREACHABLE
    │   ├── NoHive                      NO_HIVE
    │   ├── NoWorker                    NO_WORKER
    │   ├── QueueTimeout                QUEUE_TIMEOUT
    │   ├── WorkerFailed                WORKER_FAILED
    │   │   └── WorkerDied              WORKER_DIED
    │   ├── WorkerStartFailed           WORKER_START_FAILED
    │   │   ├── WorkerReadyTimeout      WORKER_READY_TIMEOUT
    │   │   └── WorkerBinaryNotFound    WORKER_BINARY_NOT_FOUND
    │   ├── WorkerLoading               LOADING
    │   ├── WorkerDraining              DRAINING
    │   ├── AllSlotsBusy                ALL_SLOTS_BUSY
    │   ├── BackendUnavailable          BACKEND_UNAVAILABLE
    │   └── DownloadFailed              DOWNLOAD_FAILED
    │       ├── DownloadStalled         DOWNLOAD_STALLED
    │       ├── DownloadCorrupt         DOWNLOAD_CORRUPT
    │       └── UnsafeFileName          UNSAFE_FILE_NAME
    └── TransportError                  TRANSPORT_ERROR            (client side: never sent)
        ├── ConnectFailed               CONNECT_FAILED
        ├── RequestTimedOut             REQUEST_TIMED_OUT
        └── PoolTimedOut                POOL_TIMED_OUT

Servers turn an `RbeeError` into the envelope
`{"error": {"code", "message", "details", "correlation_id"}}` in one handler
(`rbee_common.http`); clients turn an envelope back into the same class with
`error_from_envelope`, through one table (`CLASSES_BY_CODE`). A code this
table does not know (a newer peer) becomes the class of its HTTP status and
keeps its code. httpx's errors become `TransportError`s in one place
(`rbee_common.client.map_transport_errors`). Messages are written by us, never
echo the request, and carry no secret, path or address of the serving machine.

Past 500 lines on purpose: the whole vocabulary sits in one module, so that the
table above, the classes and `CLASSES_BY_CODE` cannot drift apart, and a
client's class for a code never depends on which other modules it imported.
"""

from __future__ import annotations

from typing import Any, Final

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

    code: str = "RBEE_ERROR"
    """Each class's own; an instance differs only when it stands for a newer peer's unknown code."""
    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
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


class UnsupportedMediaType(InvalidRequest):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class LimitExceeded(InvalidRequest):
    """A request within the schema but over one of the server's limits; `details` names the
    field and the limit."""

    code = "LIMIT_EXCEEDED"


class ContextLengthExceeded(InvalidRequest):
    """The prompt fills the context: `details` has `prompt_tokens` and `context_tokens`, which each
    dialect words as its clients expect."""

    code = "CONTEXT_LENGTH_EXCEEDED"


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


class _RetryLater(RbeeError):
    """The base of errors a client should retry: `retry_after_s` in the details (and Retry-After)."""

    default_retry_after_s = 1

    def __init__(self, message: str, *, retry_after_s: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.details.setdefault("retry_after_s", retry_after_s or self.default_retry_after_s)


class TooManyRequests(_RetryLater):
    code = "TOO_MANY_REQUESTS"
    status = 429


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


# --- 400 -------------------------------------------------------------------------------


class MethodNotAllowed(InvalidRequest):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class WrongDaemon(InvalidRequest):
    code = "WRONG_DAEMON"


class HiveInProcess(InvalidRequest):
    code = "HIVE_IS_LOCAL"


# --- 401, 403 --------------------------------------------------------------------------


class AuthFailed(Unauthorized):
    """A 401, with what the audit log records (never sent to the client)."""

    reason: str = "invalid_token"
    identity: str | None = None


class MissingApiKey(AuthFailed):
    code = "MISSING_API_KEY"


class InvalidAuthFormat(AuthFailed):
    code = "INVALID_AUTH_FORMAT"


class InvalidApiKey(AuthFailed):
    code = "INVALID_API_KEY"


class AccessDenied(Forbidden):
    code = "ACCESS_DENIED"


class ModelPathNotAllowed(Forbidden):
    code = "MODEL_PATH_NOT_ALLOWED"


class WorkerNotAllowed(Forbidden):
    code = "WORKER_NOT_ALLOWED"


class OriginRefused(Forbidden):
    code = "ORIGIN_REFUSED"


class HostRefused(Forbidden):
    code = "HOST_REFUSED"


# --- 404 -------------------------------------------------------------------------------


class RouteNotFound(NotFound):
    code = "ROUTE_NOT_FOUND"


class HiveNotFound(NotFound):
    code = "HIVE_NOT_FOUND"


class HiveNotInstalled(NotFound):
    code = "HIVE_NOT_INSTALLED"


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class WorkerNotFound(NotFound):
    code = "WORKER_NOT_FOUND"


class DeviceNotFound(NotFound):
    code = "DEVICE_NOT_FOUND"


class RpcServerNotFound(NotFound):
    code = "RPC_SERVER_NOT_FOUND"


class RequestNotFound(NotFound):
    code = "REQUEST_NOT_FOUND"


# --- 409, 422, 429 ---------------------------------------------------------------------


class ModelBuiltin(Conflict):
    code = "MODEL_BUILTIN"


class ModelInUse(Conflict):
    code = "MODEL_IN_USE"


class WorkerAlreadyRegistered(Conflict):
    code = "WORKER_ALREADY_REGISTERED"


class InsufficientResources(Unprocessable):
    code = "INSUFFICIENT_RESOURCES"


class InsufficientCpu(InsufficientResources):
    code = "INSUFFICIENT_CPU"


class InsufficientRam(InsufficientResources):
    code = "INSUFFICIENT_RAM"


class InsufficientVram(InsufficientResources):
    code = "INSUFFICIENT_VRAM"


class NoFreePort(InsufficientResources):
    code = "NO_FREE_PORT"


class InsufficientDisk(Unprocessable):
    code = "INSUFFICIENT_DISK"


class ModelLoadFailed(Unprocessable):
    code = "MODEL_LOAD_FAILED"


class QueueFull(TooManyRequests):
    code = "QUEUE_FULL"


# --- 502: SSH and remote installs ------------------------------------------------------


class SshFailed(RemoteFailed):
    code = "SSH_FAILED"


class SshAuthFailed(SshFailed):
    code = "SSH_AUTH_FAILED"


class SshTimeout(SshFailed):
    code = "SSH_TIMEOUT"


class SshUnreachable(SshFailed):
    code = "SSH_UNREACHABLE"


class SshConnectionLost(SshFailed):
    code = "SSH_CONNECTION_LOST"


class SshHostKeyUnknown(SshFailed):
    code = "SSH_HOST_KEY_UNKNOWN"


class SshHostKeyChanged(SshFailed):
    code = "SSH_HOST_KEY_CHANGED"


class SshKeyNotFound(SshFailed):
    code = "SSH_KEY_NOT_FOUND"


class SshKeyPermissions(SshFailed):
    code = "SSH_KEY_PERMISSIONS"


class SshCommandFailed(SshFailed):
    code = "SSH_COMMAND_FAILED"


class SshCommandTimeout(SshFailed):
    code = "SSH_COMMAND_TIMEOUT"


class SshCopyFailed(SshFailed):
    code = "SSH_COPY_FAILED"


class RemoteDiskFull(RemoteFailed):
    code = "REMOTE_DISK_FULL"


class RemotePythonMissing(RemoteFailed):
    code = "REMOTE_PYTHON_MISSING"


class RemotePythonOld(RemoteFailed):
    code = "REMOTE_PYTHON_OLD"


class RemoteVenvFailed(RemoteFailed):
    code = "REMOTE_VENV_FAILED"


class RemoteInstallFailed(RemoteFailed):
    code = "REMOTE_INSTALL_FAILED"


class HiveVersionMismatch(RemoteFailed):
    code = "HIVE_VERSION_MISMATCH"


class HiveStartFailed(RemoteFailed):
    code = "HIVE_START_FAILED"


class WheelhouseMissing(RemoteFailed):
    code = "WHEELHOUSE_MISSING"


class WheelhouseBuildFailed(RemoteFailed):
    code = "WHEELHOUSE_BUILD_FAILED"


class WheelhousePlatform(RemoteFailed):
    code = "WHEELHOUSE_PLATFORM"


# --- 503 -------------------------------------------------------------------------------


class HiveUnreachable(ServiceUnavailable):
    code = "HIVE_UNREACHABLE"


class NoHive(ServiceUnavailable):
    code = "NO_HIVE"


class NoWorker(ServiceUnavailable):
    code = "NO_WORKER"


class QueueTimeout(_RetryLater, ServiceUnavailable):
    code = "QUEUE_TIMEOUT"
    default_retry_after_s = 2


class WorkerFailed(ServiceUnavailable):
    code = "WORKER_FAILED"


class WorkerDied(WorkerFailed):
    code = "WORKER_DIED"


class WorkerStartFailed(ServiceUnavailable):
    code = "WORKER_START_FAILED"


class WorkerReadyTimeout(WorkerStartFailed):
    code = "WORKER_READY_TIMEOUT"


class WorkerBinaryNotFound(WorkerStartFailed):
    code = "WORKER_BINARY_NOT_FOUND"


class WorkerLoading(_RetryLater, ServiceUnavailable):
    code = "LOADING"


class WorkerDraining(ServiceUnavailable):
    code = "DRAINING"


class AllSlotsBusy(ServiceUnavailable):
    code = "ALL_SLOTS_BUSY"


class BackendUnavailable(ServiceUnavailable):
    code = "BACKEND_UNAVAILABLE"


class DownloadFailed(ServiceUnavailable):
    code = "DOWNLOAD_FAILED"


class DownloadStalled(DownloadFailed):
    code = "DOWNLOAD_STALLED"


class DownloadCorrupt(DownloadFailed):
    code = "DOWNLOAD_CORRUPT"


class UnsafeFileName(DownloadFailed):
    code = "UNSAFE_FILE_NAME"


class PoolTimedOut(TransportError):
    code = "POOL_TIMED_OUT"


def _tree(cls: type[RbeeError]) -> list[type[RbeeError]]:
    found: list[type[RbeeError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_tree(sub))
    return found


_ALL: Final[list[type[RbeeError]]] = [RbeeError, *_tree(RbeeError)]

CLASSES_BY_CODE: Final[dict[str, type[RbeeError]]] = {
    cls.code: cls for cls in _ALL if cls.__module__ == __name__ and "code" in vars(cls)
}
"""The one table from code to class: made here, when only this module's classes exist, so the
class a client gets never depends on what else it imported (a test keeps every class here)."""

_BY_STATUS: Final[dict[int, type[RbeeError]]] = {
    cls.status: cls for cls in (
        InvalidRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable,
        TooManyRequests, InternalError, NotImplementedYet, RemoteFailed, ServiceUnavailable,
    )
}


def error_from_body(body: ErrorBody, status: int) -> RbeeError:
    """Rebuild the error a server raised from its envelope."""
    cls = CLASSES_BY_CODE.get(body.code) or _BY_STATUS.get(status, RbeeError)
    error = cls.__new__(cls)
    RbeeError.__init__(error, body.message, details=body.details)
    if error.code != body.code:  # a newer peer's code: the class of its status, with its own code
        error.code = body.code
    error.correlation_id = body.correlation_id
    return error


_envelope_decoder = msgspec.json.Decoder(ErrorEnvelope)


def error_from_response(status: int, content: bytes) -> RbeeError:
    """Map a non-2xx HTTP response to an error, whatever its body holds."""
    try:
        envelope = _envelope_decoder.decode(content)
    except msgspec.DecodeError:
        cls = _BY_STATUS.get(status, RbeeError)
        return cls(f"The server answered HTTP {status} without an rbee error body.")
    return error_from_body(envelope.error, status)


def first_leaf(error: BaseException) -> BaseException:
    """The error inside nested exception groups (trio nurseries wrap what their tasks raise)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

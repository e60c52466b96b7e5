"""What every rbee HTTP server shares: the error envelope, body decoding,
correlation ids, SSE framing, and serving an app on hypercorn under trio.

Routes raise `RbeeError`; one handler here turns it (and anything else) into
the envelope of DESIGN §8 with a fresh correlation id that is also logged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hypercorn.config
import hypercorn.trio
import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from rbee_common.errors import (
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RbeeError,
)

_encoder = msgspec.json.Encoder()

_HTTP_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    404: ("ROUTE_NOT_FOUND", "No such endpoint. See the README for the API."),
    405: ("METHOD_NOT_ALLOWED", "This endpoint does not accept that HTTP method."),
    413: ("PAYLOAD_TOO_LARGE", "The request body is larger than this server accepts."),
}


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _encoder.encode(value), status=status, headers=headers, content_type="application/json"
    )


def correlation_id() -> str:
    cid = getattr(g, "correlation_id", None)
    if not isinstance(cid, str):
        cid = str(uuid.uuid4())
        g.correlation_id = cid
    return cid


def error_response(error: RbeeError, *, component: str) -> Response:
    cid = correlation_id()
    log = logging.getLogger(f"rbee.{component}")
    # Never log the request itself: it may hold prompts or secrets.
    level = logging.ERROR if error.status >= 500 else logging.WARNING
    log.log(
        level,
        "request failed component=%s correlation_id=%s code=%s status=%d method=%r path=%r",
        component, cid, error.code, error.status, request.method, request.path,
    )
    headers = {"X-Correlation-Id": cid}
    retry_after = error.details.get("retry_after_s")
    if error.status in (429, 503) and isinstance(retry_after, int):
        headers["Retry-After"] = str(retry_after)
    envelope = {"error": error.to_body(cid)}
    return json_response(envelope, status=error.status, headers=headers)


def create_app(name: str, *, component: str, max_body_bytes: int) -> QuartTrio:
    """A QuartTrio app with rbee's error handling and body limit installed."""
    app = QuartTrio(name)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    @app.after_request
    async def _tag(response: Response) -> Response:
        response.headers.setdefault("X-Correlation-Id", correlation_id())
        return response

    @app.errorhandler(RbeeError)
    async def _rbee_error(error: RbeeError) -> Response:
        return error_response(error, component=component)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code, message = _HTTP_STATUS_ERRORS.get(status, ("HTTP_ERROR", "The request failed."))
        mapped: RbeeError
        if status == 413:
            mapped = PayloadTooLarge(
                message,
                details={"limit_bytes": max_body_bytes},
                hint="Send a smaller body, or raise the server's max_body_bytes.",
            )
        elif status == 404:
            mapped = NotFound(message, code=code)
        else:
            mapped = InvalidRequest(message, code=code)
            mapped.status = status  # type: ignore[misc]
        return error_response(mapped, component=component)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        logging.getLogger(f"rbee.{component}").error(
            "unexpected error correlation_id=%s", correlation_id(), exc_info=error
        )
        return error_response(
            InternalError("Internal error. The server log has the details under this correlation id."),
            component=component,
        )

    return app


def add_shutdown_route(app: QuartTrio, stop: trio.Event, path: str = "/v1/shutdown") -> None:
    """`POST path` stops the daemon gracefully, the same way SIGTERM does."""

    @app.post(path)
    async def shutdown() -> Response:
        stop.set()
        return json_response({"status": "stopping"}, status=202)


async def read_body() -> bytes:
    data = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return data if isinstance(data, bytes) else data.encode()


def no_content() -> Response:
    """204. The body must be b"": with none, quart iterates [] through asyncio and fails under trio."""
    return Response(b"", status=204)


def sse_frame(event_id: int | None, data: str) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data}\n\n".encode()


def sse_response(frames: AsyncIterator[bytes]) -> Response:
    response = Response(
        frames,
        status=200,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        content_type="text/event-stream",
    )
    response.timeout = None
    return response


async def serve_app(
    app: QuartTrio,
    *,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    graceful_timeout: float = 3.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; report the bound URLs.

    After the trigger, hypercorn waits up to `graceful_timeout` for open
    connections, idle kept-alive ones included: a server whose trigger has
    already drained its requests passes a short one.
    """
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 5.0
    await hypercorn.trio.serve(
        app,
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )

"""What every rbee HTTP server shares: the error envelope, body decoding,
correlation ids, SSE framing, and serving an app on hypercorn under trio.

Routes raise `RbeeError`; one handler here turns it (and anything else) into
the envelope of DESIGN §8 with a fresh correlation id that is also logged.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import hypercorn.config
import hypercorn.trio
import hypercorn.trio.tcp_server
import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from rbee_common.browser import BrowserGuard, install_browser_guard
from rbee_common.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RbeeError,
    RouteNotFound,
)

_encoder = msgspec.json.Encoder()


def _close_even_when_cancelled() -> None:
    """Make hypercorn close a connection that must close (`Connection: close`) under quart-trio.

    hypercorn closes it from inside the app's last `send`; quart-trio cancels that very task as
    soon as the `http.disconnect` which the same close queued reaches it, and the cancellation
    lands on the checkpoint in `send_eof`: the socket stayed open, and the client hung until its
    own timeout (hypercorn 0.18, quart-trio 0.12). Closing a socket is immediate, so the shield
    cannot hold anything up.
    """
    original = hypercorn.trio.tcp_server.TCPServer._close
    if getattr(original, "_rbee_shielded", False):
        return

    async def _close(self: hypercorn.trio.tcp_server.TCPServer) -> None:
        with trio.CancelScope(shield=True):
            await original(self)

    _close._rbee_shielded = True  # type: ignore[attr-defined]
    hypercorn.trio.tcp_server.TCPServer._close = _close  # type: ignore[method-assign]


_close_even_when_cancelled()


KEEP_ALIVE_S = 30.0
"""An idle kept-alive connection is closed after this (and at once when the server stops). Longer
than the workers' heartbeat period, so each worker beats on one connection; a client must send
its request headers within it too."""

BODY_TIMEOUT_S = 30.0
"""A request body that has not arrived this long after its headers is a 408 (slow or half-sent);
headers themselves must arrive within hypercorn's keep-alive timeout."""


def _body_unread() -> bool:
    """Did the request announce a body that has not all arrived (a 413 refuses it unread)?"""
    has_body = request.content_length not in (None, 0) or "chunked" in request.headers.get(
        "Transfer-Encoding", "").lower()
    if not has_body:
        return False
    complete = getattr(request.body, "_complete", None)
    return not (complete is not None and complete.is_set())


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
    g.error_code = error.code  # counted by the metrics (rbee_common.metrics)
    retry_after = error.details.get("retry_after_s")
    if error.status in (429, 503) and isinstance(retry_after, int):
        headers["Retry-After"] = str(retry_after)
    envelope = {"error": error.to_body(cid)}
    return json_response(envelope, status=error.status, headers=headers)


def create_app(name: str, *, component: str, max_body_bytes: int, guard: BrowserGuard) -> QuartTrio:
    """A QuartTrio app with rbee's error handling, body limit and browser guard installed (the
    guard's check runs before every other, auth included: `rbee_common.browser`)."""
    app = QuartTrio(name)
    install_browser_guard(app, guard)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S

    @app.after_request
    async def _tag(response: Response) -> Response:
        response.headers.setdefault("X-Correlation-Id", correlation_id())
        if response.status_code >= 400 and _body_unread():
            # The client's next request on this connection would sit behind the body we did not
            # read (a 413, or a 401 before the body): close it, the client reconnects.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(RbeeError)
    async def _rbee_error(error: RbeeError) -> Response:
        return error_response(error, component=component)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        mapped: RbeeError
        if status == 413:
            mapped = PayloadTooLarge(
                "The request body is larger than this server accepts.",
                details={"limit_bytes": app.config["MAX_CONTENT_LENGTH"]},
                hint="Send a smaller body, or raise the server's max_body_bytes.",
            )
        elif status == 404:
            mapped = RouteNotFound("No such endpoint. See the README for the API.")
        elif status == 405:
            mapped = MethodNotAllowed("This endpoint does not accept that HTTP method.")
        else:  # another 4xx the HTTP layer refused: an invalid request, with the layer's status
            mapped = InvalidRequest("The request failed.")
            mapped.status = status
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
    """`POST path` with a JSON object (`{}`) stops the daemon gracefully, the same way SIGTERM does.
    The body is required, so that no bodiless cross-site form can send it."""

    @app.post(path)
    async def shutdown() -> Response:
        await read_json_object()
        stop.set()
        return json_response({"status": "stopping"}, status=202)


async def read_body() -> bytes:
    data = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return data if isinstance(data, bytes) else data.encode()


async def read_json_object() -> dict[str, Any]:
    """A body that must be one JSON object (`{}` will do), for routes that take no fields."""
    try:
        value = msgspec.json.decode(await read_body())
    except (msgspec.DecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest("This endpoint takes a JSON object as its body.", hint="Send {}.")
    return value


def no_content() -> Response:
    """204. The body must be b"": with none, quart iterates [] through asyncio and fails under trio."""
    return Response(b"", status=204)


def listen_backlog() -> int:
    """The kernel's cap on a listen backlog (asking for more is silently cut to it)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as file:
            return max(int(file.read().strip()), 128)
    except (OSError, ValueError):
        return 4096


class OpenStreams:
    """The streamed answers a daemon is serving. On SIGTERM `end_all` ends each one with its
    terminator, so that clients see a clean end and the HTTP drain has nothing to wait for."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.ending = False

    @contextlib.contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """Wrap each wait for the stream's next piece (never a `yield` of an async generator)."""
        scope = trio.CancelScope()
        if self.ending:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def end_all(self) -> None:
        self.ending = True
        for scope in list(self._scopes):
            scope.cancel()


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
    h2_streams: int = 100,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; report the bound URLs.

    HTTP/1.1, and HTTP/2 with prior knowledge (the queen's connections to
    workers) with up to `h2_streams` concurrent streams per connection. The
    listen backlog is the system's (`somaxconn`): a burst of connections waits
    in the kernel instead of being reset.

    After the trigger, hypercorn waits up to `graceful_timeout` for open
    connections, idle kept-alive ones included: a server whose trigger has
    already drained its requests passes a short one.
    """
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.backlog = listen_backlog()
    config.h2_max_concurrent_streams = h2_streams
    await hypercorn.trio.serve(
        app,
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )

"""The job client: submit an operation, stream its typed events.

`JobClient.run(op)` yields `Narration`/`Progress`/`Token`/`Result` events and
returns at `[DONE]`; `[ERROR]` raises the error class the server raised and
`[CANCELLED]` raises `JobCancelled`. If the caller stops early (cancelled, or
leaves the loop) the job is cancelled on the server too. A dropped stream is
resumed with `Last-Event-ID`. `JobClient.call(op)` runs a job to its end and
returns its result as the type `op` declares (`wire.py`).

Every outbound HTTP call of every rbee program goes through
`map_transport_errors`: httpx's errors become ours once, at the boundary (the
shape of httpx's own `map_httpcore_exceptions`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import httpx
import httpx_sse
import msgspec
import trio

from rbee_common import deadlines
from rbee_common.errors import (
    ConnectFailed,
    JobCancelled,
    JobFailed,
    PoolTimedOut,
    RbeeError,
    RequestTimedOut,
    TransportError,
    error_from_body,
    error_from_response,
)
from rbee_common.wire import (
    CANCELLED,
    DONE,
    ERROR_PREFIX,
    JobCreated,
    JobEvent,
    JobInfo,
    Narration,
    Op,
    Result,
    T,
    event_decoder,
)

STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)
"""Streams wait for events as long as the job runs; connecting does not."""

REQUEST_TIMEOUT = httpx.Timeout(10.0)
"""For plain requests; callers who want less wrap them in `trio.move_on_after`."""

_created_decoder = msgspec.json.Decoder(JobCreated)
_info_decoder = msgspec.json.Decoder(JobInfo)
_encoder = msgspec.json.Encoder()


QUEEN_HINT = "Is it running? `rbee-keeper queen status` tells; `rbee-keeper queen start` starts it."


@contextlib.contextmanager
def map_transport_errors(where: str, *, hint: str | None = None) -> Iterator[None]:
    """Turn httpx's errors into ours, naming the server (`where`) and what to do.

    `ConnectFailed`: nothing listens (or the name does not resolve); `PoolTimedOut`: every
    connection of our own pool stayed busy; `RequestTimedOut`: the server did not answer in
    time; `TransportError`: the connection broke, or the answer was not HTTP.
    """
    try:
        yield
    except httpx.ConnectTimeout:
        raise ConnectFailed(f"Cannot connect to {where}: no answer in time.", hint=hint) from None
    except httpx.ConnectError:
        raise ConnectFailed(f"Cannot connect to {where}.", hint=hint) from None
    except httpx.PoolTimeout:
        raise PoolTimedOut(f"No connection to {where} became free in time.", hint=hint) from None
    except httpx.TimeoutException:
        raise RequestTimedOut(f"{where} did not answer in time.", hint=hint) from None
    except (httpx.TransportError, httpx.DecodingError, httpx.TooManyRedirects) as error:
        raise TransportError(
            f"The connection to {where} failed ({type(error).__name__}).", hint=hint) from None


class JobClient:
    def __init__(
        self, base_url: str, *, http: httpx.AsyncClient, token: str | None = None,
        hint: str | None = QUEEN_HINT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.hint = hint
        """What to do when the server cannot be reached (the default speaks of a queen)."""
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def request(
        self, method: str, path: str, *, json: Any = None, extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        content = None if json is None else _encoder.encode(json)
        headers = {**self._headers, **(extra or {})}
        if content is not None:
            headers["Content-Type"] = "application/json"
        with map_transport_errors(self.base_url, hint=self.hint):
            response = await self._http.request(
                method, self.base_url + path, content=content, headers=headers, timeout=REQUEST_TIMEOUT
            )
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)
        return response

    async def submit(self, operation: Op[object]) -> JobCreated:
        # A job submitted on behalf of a request with a deadline has the same deadline (area 340).
        response = await self.request("POST", "/v1/jobs", json=operation, extra=deadlines.outgoing())
        return _created_decoder.decode(response.content)

    async def status(self, job_id: str) -> JobInfo:
        response = await self.request("GET", f"/v1/jobs/{job_id}")
        return _info_decoder.decode(response.content)

    async def cancel(self, job_id: str) -> JobInfo:
        response = await self.request("DELETE", f"/v1/jobs/{job_id}")
        return _info_decoder.decode(response.content)

    async def stream(
        self, job_id: str, *, after: int | None = None, reconnects: int = 3
    ) -> AsyncGenerator[JobEvent, None]:
        """The job's events from the start (or after event `after`) to its end."""
        last_error: Narration | None = None
        last_id = after
        attempt = 0
        while True:
            headers = dict(self._headers)
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                with map_transport_errors(self.base_url, hint=self.hint):
                    async with httpx_sse.aconnect_sse(
                        self._http, "GET", f"{self.base_url}/v1/jobs/{job_id}/stream",
                        headers=headers, timeout=STREAM_TIMEOUT,
                    ) as source:
                        if source.response.status_code >= 400:
                            await source.response.aread()
                            raise error_from_response(
                                source.response.status_code, source.response.content
                            )
                        async with contextlib.aclosing(source.aiter_sse()) as sse:
                            async for message in sse:
                                if message.id:
                                    last_id = int(message.id)
                                data = message.data
                                if not data:
                                    # a keep-alive comment: httpx-sse reports it as an empty
                                    # event once any event has had an id
                                    continue
                                if data == DONE:
                                    return
                                if data == CANCELLED:
                                    raise JobCancelled("The job was cancelled.")
                                if data.startswith(ERROR_PREFIX):
                                    raise _job_error(data, last_error)
                                event = event_decoder.decode(data)
                                if isinstance(event, Narration) and event.error is not None:
                                    last_error = event
                                yield event
            except (ConnectFailed, RequestTimedOut):
                raise
            except TransportError:
                attempt += 1
                if attempt > reconnects:
                    raise
                await trio.sleep(0.2 * attempt)
                continue
            # The server closed the stream without a terminator: resume.
            attempt += 1
            if attempt > reconnects:
                raise TransportError("The job's event stream ended without a terminator.")

    async def run(
        self, operation: Op[object], *, on_created: Callable[[JobCreated], None] | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        """Submit `operation` and yield its events; cancel it if we stop early.

        Use it under `contextlib.aclosing` so that leaving the loop early
        cancels the job at once, not when the generator is collected.
        """
        created = await self.submit(operation)
        if on_created is not None:
            on_created(created)
        ended = False
        try:
            async for event in self.stream(created.job_id):
                yield event
            ended = True
        except (RbeeError, msgspec.DecodeError):
            ended = True
            raise
        finally:
            if not ended:
                with trio.CancelScope(shield=True) as scope, contextlib.suppress(RbeeError):
                    scope.deadline = trio.current_time() + 2.0
                    await self.cancel(created.job_id)


    async def call(
        self, operation: Op[T], *, on_event: Callable[[JobEvent], None] | None = None,
        on_created: Callable[[JobCreated], None] | None = None,
    ) -> T:
        """Run `operation` to its end and return its result, typed as the operation declares;
        every other event goes to `on_event` as it comes."""
        raw: msgspec.Raw | None = None
        async with contextlib.aclosing(self.run(operation, on_created=on_created)) as events:
            async for event in events:
                if isinstance(event, Result):
                    raw = event.value
                elif on_event is not None:
                    on_event(event)
        if raw is None:
            raise JobFailed(f"The {operation.name} job ended without a result.")
        try:
            return operation.decode_result(raw)
        except msgspec.ValidationError as error:
            raise JobFailed(f"The {operation.name} result does not match this rbee's wire types ({error}).",
                            hint="Run the same rbee version on every machine.") from None


def _job_error(data: str, last_error: Narration | None) -> RbeeError:
    if last_error is not None and last_error.error is not None:
        status = last_error.fields.get("status", 500)
        return error_from_body(last_error.error, status if isinstance(status, int) else 500)
    return JobFailed(data[len(ERROR_PREFIX):].strip() or "The job failed.")

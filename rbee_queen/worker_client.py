"""The queen's one client for its workers, and the one retry policy of every call to them.

`WorkerClient` streams a request's events over SSE (`httpx-sse`), makes the
JSON calls (embeddings, token counts) and cancels, each over `WorkerLanes`.
`with_retries` runs one call on workers the scheduler picks until one
answers: a worker that did not take the request (it cannot be connected to,
refuses with 503, or fails with an internal error before any token) leaves
it for another (`should_retry`). A request that a worker took (it answered
200) and then died with is never tried again: a request that crashes a
worker crashes the next one too (a hostile grammar once took three workers
and another client's stream with it), so its client gets WORKER_DIED, and
the queen's log names the request and its correlation id. A worker that
cannot be connected to, or that died, leaves the registry at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal, TypeVar

import httpx
import httpx_sse
import trio
from quart import has_app_context, has_request_context

from rbee_common.client import map_transport_errors
from rbee_common.errors import (
    ConnectFailed,
    PoolTimedOut,
    RbeeError,
    RequestTimedOut,
    TransportError,
    WorkerDied,
    WorkerFailed,
    error_from_response,
)
from rbee_common.http import correlation_id
from rbee_common.jobs import JobContext
from rbee_common.wire import DONE, InferenceEvent, WorkerRecord, inference_event_decoder
from rbee_queen.registry import WorkerRegistry

log = logging.getLogger("rbee.queen.workers")
T = TypeVar("T")

WORKER_TIMEOUT = httpx.Timeout(10.0, read=120.0)
"""Connecting to a worker; and its silence between two events (it sends one per token)."""


class WorkerLanes:
    """The queen's connections to workers: HTTP/2 with prior knowledge (workers are ours) to those
    with many slots, HTTP/1.1 to the rest (`H2_FROM_SLOTS`).

    One connection carries many streams, so 10,000 streams need 10,000 sockets
    in and about 100 out, not 20,000. httpx puts at most 100 streams on one
    connection and queues the rest behind them, so a worker with more slots
    gets more connections, "lanes", each from a client of its own; a request
    takes the first lane with room. No pool limit: the scheduler already bounds
    a worker's streams by its slots, and waiting is its queue's job.
    """

    STREAMS = 100
    H2_FROM_SLOTS = 16
    """A worker with fewer slots (a llama.cpp worker has 1 to 4) gets plain HTTP/1.1, a connection
    per stream: its streams are few, and closing one stops the worker's request at once."""

    def __init__(self) -> None:
        self._clients: list[httpx.AsyncClient] = []
        self._busy: dict[tuple[str, int], int] = {}
        self._h1 = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    @staticmethod
    def _client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30.0)
        return httpx.AsyncClient(http1=False, http2=True, limits=limits)

    @contextlib.contextmanager
    def lane(self, url: str, slots: int = 1) -> Iterator[httpx.AsyncClient]:
        if slots < self.H2_FROM_SLOTS:
            yield self._h1
            return
        index = 0
        while self._busy.get((url, index), 0) >= self.STREAMS:
            index += 1
        while index >= len(self._clients):
            self._clients.append(self._client())
        key = (url, index)
        self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield self._clients[index]
        finally:
            self._busy[key] -= 1
            if not self._busy[key]:
                del self._busy[key]

    async def __aenter__(self) -> WorkerLanes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in [self._h1, *self._clients]:
            await client.aclose()


# --- what went wrong, and whether another worker may try --------------------------------------

Failure = Literal["unreachable", "refused", "failed_early", "too_small", "died", "silent"]
"""How an attempt failed: `unreachable` (no connection), `refused` (503: no slot, loading,
draining), `failed_early` (an internal error before any token), `too_small` (the prompt does not
fit this worker's context but fits the model's), `died` (the worker ended while it held the
request), `silent` (it held the request and sent nothing for the read timeout)."""


def should_retry(failure: Failure, sent_any: bool) -> bool:
    """Whether a request that failed this way goes to another worker: only while nothing of the
    answer has reached the client, and only when the worker did not hold the request (or held it
    and said it could not do it): never after a worker died or hung holding it."""
    return not sent_any and failure in ("unreachable", "refused", "failed_early", "too_small")


class AttemptFailed(Exception):
    """One attempt on one worker failed; `error` is the client's answer if it is not retried."""

    def __init__(self, failure: Failure, why: str, error: RbeeError, *, sent_any: bool = False) -> None:
        super().__init__(why)
        self.failure, self.why, self.error, self.sent_any = failure, why, error, sent_any
        self.request_id = "-"
        """The worker's request id, where there was one (for the log)."""


def request_correlation_id(context: JobContext | None) -> str:
    """The client request's correlation id (the X-Correlation-Id it is answered with), or its job's id."""
    if context is not None:
        return context.job_id
    if has_request_context() or has_app_context():
        return correlation_id()
    return "-"


def died(worker: WorkerRecord, why: str, *, sent_any: bool, helpers: list[str] | None = None) -> WorkerDied:
    """The client's answer when the worker ended while it held the request (never retried)."""
    split = (f" Part of its layers were on hive {', '.join(helpers)}: losing a helper hive ends the worker."
             if helpers else "")
    details = {"helpers": helpers} if helpers else None
    if sent_any:
        return WorkerDied("The worker stopped in the middle of the answer." + split, details=details,
                          hint="Retry the request; the queen routes around the failed worker.")
    return WorkerDied(
        "The worker ended while it was serving this request; the request was not tried again, since "
        "a request that crashes a worker would crash the next one too." + split,
        hint="If this request is ordinary, retry it; otherwise see the worker's log on its hive.",
        details=details,
    )


# --- the client ---------------------------------------------------------------------------------


class WorkerClient:
    """Every call the queen makes to a worker: its token on each (`headers`), the lanes, the
    transport errors mapped (`map_transport_errors`), a worker's failure as `AttemptFailed`."""

    def __init__(
        self, lanes: WorkerLanes, registry: WorkerRegistry,
        headers: Callable[[WorkerRecord], dict[str, str]] = lambda worker: {},
    ) -> None:
        self.lanes, self.registry, self.headers = lanes, registry, headers

    def _lost(self, worker: WorkerRecord, error: TransportError, *, taken: bool, sent_any: bool,
              silent: str) -> AttemptFailed:
        """A transport error as an attempt's failure (the worker out of routing where it is gone);
        `silent`: what the client hears of a worker that held the request and said nothing."""
        if isinstance(error, RequestTimedOut) and taken:
            # Silent for the read timeout while it held our request: busy or hung, not gone; its
            # heartbeats decide whether it stays in routing.
            return AttemptFailed("silent", error.message, WorkerFailed(
                silent, details={"worker_id": worker.worker_id, "retry_after_s": 5},
                hint="See the worker's log on its hive."), sent_any=sent_any)
        if not isinstance(error, PoolTimedOut):  # (cannot happen with an unbounded pool)
            self.registry.forget(worker.worker_id, f"a request failed ({error.message})" if not taken
                                 else f"died holding a request ({error.message})")
        if taken:
            helpers = self.registry.helpers.get(worker.worker_id)
            return AttemptFailed("died", error.message, died(worker, error.message, sent_any=sent_any,
                                                             helpers=helpers), sent_any=sent_any)
        return AttemptFailed("unreachable", error.message, WorkerFailed(
            f"Worker {worker.worker_id} could not be reached ({error.message}).",
            details={"worker_id": worker.worker_id}))

    @contextlib.asynccontextmanager
    async def stream(
        self, worker: WorkerRecord, body: bytes, headers: dict[str, str],
    ) -> AsyncIterator[AsyncIterator[InferenceEvent]]:
        """`POST /v1/inference`: the worker's events (a refusal raised before any), ending at its
        `[DONE]`. A stream that ends without one, or breaks, is `AttemptFailed` `died`; its
        `sent_any` is the caller's to set (`AttemptFailed.sent_any`)."""
        taken = False
        try:
            with self.lanes.lane(worker.url, worker.slots_total) as http, \
                    map_transport_errors(f"worker {worker.worker_id}"):
                async with httpx_sse.aconnect_sse(
                    http, "POST", f"{worker.url}/v1/inference", content=body,
                    headers={**headers, **self.headers(worker)}, timeout=WORKER_TIMEOUT,
                ) as source:
                    response = source.response
                    if response.status_code == 503:
                        await response.aread()
                        raise AttemptFailed("refused", f"worker answered 503 {response.content[:80]!r}",
                                            error_from_response(503, response.content))
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_from_response(response.status_code, response.content)
                    taken = True
                    async with contextlib.aclosing(self._events(worker, source)) as events:
                        yield events
        except TransportError as error:
            raise self._lost(worker, error, taken=taken, sent_any=False, silent=(
                f"Worker {worker.worker_id} sent nothing for {WORKER_TIMEOUT.read:g} s.")) from error

    async def _events(
        self, worker: WorkerRecord, source: httpx_sse.EventSource,
    ) -> AsyncGenerator[InferenceEvent, None]:
        alive_at = 0.0
        async with contextlib.aclosing(source.aiter_sse()) as stream:
            async for sse in stream:
                now = trio.current_time()
                if now - alive_at > 1.0:  # data on its stream counts as a heartbeat
                    self.registry.touch(worker.worker_id)
                    alive_at = now
                if sse.data == DONE:
                    return
                yield inference_event_decoder.decode(sse.data)

    async def call(self, worker: WorkerRecord, path: str, body: bytes, what: str) -> bytes:
        """One JSON call (`/v1/embeddings`, `/v1/count-tokens`): the answer's body, or the worker's
        refusal; a failure as `AttemptFailed`."""
        try:
            with self.lanes.lane(worker.url, worker.slots_total) as http, \
                    map_transport_errors(f"worker {worker.worker_id}"):
                response = await http.post(
                    worker.url + path, content=body, timeout=WORKER_TIMEOUT,
                    headers={"Content-Type": "application/json", **self.headers(worker)})
        except TransportError as error:
            taken = not isinstance(error, ConnectFailed)
            raise self._lost(worker, error, taken=taken, sent_any=False, silent=(
                f"Worker {worker.worker_id} did not finish {what} in {WORKER_TIMEOUT.read:g} s; the work "
                "was cancelled; send a smaller request.")) from error
        if response.status_code == 503:
            raise AttemptFailed("refused", f"worker answered 503 {response.content[:80]!r}",
                                error_from_response(503, response.content))
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)
        return response.content

    async def cancel(self, worker: WorkerRecord, request_id: str) -> None:
        """Tell the worker to stop a request we no longer read. Closing an HTTP/2 stream early does
        not reach the worker (httpx sends no RST_STREAM), so the queen says it: DELETE, at most 2 s,
        even while we are being cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(2.0), \
                self.lanes.lane(worker.url, worker.slots_total) as http:
            try:
                with map_transport_errors(f"worker {worker.worker_id}"):
                    await http.delete(f"{worker.url}/v1/inference/{request_id}", headers=self.headers(worker),
                                      timeout=2.0)
            except TransportError as error:
                log.info("could not cancel request %s: %s", request_id, error.message)


# --- one retry policy -----------------------------------------------------------------------------


async def with_retries(
    acquire: Callable[[frozenset[str]], Awaitable[WorkerRecord]],
    release: Callable[[str], None],
    attempt: Callable[[WorkerRecord, int], AsyncGenerator[T, None]],
    *, attempts: int, context: JobContext | None = None,
) -> AsyncGenerator[T, None]:
    """What `attempt` yields on the first worker (`acquire`, each time without the workers that
    failed) where it does not fail; another worker only where `should_retry` says so, at most
    `attempts` in all. A worker that is too small for the prompt is not left out: `acquire` asks
    for a bigger one."""
    excluded: set[str] = set()
    failed: tuple[str, str] | None = None
    """The worker the last attempt failed on, and how."""
    for number in range(1, attempts + 1):
        try:
            worker = await acquire(frozenset(excluded))
        except RbeeError as error:
            if failed is None or error.status == 429 or error.status >= 500:
                raise  # overload keeps its status and Retry-After
            # No other worker (a cold start refused, say for want of cores): the first failure is the
            # news, not the retry's.
            raise WorkerFailed(
                f"The request failed on worker {failed[0]} before its first token ({failed[1]}), and no "
                f"other worker could take it ({error.code}: {error.message})",
                details={"worker_id": failed[0], "retry_code": error.code},
                hint="See that worker's log on its hive; the retry's error is secondary.",
            ) from error
        try:
            async with contextlib.aclosing(attempt(worker, number)) as items:
                async for item in items:
                    yield item
            return
        except AttemptFailed as failure:
            if failure.failure == "died":
                log.error("worker %s died while serving request_id=%s correlation_id=%s (%s); not retried",
                          worker.worker_id, failure.request_id, request_correlation_id(context), failure.why)
            if not should_retry(failure.failure, failure.sent_any):
                raise failure.error from None
            if failure.failure == "too_small":
                continue
            excluded.add(worker.worker_id)
            failed = (worker.worker_id, failure.why)
            log.warning("request failed on worker %s before its first token (%s); attempt %d of %d",
                        worker.worker_id, failure.why, number, attempts)
            if context is not None:
                context.narrate("retry", f"Worker {worker.worker_id} failed before the first token; retrying",
                                level="warn", worker_id=worker.worker_id)
        finally:
            release(worker.worker_id)
    raise WorkerFailed(
        f"The request failed on {attempts} worker(s) before producing a token.",
        hint="Check the workers (rbee-keeper status) and the hives' logs.",
    )

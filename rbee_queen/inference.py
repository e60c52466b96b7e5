"""Running one inference on a worker the scheduler picked, with retries.

A request that a worker did not take (it cannot be connected to, refuses
with 503, or fails with an internal error before any token) is tried on
another worker. A request that a worker took (it answered 200) and then died
with is never tried again: a request that crashes a worker crashes the next
one too (a hostile grammar once took three workers and another client's
stream with it), so its client gets WORKER_DIED, and the queen's log names
the request and its correlation id. A worker that cannot be connected to, or
that died, leaves the registry at once.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator

import httpx
import msgspec
import trio
from quart import has_app_context, has_request_context

from rbee_common import deadlines, grammar_limits
from rbee_common.client import map_transport_errors
from rbee_common.errors import (
    CLASSES_BY_CODE,
    ContextLengthExceeded,
    DeadlineExceeded,
    InternalError,
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
from rbee_common.prefixes import prompt_blocks
from rbee_common.wire import (
    DONE,
    GenerationParams,
    InferenceEnd,
    InferenceError,
    InferenceRequest,
    InferenceToken,
    WorkerRecord,
    inference_event_decoder,
)
from rbee_queen.metrics import QueenMetrics
from rbee_queen.registry import WorkerRegistry
from rbee_queen.scheduler import Scheduler

log = logging.getLogger("rbee.queen.inference")
_encode = msgspec.json.Encoder().encode



class _Retry(Exception):
    """The worker did not take the request, or failed it before any token: try another."""


class _Grow(Exception):
    """The prompt fits the model but not this worker: try one whose sequences hold `ctx` tokens."""

    def __init__(self, ctx: int, refusal: RbeeError) -> None:
        super().__init__(ctx)
        self.ctx, self.refusal = ctx, refusal


ANSWER_ROOM = 1024
"""Tokens left for the answer when a worker is started for a prompt that did not fit."""


def room_for(details: dict[str, object]) -> int | None:
    """The context of a worker that holds a prompt refused for length (a power of two, up to the
    model's own), or None when the model's own context does not hold it either."""
    prompt, ctx, trained = (details.get(k) for k in ("prompt_tokens", "context_tokens",
                                                     "model_context_tokens"))
    if not (isinstance(prompt, int) and isinstance(ctx, int) and isinstance(trained, int)):
        return None
    if prompt >= trained:
        return None
    wanted = min(1 << (prompt + ANSWER_ROOM - 1).bit_length(), trained)
    return wanted if wanted > ctx else None


def _died(
    worker: WorkerRecord, request_id: str, sent_any: bool, why: str, context: JobContext | None,
    helpers: list[str] | None = None,
) -> WorkerDied:
    """The worker ended while it held this request: logged with the request's ids, never retried."""
    log.error("worker %s died while serving request_id=%s correlation_id=%s (%s); not retried",
              worker.worker_id, request_id, _correlation_id(context), why)
    split = (f" Part of its layers were on hive {', '.join(helpers)}: losing a helper hive ends the worker."
             if helpers else "")
    if sent_any:
        return WorkerDied("The worker stopped in the middle of the answer." + split,
                          hint="Retry the request; the queen routes around the failed worker.",
                          details={"helpers": helpers} if helpers else None)
    return WorkerDied(
        "The worker ended while it was serving this request; the request was not tried again, since "
        "a request that crashes a worker would crash the next one too." + split,
        hint="If this request is ordinary, retry it; otherwise see the worker's log on its hive.",
        details={"helpers": helpers} if helpers else None,
    )


def _correlation_id(context: JobContext | None) -> str:
    """The client request's correlation id (the X-Correlation-Id it is answered with), or its job's id."""
    if context is not None:
        return context.job_id
    if has_request_context() or has_app_context():
        return correlation_id()
    return "-"


class Served(msgspec.Struct, kw_only=True):
    """What a finished request reports."""

    worker_id: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    stop_reason: str = "stop"
    stop_sequence: str | None = None
    attempts: int = 0


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


WORKER_TIMEOUT = httpx.Timeout(10.0, read=120.0)
"""Connecting to a worker; and its silence between two events (it sends one per token)."""


async def _cancel_on_worker(
    lanes: WorkerLanes, worker: WorkerRecord, request_id: str, headers: dict[str, str],
) -> None:
    """Tell the worker to stop a request we no longer read. Closing an HTTP/2 stream early does
    not reach the worker (httpx sends no RST_STREAM), so the queen says it: DELETE, at most 2 s,
    even while we are being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0), \
            lanes.lane(worker.url, worker.slots_total) as http:
        try:
            with map_transport_errors(f"worker {worker.worker_id}"):
                await http.delete(f"{worker.url}/v1/inference/{request_id}", headers=headers, timeout=2.0)
        except TransportError as error:
            log.info("could not cancel request %s: %s", request_id, error.message)


async def generate(
    scheduler: Scheduler, registry: WorkerRegistry, lanes: WorkerLanes, model: str,
    params: GenerationParams, *, attempts: int, context: JobContext | None = None,
    served: Served | None = None, hive_id: str | None = None,
    headers: Callable[[WorkerRecord], dict[str, str]] = lambda worker: {},
    deadline: str | None = None, metrics: QueenMetrics | None = None,
) -> AsyncGenerator[InferenceToken, None]:
    """Text pieces (with their logprobs, when asked) as the worker streams them; `served` is
    filled in at the end.

    `deadline` (an X-Request-Deadline value) goes to the worker unchanged, and to
    the hive with a cold start's spawn job; the worker stops at it. The caller
    bounds its waits for pieces by it (a cancel scope cannot live in here: this
    generator yields).
    """
    grammar_limits.check_params(params)  # a 400 before any worker is chosen or started
    served = served if served is not None else Served()
    token = deadlines.current.set(deadline)  # a cold start's spawn job on the hive inherits it
    started = trio.current_time()
    first: float | None = None
    outcome = "failed"
    try:
        async with contextlib.aclosing(_attempts(
            scheduler, registry, lanes, model, params, attempts=attempts, context=context, served=served,
            hive_id=hive_id, headers=headers, deadline=deadline,
        )) as pieces:
            async for piece in pieces:
                if first is None:
                    first = trio.current_time()
                    if metrics is not None:
                        metrics.ttft.labels(model).observe(first - started)
                yield piece
        outcome = "completed"
    except (GeneratorExit, trio.Cancelled):
        outcome = "cancelled"  # the client left, or its deadline passed
        raise
    finally:
        deadlines.current.reset(token)
        if metrics is not None:
            if served.attempts > 1:
                metrics.retries.labels(model).inc(served.attempts - 1)
            metrics.served(model, served.worker_id, outcome, tokens_in=served.tokens_in,
                           tokens_out=served.tokens_out,
                           generating_s=None if first is None else trio.current_time() - first)


async def _attempts(
    scheduler: Scheduler, registry: WorkerRegistry, lanes: WorkerLanes, model: str,
    params: GenerationParams, *, attempts: int, context: JobContext | None, served: Served,
    hive_id: str | None, headers: Callable[[WorkerRecord], dict[str, str]], deadline: str | None,
) -> AsyncGenerator[InferenceToken, None]:
    request = InferenceRequest(**{f: getattr(params, f) for f in GenerationParams.__struct_fields__})
    blocks = prompt_blocks(params)
    hop = {"Content-Type": "application/json", **({deadlines.HEADER: deadline} if deadline else {})}
    excluded: set[str] = set()
    failed: tuple[str, str] | None = None
    """The worker the last attempt failed on, and how."""
    min_ctx = 0
    """Sequences the request needs, once a worker refused its prompt for length (`_Grow`)."""
    too_long: RbeeError | None = None
    """That refusal: the answer when no worker with room can be had."""
    for attempt in range(1, attempts + 1):
        try:
            worker = await scheduler.acquire(model, context, frozenset(excluded), hive_id, min_ctx=min_ctx,
                                             blocks=blocks, session=params.session)
        except RbeeError as error:
            if too_long is not None:  # no worker with room could start (cores, memory): say why
                log.info("no worker with a context of %d could be had (%s)", min_ctx, error.code)
                too_long.details.setdefault(
                    "hint", f"A worker with room for it could not be started ({error.message}) Stop "
                            "an idle worker, or shorten the prompt.")
                raise too_long from None
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
        served.worker_id, served.attempts = worker.worker_id, attempt
        request_id = f"req-{uuid.uuid4()}"
        body = _encode(msgspec.structs.replace(request, request_id=request_id))
        sent_any = False
        taken = False
        """The worker answered 200: it holds the request (and may die of it)."""
        running = False
        """The worker is generating for us and has not said it stopped."""
        alive_at = 0.0
        try:
            with lanes.lane(worker.url, worker.slots_total) as http, \
                    map_transport_errors(f"worker {worker.worker_id}"):
                async with http.stream(
                    "POST", f"{worker.url}/v1/inference", content=body, headers={**hop, **headers(worker)},
                    timeout=WORKER_TIMEOUT,
                ) as response:
                    if response.status_code == 503:
                        await response.aread()
                        raise _Retry(f"worker answered 503 {response.content[:80]!r}")
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_from_response(response.status_code, response.content)
                    ended = False
                    running = taken = True
                    async for line in response.aiter_lines():
                        now = trio.current_time()
                        if now - alive_at > 1.0:  # data on its stream counts as a heartbeat
                            registry.touch(worker.worker_id)
                            alive_at = now
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == DONE:
                            running = False
                            break
                        event = inference_event_decoder.decode(data)
                        if isinstance(event, InferenceToken):
                            sent_any = True
                            yield event
                        elif isinstance(event, InferenceEnd):
                            ended, running = True, False
                            served.tokens_in, served.tokens_out = event.tokens_in, event.tokens_out
                            served.tokens_cached = event.tokens_cached
                            served.stop_reason = event.stop_reason
                            served.stop_sequence = event.stop_sequence
                        elif isinstance(event, InferenceError):
                            running = False
                            if event.code == DeadlineExceeded.code and deadline is not None:
                                raise deadlines.exceeded(deadline)
                            if event.code == InternalError.code and not sent_any:
                                raise _Retry(event.message)
                            if event.code == ContextLengthExceeded.code and not sent_any:
                                grown = room_for(event.details)
                                if grown is not None:
                                    raise _Grow(grown, ContextLengthExceeded(
                                        event.message, details=dict(event.details)))
                                trained = event.details.get("model_context_tokens")
                                if isinstance(trained, int):  # say the model's limit, not this worker's
                                    event = msgspec.structs.replace(
                                        event, details={**event.details, "context_tokens": trained})
                            refused = CLASSES_BY_CODE.get(event.code)
                            if refused is not None and refused.status < 500:  # the request's fault
                                raise refused(event.message, details=event.details)
                            raise WorkerFailed(event.message, details={"worker_code": event.code})
                    running = False  # the worker ended the stream itself
                    if not ended:
                        registry.forget(worker.worker_id, "its stream ended without an end event")
                        raise _died(worker, request_id, sent_any, "its stream ended without an end event",
                                    context, registry.helpers.get(worker.worker_id))
                    return
        except TransportError as error:
            failure = error.message
            if isinstance(error, RequestTimedOut) and taken:
                # Silent for WORKER_TIMEOUT's read time while it held our request: busy or hung,
                # not gone; its heartbeats decide whether it stays in routing.
                raise WorkerFailed(f"Worker {worker.worker_id} sent nothing for "
                                   f"{WORKER_TIMEOUT.read:g} s.", details={"worker_id": worker.worker_id},
                                   hint="See the worker's log on its hive.") from error
            if not isinstance(error, PoolTimedOut):  # (cannot happen with an unbounded pool)
                # Out of routing until its next heartbeat says it lives.
                registry.forget(worker.worker_id, failure)
            if taken:
                raise _died(worker, request_id, sent_any, failure, context,
                            registry.helpers.get(worker.worker_id)) from error
        except _Retry as retry:
            failure = str(retry)
        except _Grow as grow:
            log.info("the prompt does not fit worker %s; trying one with a context of %d", worker.worker_id,
                     grow.ctx)
            min_ctx, too_long = grow.ctx, grow.refusal
            continue
        finally:
            if running:  # we stopped listening (the client left, a deadline, an error): so must it
                await _cancel_on_worker(lanes, worker, request_id, headers(worker))
            scheduler.release(worker.worker_id)
        excluded.add(worker.worker_id)
        failed = (worker.worker_id, failure)
        log.warning("request failed on worker %s before its first token (%s); attempt %d of %d",
                    worker.worker_id, failure, attempt, attempts)
        if context is not None:
            context.narrate("retry", f"Worker {worker.worker_id} failed before the first token; retrying",
                            level="warn", worker_id=worker.worker_id)
    raise WorkerFailed(
        f"The request failed on {attempts} worker(s) before producing a token.",
        hint="Check the workers (rbee-keeper status) and the hives' logs.",
    )

"""Running one inference on a worker the scheduler picked, with the retries of
`worker_client.with_retries` (another worker only while none held the request,
or one said it could not do it before any token)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator

import msgspec
import trio

from rbee_common import deadlines, grammar_limits
from rbee_common.errors import (
    CLASSES_BY_CODE,
    ContextLengthExceeded,
    DeadlineExceeded,
    InternalError,
    RbeeError,
    WorkerFailed,
)
from rbee_common.jobs import JobContext
from rbee_common.prefixes import prompt_blocks
from rbee_common.validation import convert_checked
from rbee_common.wire import (
    GenerationParams,
    InferenceEnd,
    InferenceError,
    InferenceRequest,
    InferenceToken,
    WorkerRecord,
    check_tools,
)
from rbee_queen.metrics import QueenMetrics
from rbee_queen.scheduler import Scheduler
from rbee_queen.worker_client import AttemptFailed, WorkerClient, died, with_retries

log = logging.getLogger("rbee.queen.inference")
_encode = msgspec.json.Encoder().encode


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


class Served(msgspec.Struct, kw_only=True):
    """What a finished request reports."""

    worker_id: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    stop_reason: str = "stop"
    stop_sequence: str | None = None
    attempts: int = 0


async def generate(
    scheduler: Scheduler, client: WorkerClient, model: str, params: GenerationParams, *, attempts: int,
    context: JobContext | None = None, served: Served | None = None, hive_id: str | None = None,
    deadline: str | None = None, metrics: QueenMetrics | None = None,
) -> AsyncGenerator[InferenceToken, None]:
    """Text pieces (with their logprobs, when asked) as the worker streams them; `served` is
    filled in at the end.

    `deadline` (an X-Request-Deadline value) goes to the worker unchanged, and to
    the hive with a cold start's spawn job; the worker stops at it. The caller
    bounds its waits for pieces by it (a cancel scope cannot live in here: this
    generator yields).
    """
    request = convert_checked(params, InferenceRequest)  # a 400 before any worker is chosen or started
    check_tools(request)
    grammar_limits.check_params(request)
    served = served if served is not None else Served()
    token = deadlines.current.set(deadline)  # a cold start's spawn job on the hive inherits it
    started = trio.current_time()
    first: float | None = None
    outcome = "failed"
    try:
        async with contextlib.aclosing(_attempts(
            scheduler, client, model, request, attempts=attempts, context=context, served=served,
            hive_id=hive_id, deadline=deadline,
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
    scheduler: Scheduler, client: WorkerClient, model: str, params: InferenceRequest, *, attempts: int,
    context: JobContext | None, served: Served, hive_id: str | None, deadline: str | None,
) -> AsyncGenerator[InferenceToken, None]:
    blocks = prompt_blocks(params)
    hop = {"Content-Type": "application/json", **({deadlines.HEADER: deadline} if deadline else {})}
    min_ctx = 0
    """Sequences the request needs, once a worker refused its prompt for length."""
    too_long: RbeeError | None = None
    """That refusal: the answer when no worker with room can be had."""

    async def acquire(excluded: frozenset[str]) -> WorkerRecord:
        try:
            return await scheduler.acquire(model, context, excluded, hive_id, min_ctx=min_ctx, blocks=blocks,
                                           session=params.session)
        except RbeeError as error:
            if too_long is None:
                raise
            log.info("no worker with a context of %d could be had (%s)", min_ctx, error.code)
            too_long.details.setdefault(  # no worker with room could start (cores, memory): say why
                "hint", f"A worker with room for it could not be started ({error.message}) Stop "
                        "an idle worker, or shorten the prompt.")
            raise too_long from None

    async def attempt(worker: WorkerRecord, number: int) -> AsyncGenerator[InferenceToken, None]:
        nonlocal min_ctx, too_long
        served.worker_id, served.attempts = worker.worker_id, number
        request_id = f"req-{uuid.uuid4()}"
        body = _encode(msgspec.structs.replace(params, request_id=request_id))
        sent_any = False
        running = False
        """The worker is generating for us and has not said it stopped."""
        try:
            async with client.stream(worker, body, hop) as events:
                running = True
                ended = False
                async for event in events:
                    if isinstance(event, InferenceToken):
                        sent_any = True
                        yield event
                    elif isinstance(event, InferenceEnd):
                        ended, running = True, False
                        served.tokens_in, served.tokens_out = event.tokens_in, event.tokens_out
                        served.tokens_cached = event.tokens_cached
                        served.stop_reason, served.stop_sequence = event.stop_reason, event.stop_sequence
                    elif isinstance(event, InferenceError):
                        running = False
                        grown = _refusal(event, sent_any, deadline)
                        if grown is not None:
                            log.info("the prompt does not fit worker %s; trying one with a context of %d",
                                     worker.worker_id, grown[0])
                            min_ctx, too_long = grown
                            raise AttemptFailed("too_small", event.message, grown[1])
                running = False  # the worker ended the stream itself
                if not ended:
                    why = "its stream ended without an end event"
                    client.registry.forget(worker.worker_id, why)
                    raise AttemptFailed("died", why, WorkerFailed(why))
        except AttemptFailed as failure:
            failure.sent_any = failure.sent_any or sent_any
            failure.request_id = request_id
            if failure.failure == "died":  # what the client hears depends on what it had
                failure.error = died(worker, failure.why, sent_any=sent_any,
                                     helpers=client.registry.helpers.get(worker.worker_id))
            raise
        finally:
            if running:  # we stopped listening (the client left, a deadline, an error): so must it
                await client.cancel(worker, request_id)

    async with contextlib.aclosing(with_retries(acquire, scheduler.release, attempt, attempts=attempts,
                                                context=context)) as pieces:
        async for piece in pieces:
            yield piece


def _refusal(
    event: InferenceError, sent_any: bool, deadline: str | None,
) -> tuple[int, RbeeError] | None:
    """A worker's error event as the client's error (raised), or, for a prompt too long for this
    worker but not for the model, the context a worker needs and the refusal to give if none can
    be had."""
    if event.code == DeadlineExceeded.code and deadline is not None:
        raise deadlines.exceeded(deadline)
    if event.code == InternalError.code and not sent_any:
        raise AttemptFailed("failed_early", event.message, WorkerFailed(event.message))
    if event.code == ContextLengthExceeded.code and not sent_any:
        grown = room_for(event.details)
        if grown is not None:
            return grown, ContextLengthExceeded(event.message, details=dict(event.details))
        trained = event.details.get("model_context_tokens")
        if isinstance(trained, int):  # say the model's limit, not this worker's
            event = msgspec.structs.replace(event, details={**event.details, "context_tokens": trained})
    refused = CLASSES_BY_CODE.get(event.code)
    if refused is not None and refused.status < 500:  # the request's fault
        raise refused(event.message, details=event.details)
    raise WorkerFailed(event.message, details={"worker_code": event.code})

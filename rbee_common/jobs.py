"""The job server shared by the queen and the hive (DESIGN §2).

A client submits an operation and gets `job-<uuid4>` back at once; the job runs
in the daemon's nursery and writes events into a bounded buffer. Any number of
streams replay that buffer and follow it, each resuming after `Last-Event-ID`.
Every job ends with one terminator, and finished jobs are kept for a while.

    JobServer ── submit(op) ──▶ Job ── events ──▶ stream(s)
        │                        ▲
        └── nursery task: handler(op, JobContext) writes narration/progress/
            token events; its return value becomes the `result` event.

The HTTP routes live in `add_job_routes`, so every daemon serves the same API.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.auth import request_identity
from rbee_common.errors import (
    ErrorBody,
    InternalError,
    JobNotFound,
    RbeeError,
    ShuttingDown,
    TooManyRequests,
    ValidationFailed,
    first_leaf,
)
from rbee_common.http import json_response, read_body, serve_app, sse_frame, sse_response
from rbee_common.metrics import Metrics
from rbee_common.validation import decode_body
from rbee_common.wire import (
    CANCELLED,
    DONE,
    ERROR_PREFIX,
    OPERATION_NAMES,
    Infer,
    JobCreated,
    JobEvent,
    JobInfo,
    JobState,
    Narration,
    Op,
    Operation,
    Progress,
    Result,
    Token,
    operation_decoder,
)

log = logging.getLogger("rbee.jobs")

_JOB_ID = re.compile(r"^job-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
_encoder = msgspec.json.Encoder()

KEEPALIVE_S = 15.0


class JobLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_live_jobs: int = 64
    max_finished_jobs: int = 1000
    retention_s: float = 600.0
    large_job_bytes: int = 1 << 20
    """A finished job whose events hold more than this (an `embed` job's vectors) is kept only
    `large_retention_s`, long enough for its streams to read it: not its full retention."""
    large_retention_s: float = 30.0
    event_buffer: int = 10_000
    max_streams_per_job: int = 32
    """Open SSE streams on one job; more get 429 with Retry-After."""
    max_streams: int = 4096
    """Open SSE streams on the whole daemon (each holds a socket); more get 429."""


class Job:
    """One submitted operation, its state and its buffered events."""

    def __init__(
        self, operation: Op[object], *, buffer: int, actor: str = "internal", deadline: str | None = None,
    ) -> None:
        self.id = f"job-{uuid.uuid4()}"
        self.deadline = deadline
        """X-Request-Deadline it was submitted with: past it, the job fails with REQUEST_TIMEOUT."""
        self.operation = operation
        self.actor = actor
        """Who submitted it (a token fingerprint): for the audit log."""
        self.result: object = None
        """The handler's return value, once checked against the operation's result type."""
        self.state: JobState = "queued"
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.error: ErrorBody | None = None
        self.cancel_scope = trio.CancelScope()
        self._events: deque[tuple[int, str]] = deque(maxlen=max(buffer, 2))
        self.streams = 0
        """SSE streams open on it."""
        self._next_seq = 0
        self.bytes = 0
        """What its events hold, all together (for `JobLimits.large_job_bytes`)."""
        self._changed = trio.Event()
        self.done = trio.Event()

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def info(self) -> JobInfo:
        return JobInfo(
            job_id=self.id,
            operation=self.operation.name,
            state=self.state,
            created_at=self.created_at,
            finished_at=self.finished_at,
            events=self._next_seq,
            error=self.error,
        )

    def _append(self, data: str) -> None:
        self._events.append((self._next_seq, data))
        self.bytes += len(data)
        self._next_seq += 1
        self._changed.set()
        self._changed = trio.Event()

    def emit(self, event: JobEvent) -> None:
        if self.finished:
            return
        self._append(_encoder.encode(event).decode())

    def finish(self, state: Literal["completed", "failed", "cancelled"], terminator: str) -> None:
        if self.finished:
            return
        self.state = state
        self._append(terminator)
        self.finished_at = time.time()
        self.done.set()

    async def follow(self, after: int | None = None) -> AsyncIterator[tuple[int | None, str]]:
        """Replay the buffer after event `after`, then follow until the end.

        Yields `(None, "")` as a keep-alive when nothing happened for a while.
        """
        next_seq = 0 if after is None else after + 1
        while True:
            changed = self._changed
            oldest = self._events[0][0] if self._events else self._next_seq
            next_seq = max(next_seq, oldest)  # events dropped from a full buffer are gone
            # Sequence numbers are consecutive: event `seq` sits at `seq - oldest`, so a follower
            # reads what is new by position, never rescanning the buffer.
            while next_seq < self._next_seq:
                oldest = self._events[0][0]
                if next_seq < oldest:  # dropped while we were sending
                    next_seq = oldest
                seq, data = self._events[next_seq - oldest]
                yield seq, data
                next_seq = seq + 1
            if self.finished and next_seq >= self._next_seq:
                return
            with trio.move_on_after(KEEPALIVE_S) as idle:
                await changed.wait()
            if idle.cancelled_caught:
                yield None, ""


class JobContext:
    """What a running operation uses to talk to its job's streams."""

    def __init__(self, job: Job, actor: str) -> None:
        self._job = job
        self.actor = actor

    @property
    def job_id(self) -> str:
        return self._job.id

    def narrate(
        self, action: str, human: str, *, level: Literal["debug", "info", "warn", "error"] = "info",
        actor: str | None = None, **fields: Any,
    ) -> None:
        self._job.emit(
            Narration(
                job_id=self._job.id, actor=actor or self.actor, action=action, human=human,
                level=level, fields=fields,
            )
        )

    def progress(
        self, what: str, done: int, total: int | None = None, *, unit: str = "bytes",
        rate: float | None = None,
    ) -> None:
        self._job.emit(
            Progress(job_id=self._job.id, what=what, done=done, total=total, unit=unit, rate=rate)
        )

    def token(self, text: str, index: int) -> None:
        self._job.emit(Token(job_id=self._job.id, t=text, i=index))

    def emit(self, event: JobEvent) -> None:
        """Relay an event from elsewhere (a hive's job) into this job."""
        self._job.emit(msgspec.structs.replace(event, job_id=self._job.id))


def detached_context(operation: Op[object], actor: str) -> JobContext:
    """A context for work that no job follows (an OpenAI request's cold start):
    its events are kept in a buffer of two and then dropped."""
    return JobContext(Job(operation, buffer=2), actor)


Handler = Callable[[Op[object], JobContext], Awaitable[object]]


class JobServer:
    def __init__(
        self, nursery: trio.Nursery, handler: Handler, *, actor: str, limits: JobLimits
    ) -> None:
        self._nursery = nursery
        self._handler = handler
        self._actor = actor
        self.limits = limits
        self._jobs: dict[str, Job] = {}
        self._stopping = False
        self.streams = 0
        """Open SSE streams on this daemon's jobs."""
        self.default_deadline_s: float | None = None
        """The deadline an `infer` job gets when its client gave none (the queen's setting)."""
        self.on_finish: Callable[[Job], None] | None = None
        """Called when a job ends (the audit log)."""
        self.metrics: Metrics | None = None
        """Counts finished jobs by operation and outcome."""

    def live_jobs(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.finished]

    def recent(self, limit: int = 50) -> list[Job]:
        """The jobs it holds, newest first (running and finished ones still kept)."""
        return sorted(self._jobs.values(), key=lambda job: job.created_at, reverse=True)[:limit]

    def submit(self, operation: Op[object], *, actor: str = "internal", deadline: str | None = None) -> Job:
        if self._stopping:
            raise ShuttingDown("This server is shutting down and takes no new jobs.")
        if len(self.live_jobs()) >= self.limits.max_live_jobs:
            raise TooManyRequests(
                f"Too many jobs running (limit {self.limits.max_live_jobs}).",
                retry_after_s=1,
                hint="Retry shortly, or raise max_live_jobs in the config.",
            )
        job = Job(operation, buffer=self.limits.event_buffer, actor=actor, deadline=deadline)
        self._jobs[job.id] = job
        self._nursery.start_soon(self._run, job, name=job.id)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None:
            raise JobNotFound(
                "No job with that id. Finished jobs are kept for "
                f"{self.limits.retention_s:g} s.",
            )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel_scope.cancel()
        if job.state == "queued":
            job.finish("cancelled", CANCELLED)
        return job

    def check_stream_room(self, job: Job) -> None:
        """429 when `job`, or this daemon, has as many SSE subscribers as it takes."""
        if job.streams >= self.limits.max_streams_per_job or self.streams >= self.limits.max_streams:
            per_job = job.streams >= self.limits.max_streams_per_job
            raise TooManyRequests(
                "Too many streams are open on this job." if per_job else "Too many streams are open.",
                retry_after_s=1, hint="Close a stream you no longer read, then retry.",
                details={"limit": self.limits.max_streams_per_job if per_job else self.limits.max_streams},
            )

    @contextlib.contextmanager
    def stream_slot(self, job: Job) -> Iterator[None]:
        """Count one SSE subscriber of `job` while it streams."""
        job.streams += 1
        self.streams += 1
        try:
            yield
        finally:
            job.streams -= 1
            self.streams -= 1

    async def _run(self, job: Job) -> None:
        context = JobContext(job, self._actor)
        started = time.monotonic()
        deadlines.current.set(job.deadline)  # this task's hops (a hive's spawn job) carry it on
        job.cancel_scope.deadline = deadlines.trio_deadline(job.deadline)
        with job.cancel_scope:
            job.state = "running"
            try:
                value = await self._handler(job.operation, context)
            except RbeeError as error:
                self._fail(job, context, error)
            except Exception as error:
                leaf = first_leaf(error)  # nurseries wrap errors in groups: report the rbee error inside
                if isinstance(leaf, RbeeError):
                    self._fail(job, context, leaf)
                else:
                    log.error("job %s (%s) crashed", job.id, job.operation.name, exc_info=error)
                    failed = f"Operation {job.operation.name} failed unexpectedly; see the server log."
                    self._fail(job, context, InternalError(failed))
            else:
                try:  # the result as the operation declares it (`wire.py`): anything else is our bug
                    job.result = job.operation.check_result(value)
                except msgspec.ValidationError as error:
                    log.error("job %s (%s) returned no %s: %s", job.id, job.operation.name,
                              job.operation.result_type(), error)
                    failed = f"Operation {job.operation.name} answered wrongly; see the server log."
                    self._fail(job, context, InternalError(failed))
                else:
                    job.emit(Result(job_id=job.id, value=msgspec.Raw(_encoder.encode(job.result))))
                    job.finish("completed", DONE)
        if not job.finished and job.deadline is not None and trio.current_time() >= job.cancel_scope.deadline:
            log.warning("job %s (%s): request timeout, its deadline %s passed",
                        job.id, job.operation.name, job.deadline)
            self._fail(job, context, deadlines.exceeded(job.deadline))
        if not job.finished:  # the cancel scope caught a cancellation
            job.finish("cancelled", CANCELLED)
        if self.on_finish is not None:
            self.on_finish(job)
        if self.metrics is not None:
            self.metrics.job_finished(job.operation.name, job.state)
        job.result = None  # the result event has it; the job is kept a while, its value need not be
        log.info(
            "job %s operation=%s state=%s took_ms=%.1f",
            job.id, job.operation.name, job.state, (time.monotonic() - started) * 1000,
        )

    @staticmethod
    def _fail(job: Job, context: JobContext, error: RbeeError) -> None:
        cid = error.correlation_id or str(uuid.uuid4())
        log.warning("job %s (%s) failed code=%s correlation_id=%s",
                    job.id, job.operation.name, error.code, cid)
        body = error.to_body(cid)
        job.error = body
        job.emit(
            Narration(
                job_id=job.id, actor=context.actor, action="job_failed", human=error.message,
                level="error", error=body, fields={"status": error.status},
            )
        )
        job.finish("failed", f"{ERROR_PREFIX} {error.message}")

    async def shutdown(self) -> None:
        """Refuse new jobs, cancel live ones, and wait (briefly) until they end."""
        self._stopping = True
        for job in self.live_jobs():
            job.cancel_scope.cancel()
        with trio.move_on_after(2.0):
            for job in self.live_jobs():
                await job.done.wait()
        for job in self.live_jobs():  # a handler that would not stop in time
            job.finish("cancelled", CANCELLED)

    def sweep(self, now: float | None = None) -> int:
        """Drop finished jobs past retention, and the oldest past the bound."""
        now = time.time() if now is None else now
        finished = sorted(
            (job for job in self._jobs.values() if job.finished_at is not None),
            key=lambda job: job.finished_at or 0.0,
        )
        excess = max(0, len(finished) - self.limits.max_finished_jobs)
        dropped = 0
        for index, job in enumerate(finished):
            large = job.bytes > self.limits.large_job_bytes
            retention = min(self.limits.retention_s, self.limits.large_retention_s) if large else \
                self.limits.retention_s
            expired = job.finished_at is not None and now - job.finished_at > retention
            if index < excess or expired:
                del self._jobs[job.id]
                dropped += 1
        return dropped

    async def sweep_forever(self) -> None:
        shortest = min(self.limits.retention_s, self.limits.large_retention_s)
        interval = min(30.0, max(0.05, shortest / 4))
        while True:
            await trio.sleep(interval)
            self.sweep()

    async def serve(
        self,
        app: QuartTrio,
        *,
        host: str,
        port: int,
        stop: trio.Event,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve `app` until `stop`; then end every job, and HTTP after them.

        Jobs end first, so open streams get their terminator before hypercorn
        starts its graceful close. When HTTP is down, the job nursery is
        cancelled too (its loops would otherwise run forever).
        """

        async def shutdown_trigger() -> None:
            await stop.wait()
            await self.shutdown()

        async with trio.open_nursery() as loops:

            async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_app(
                    app, host=host, port=port, shutdown_trigger=shutdown_trigger,
                    task_status=task_status,
                )
                loops.cancel_scope.cancel()

            urls = await loops.start(run_http)
            loops.start_soon(self.sweep_forever)
            task_status.started(urls)
        self._nursery.cancel_scope.cancel()


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²" is a digit to str.isdigit
        raise ValidationFailed(
            "Last-Event-ID must be the numeric id of an event of this stream.",
            details={"field": "Last-Event-ID"},
        )
    return int(raw)


def decode_operation(body: bytes) -> Operation:
    try:
        operation: Operation = decode_body(body, operation_decoder)
    except ValidationFailed as error:
        if error.details.get("field") == "operation":
            raise ValidationFailed(
                "Unknown or missing `operation`.",
                details={"field": "operation", "expected": list(OPERATION_NAMES)},
                hint="Use one of the operations listed in details.expected.",
            ) from None
        raise
    return operation


def add_job_routes(app: QuartTrio, jobs: JobServer) -> None:
    @app.post("/v1/jobs")
    async def submit_job() -> Response:
        operation = decode_operation(await read_body())
        # An inference job without a deadline gets the daemon's default one; other jobs get none.
        default = jobs.default_deadline_s if isinstance(operation, Infer) else None
        deadline = deadlines.from_headers(request.headers, default_s=default)
        job = jobs.submit(operation, actor=request_identity(), deadline=deadline)
        created = JobCreated(job_id=job.id, sse_url=f"/v1/jobs/{job.id}/stream")
        return json_response(created, status=201)

    @app.get("/v1/jobs")
    async def job_list() -> Response:
        """The 50 newest jobs (the web UI's live jobs): states only, never their results."""
        return json_response([job.info() for job in jobs.recent()])

    @app.get("/v1/jobs/<job_id>")
    async def job_status(job_id: str) -> Response:
        return json_response(jobs.get(job_id).info())

    @app.delete("/v1/jobs/<job_id>")
    async def job_cancel(job_id: str) -> Response:
        return json_response(jobs.cancel(job_id).info(), status=202)

    @app.get("/v1/jobs/<job_id>/stream")
    async def job_stream(job_id: str) -> Response:
        job = jobs.get(job_id)
        after = _last_event_id()
        jobs.check_stream_room(job)  # a 429 before the 200

        async def frames() -> AsyncIterator[bytes]:
            with jobs.stream_slot(job):
                async for seq, data in job.follow(after):
                    yield b": keep-alive\n\n" if seq is None else sse_frame(seq, data)

        return sse_response(frames())


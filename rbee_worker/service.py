"""The worker's state and inference, without HTTP.

Requests take a slot or are refused (503 ALL_SLOTS_BUSY). Generation runs in
the backend's thread (one engine thread serves every slot); its pieces cross
into trio without ever blocking that thread, into the request's unbounded
memory channel that the HTTP stream reads (bounded in fact by max_tokens): a
slow client holds back its own stream, never the other sequences. Cancelling
a request (DELETE, client gone, drain deadline) sets a flag the engine checks
at every step.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid

import msgspec
import trio

from rbee_common import deadlines, grammar_limits
from rbee_common.errors import (
    AllSlotsBusy,
    DeadlineExceeded,
    InternalError,
    RbeeError,
    ServiceUnavailable,
    ValidationFailed,
    WorkerDraining,
    WorkerLoading,
)
from rbee_common.wire import (
    EmbedRequest,
    EmbedResult,
    InferenceEnd,
    InferenceError,
    InferenceEvent,
    InferenceRequest,
    InferenceStarted,
    InferenceToken,
    TokenLogprob,
    WorkerHeartbeat,
    WorkerState,
    check_embed_inputs,
    check_tools,
)
from rbee_worker.backends.base import Backend, Generated, Output
from rbee_worker.config import WorkerConfig
from rbee_worker.metrics import WorkerMetrics

log = logging.getLogger("rbee.worker")



class ActiveRequest:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = threading.Event()
        """Checked by the generation thread between tokens."""
        self.woken = trio.Event()
        """The same, for trio code that waits (the synthetic backend between its tokens)."""
        self.done = trio.Event()

    def cancel(self) -> None:
        """Stop it (from trio; a generation thread sets `cancelled` alone)."""
        self.cancelled.set()
        self.woken.set()


def validate(request: InferenceRequest, ctx: int) -> None:
    """What the request's decode cannot check: a prompt, the tools' rules, the grammar's limits."""
    def bad(field: str, message: str) -> ValidationFailed:
        return ValidationFailed(message, details={"field": field})

    if request.messages is None and not request.prompt:
        raise bad("prompt", "Give a non-empty `prompt` or `messages`.")
    if request.messages is not None and not request.messages:
        raise bad("messages", "`messages` must not be empty.")
    # The ranges (max_tokens, temperature, top_p, ..., logit_bias) are GenerationParams' own: the
    # request's decode checked them.
    check_tools(request)
    grammar_limits.check_params(request)


def asked_features(request: InferenceRequest) -> list[str]:
    """Which of the backends' optional features (`backends.FEATURES`) this request needs."""
    asked = []
    if request.response_format is not None and request.response_format.type != "text":
        asked.append("response_format")
    if request.tools or any(m.tool_calls or m.role == "tool" for m in request.messages or []):
        asked.append("tools")
    if request.logprobs is not None:
        asked.append("logprobs")
    if request.logit_bias:
        asked.append("logit_bias")
    return asked


class WorkerService:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.backend: Backend | None = None
        self.draining = False
        self.state_changed = trio.Event()
        """Set on loaded and on draining, so a heartbeat goes out at once."""
        self.drain_s = config.drain_s
        self.url = ""
        self.active: dict[str, ActiveRequest] = {}
        self.last_request_end = time.monotonic()
        self._threads = trio.CapacityLimiter(max(config.slots, 1))
        """One waiting thread per running request (trio's default of 40 would cap the slots)."""
        self._embedder = trio.CapacityLimiter(1)
        self.recent: collections.deque[str] = collections.deque(maxlen=1024)
        """Ids of requests that ended, so a repeated DELETE stays a 204."""
        self.metrics = WorkerMetrics(config.served_name)
        self.metrics.watch(lambda: (len(self.active), self.config.slots, self.state))
        self.metrics.watch_cache(lambda: getattr(self.backend, "prompt_cache", None))

    @property
    def state(self) -> WorkerState:
        if self.draining:
            return "draining"
        if self.backend is None:
            return "loading"
        return "busy" if len(self.active) >= self.config.slots else "ready"

    @property
    def idle_s(self) -> float:
        """Seconds without any request running (0 while one runs)."""
        return 0.0 if self.active else round(time.monotonic() - self.last_request_end, 2)

    def heartbeat(self) -> WorkerHeartbeat:
        c = self.config
        return WorkerHeartbeat(
            worker_id=c.worker_id, hive_id=c.hive_id, url=self.url, model=c.served_name,
            backend=self.backend.name if self.backend else c.backend, device=c.device,
            state=self.state, slots_total=c.slots, slots_busy=len(self.active), pid=os.getpid(), ctx=c.ctx,
            prefixes=self.backend.held_prefixes() if self.backend is not None else [],
        )

    def begin(self, request: InferenceRequest) -> ActiveRequest:
        """Take a slot for `request` (validated) or refuse it."""
        if self.backend is None:
            raise WorkerLoading("The model is still loading.")
        if self.draining:
            raise WorkerDraining("This worker is shutting down.")
        validate(request, self.config.ctx)
        for feature in asked_features(request):
            if feature not in self.backend.features:
                raise ValidationFailed(
                    f"The {self.backend.name} backend cannot do `{feature}`.", details={"field": feature},
                    hint="Serve a GGUF model on llama.cpp for JSON mode, tool calls, logprobs, logit_bias.",
                )
        if len(self.active) >= self.config.slots:
            raise AllSlotsBusy(
                f"All {self.config.slots} slot(s) of this worker are busy.",
                details={
                    "retry_after_s": 1, "slots_total": self.config.slots, "slots_busy": len(self.active),
                },
            )
        request_id = request.request_id or f"req-{uuid.uuid4()}"
        if request_id in self.active:
            raise ValidationFailed("That request_id is already running.", details={"field": "request_id"})
        active = ActiveRequest(request_id)
        self.active[request_id] = active
        if len(self.active) == self.config.slots:
            self.state_changed.set()  # now busy: the queen sees it at once, not a period later
        return active

    def cancel(self, request_id: str) -> bool:
        active = self.active.get(request_id)
        if active is None:
            return request_id in self.recent
        active.cancel()
        return True

    async def run(
        self, active: ActiveRequest, request: InferenceRequest,
        send: trio.MemorySendChannel[InferenceEvent], deadline: str | None = None,
    ) -> None:
        """Generate into `send`; always ends with `end` or `error`, frees the slot.

        At `deadline` (X-Request-Deadline) generation stops and the stream ends with
        the error REQUEST_TIMEOUT.
        """
        async with trio.open_nursery() as timer:
            timed_out: list[bool] = []

            async def expire() -> None:
                await trio.sleep_until(deadlines.trio_deadline(deadline))
                log.warning("request timeout request_id=%s: the deadline %s passed",
                            active.request_id, deadline)
                timed_out.append(True)
                active.cancel()

            if deadline is not None:
                timer.start_soon(expire)
            await self._run(active, request, send, timed_out)
            timer.cancel_scope.cancel()

    async def _run(
        self, active: ActiveRequest, request: InferenceRequest,
        send: trio.MemorySendChannel[InferenceEvent], timed_out: list[bool],
    ) -> None:
        backend = self.backend
        index = 0
        began = time.monotonic()
        first_token_at: float | None = None
        outcome = "cancelled"
        """Until the end event or an error says otherwise: the client left, or the worker stopped."""
        generated: Generated | None = None

        trio_token = trio.lowlevel.current_trio_token()

        def deliver(text: str, logprobs: list[TokenLogprob] | None) -> None:  # in trio, soon after
            nonlocal index, first_token_at
            if first_token_at is None:
                first_token_at = time.monotonic()
            try:
                send.send_nowait(InferenceToken(t=text, i=index, lp=logprobs))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                active.cancel()  # the stream is gone: the engine frees the sequence next step
                return
            index += 1

        def on_token(text: str, logprobs: list[TokenLogprob] | None) -> None:  # the engine's thread
            try:
                trio_token.run_sync_soon(deliver, text, logprobs)
            except trio.RunFinishedError:
                active.cancelled.set()

        async def send_token(text: str) -> bool:  # in trio: the synthetic backend
            nonlocal index, first_token_at
            if first_token_at is None:
                first_token_at = time.monotonic()
            try:
                await send.send(InferenceToken(t=text, i=index))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            index += 1
            return True

        try:
            async with send:
                await send.send(InferenceStarted(
                    request_id=active.request_id, worker_id=self.config.worker_id,
                    model=self.config.served_name,
                ))
                try:
                    if backend is None:
                        raise ServiceUnavailable("The model is not loaded.")
                    generated = await backend.run(request, Output(
                        on_token=on_token, send=send_token, cancelled=active.cancelled, woken=active.woken,
                        threads=self._threads))
                except RbeeError as error:
                    outcome = "failed"
                    details = {k: v for k, v in error.details.items() if k != "hint"}
                    await send.send(InferenceError(code=error.code, message=error.message, details=details))
                    return
                except Exception as error:
                    outcome = "failed"
                    log.error("generation failed request_id=%s", active.request_id, exc_info=error)
                    await send.send(InferenceError(code=InternalError.code, message="Generation failed."))
                    return
                if timed_out:
                    outcome = "timeout"
                    timeout = InferenceError(code=DeadlineExceeded.code, message="Request exceeded deadline")
                    await send.send(timeout)
                    return
                if not active.cancelled.is_set():
                    outcome = "completed"
                decode_ms = 0.0 if first_token_at is None else (time.monotonic() - first_token_at) * 1000
                await send.send(InferenceEnd(
                    tokens_in=generated.tokens_in, tokens_out=generated.tokens_out,
                    decode_ms=round(decode_ms, 1), stop_reason=generated.stop_reason,
                    tokens_cached=generated.tokens_cached, stop_sequence=generated.stop_sequence,
                ))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            active.cancel()  # the client went away
        finally:
            self.active.pop(active.request_id, None)
            self.last_request_end = time.monotonic()
            self.metrics.request_ended(
                outcome, ttft_s=None if first_token_at is None else first_token_at - began,
                generating_s=None if first_token_at is None else self.last_request_end - first_token_at,
                tokens_in=generated.tokens_in if generated else 0,
                tokens_out=generated.tokens_out if generated else index,
                tokens_cached=generated.tokens_cached if generated else 0,
                tokens_restored=generated.tokens_restored if generated else 0)
            self.recent.append(active.request_id)
            if len(self.active) in (0, self.config.slots - 1):
                self.state_changed.set()  # ready again, or idle: `rbee-keeper status` shows 0 busy at once
            active.done.set()

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Vectors for the inputs: a second context on the same weights, one request at a time."""
        backend = self.backend
        if backend is None:
            raise WorkerLoading("The model is still loading.")
        if self.draining:
            raise WorkerDraining("This worker is shutting down.")
        if "embeddings" not in backend.features:
            raise ValidationFailed(f"The {backend.name} backend does not compute embeddings.",
                                   details={"field": "input"},
                                   hint="Serve a GGUF model on llama.cpp for embeddings.")
        if not request.input:
            raise ValidationFailed("`input` must not be empty.", details={"field": "input"})
        check_embed_inputs(request.input)
        cancelled = threading.Event()
        try:
            # Abandoned on cancel (the client left): the thread stops at its next batch, and holds
            # the embedding lane (`_embedder`) until it has.
            vectors, tokens = await trio.to_thread.run_sync(
                backend.embed, request, cancelled, limiter=self._embedder, abandon_on_cancel=True)
        except trio.Cancelled:
            log.info("embedding request cancelled: its client went away")
            cancelled.set()
            raise
        finally:
            self.last_request_end = time.monotonic()  # in use: not idle (the hive stops idle workers)
        return EmbedResult(data=vectors, tokens=tokens)

    async def count_tokens(self, request: InferenceRequest) -> int:
        """The prompt's tokens, chat template applied (Anthropic's count_tokens), in a thread."""
        backend = self.backend
        if backend is None:
            raise WorkerLoading("The model is still loading.")
        check_tools(request)
        return await trio.to_thread.run_sync(backend.count_tokens, request)

    async def drain(self, deadline_s: float) -> None:
        """Refuse new requests; let active ones finish, then cancel the rest."""
        self.draining = True
        self.state_changed.set()
        with trio.move_on_after(deadline_s):
            for active in list(self.active.values()):
                await active.done.wait()
        for active in list(self.active.values()):
            active.cancel()
        with trio.move_on_after(2.0):
            for active in list(self.active.values()):
                await active.done.wait()


encode_event = msgspec.json.Encoder().encode

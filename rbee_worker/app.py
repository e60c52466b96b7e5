"""The worker's HTTP routes (DESIGN §3): inference answers with SSE directly."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator

import msgspec
import trio
from quart import Response
from quart import request as http_request
from quart_trio import QuartTrio

from rbee_common import deadlines
from rbee_common.auth import install_auth
from rbee_common.browser import BrowserGuard, install_json_only
from rbee_common.errors import RequestNotFound
from rbee_common.http import (
    create_app,
    json_response,
    no_content,
    read_body,
    read_json_object,
    sse_frame,
    sse_response,
)
from rbee_common.validation import decode_body
from rbee_common.wire import DONE, EmbedRequest, InferenceEvent, InferenceRequest
from rbee_worker.service import WorkerService, encode_event

log = logging.getLogger("rbee.worker")

_request_decoder = msgspec.json.Decoder(InferenceRequest)
_embed_decoder = msgspec.json.Decoder(EmbedRequest)
CANCEL_WAIT_S = 2.0
"""DELETE waits at most this long for the request to end (the engine stops it at its next step)."""


def build_app(service: WorkerService, nursery: trio.Nursery, *, stop: trio.Event) -> QuartTrio:
    app = create_app("llm-worker-rbee", component="worker", max_body_bytes=service.config.max_body_bytes,
                     guard=BrowserGuard(bind_host=service.config.host))
    metrics = service.metrics.install(app, public=service.config.metrics_public)
    install_auth(app, service.config.api_token, public=("/health", *metrics),
                 on_failure=lambda reason, identity, path: service.metrics.auth_failed(reason))
    install_json_only(app)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "program": "llm-worker-rbee", "state": service.state})

    @app.get("/v1/ready")
    async def ready() -> Response:
        beat = service.heartbeat()
        return json_response(
            {"state": beat.state, "slots_total": beat.slots_total, "slots_busy": beat.slots_busy,
             "model": beat.model, "backend": beat.backend, "device": beat.device, "idle_s": service.idle_s,
             "model_info": service.backend.info if service.backend else None}
        )

    @app.post("/v1/inference")
    async def inference() -> Response:
        request = decode_body(await read_body(), _request_decoder)
        deadline = deadlines.from_headers(http_request.headers, default_s=None)
        if deadline is not None and deadlines.parse(deadline) <= time.time():
            log.warning("request timeout: it arrived after its deadline %s", deadline)
            raise deadlines.exceeded(deadline)
        active = service.begin(request)
        # Unbounded: the engine thread never waits for a client; max_tokens bounds it in fact.
        send, receive = trio.open_memory_channel[InferenceEvent](math.inf)
        nursery.start_soon(service.run, active, request, send, deadline)

        async def frames() -> AsyncIterator[bytes]:
            ended = False
            try:
                async with receive:
                    async for event in receive:
                        yield sse_frame(None, encode_event(event).decode())
                ended = True
                yield sse_frame(None, DONE)
            finally:
                if not ended and not active.cancelled.is_set():
                    log.info("client went away: cancelling request_id=%s", active.request_id)
                active.cancel()  # a no-op when it ended; stops it when the client left

        return sse_response(frames())

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        request = decode_body(await read_body(), _embed_decoder)
        return json_response(await service.embed(request))

    @app.post("/v1/count-tokens")
    async def count_tokens() -> Response:
        request = decode_body(await read_body(), _request_decoder)
        return json_response({"tokens": await service.count_tokens(request)})

    @app.delete("/v1/inference/<request_id>")
    async def cancel(request_id: str) -> Response:
        # Idempotent: a request that already ended (or was cancelled) answers 204 again.
        if not service.cancel(request_id):
            raise RequestNotFound("No running or recent request with that id.")
        active = service.active.get(request_id)
        if active is not None:  # answered once its slot is free: the next request can take it
            with trio.move_on_after(CANCEL_WAIT_S):
                await active.done.wait()
        return no_content()

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> Response:
        await read_json_object()  # no bodiless cross-site form can send it
        stop.set()
        return json_response({"status": "draining"}, status=202)

    return app

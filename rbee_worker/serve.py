"""The worker's nursery tree: HTTP, model load, heartbeats, lifeline."""

from __future__ import annotations

import functools
import logging
import time

import httpx
import msgspec
import trio

from rbee_common.auth import bearer
from rbee_common.client import map_transport_errors
from rbee_common.errors import TransportError
from rbee_common.http import serve_app
from rbee_worker.app import build_app
from rbee_worker.backends import load_backend
from rbee_worker.backends.base import Backend
from rbee_worker.backends.synthetic import SyntheticBackend, load_script
from rbee_worker.config import WorkerConfig
from rbee_worker.models import ResolvedModel, resolve_model
from rbee_worker.service import WorkerService

log = logging.getLogger("rbee.worker")
_encode = msgspec.json.Encoder().encode


async def heartbeat_forever(service: WorkerService, http: httpx.AsyncClient, queen_url: str) -> None:
    """Tell the queen we exist; a missing queen is logged, never fatal."""
    failing = False
    while True:
        ok = False
        for _attempt in range(2):  # a kept-alive connection the queen closed meanwhile: once more, anew
            try:
                with map_transport_errors(queen_url):
                    response = await http.post(
                        f"{queen_url.rstrip('/')}/v1/worker-heartbeat", content=_encode(service.heartbeat()),
                        headers={"Content-Type": "application/json", **bearer(service.config.api_token)},
                        timeout=2.0,
                    )
            except TransportError:
                continue
            ok = response.status_code < 400
            break
        if not ok and not failing:
            log.warning("heartbeat to the queen failed; will keep trying")
        elif ok and failing:
            log.info("heartbeat to the queen works again")
        failing = not ok
        with trio.move_on_after(service.config.heartbeat_s):
            await trio.sleep(min(0.25, service.config.heartbeat_s))  # a flapping state: 4 beats/s at most
            await service.state_changed.wait()  # loaded, busy, ready or draining: tell the queen now
        service.state_changed = trio.Event()


async def watch_lifeline(fd: int, service: WorkerService, stop: trio.Event) -> None:
    """The hive holds the other end of this pipe; EOF means it died."""
    async with trio.lowlevel.FdStream(fd) as stream:
        while await stream.receive_some(4096):
            pass
    log.warning("lifeline closed: the parent is gone, exiting")
    service.drain_s = 0.5
    stop.set()


async def serve(
    config: WorkerConfig,
    *,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    synthetic = config.backend == "synthetic"
    model = None if synthetic else resolve_model(config.model)
    service = WorkerService(config)
    try:
        await _serve(config, service, model, stop, task_status)
    finally:  # the engine's thread and the model's memory go with the requests
        close = getattr(service.backend, "close", None)
        if close is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(close)


async def _serve(
    config: WorkerConfig, service: WorkerService, model: ResolvedModel | None, stop: trio.Event,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    # One kept-alive connection to the queen: a new one per beat costs the queen twice the CPU.
    one = httpx.Limits(max_connections=2, max_keepalive_connections=1,
                       keepalive_expiry=config.heartbeat_s * 3)
    async with httpx.AsyncClient(limits=one) as http, trio.open_nursery() as nursery:
        if config.lifeline_fd is not None:
            nursery.start_soon(watch_lifeline, config.lifeline_fd, service, stop)
        app = build_app(service, nursery, stop=stop)

        async def shutdown_trigger() -> None:
            await stop.wait()
            await service.drain(service.drain_s)

        async def run_http(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve_app(  # the trigger drained the requests: what is left is idle
                app, host=config.host, port=config.port, shutdown_trigger=shutdown_trigger,
                graceful_timeout=0.5, h2_streams=max(100, config.slots), task_status=task_status,
            )
            nursery.cancel_scope.cancel()

        urls = await nursery.start(run_http)
        service.url = urls[0]
        if config.queen_url:
            nursery.start_soon(heartbeat_forever, service, http, config.queen_url)
        backend: Backend
        if model is None:
            script = load_script(config.script) if config.script else None
            backend = SyntheticBackend(tokens_per_s=config.synthetic_tokens_per_s, ctx=config.ctx,
                                       slots=config.slots, script=script,
                                       prefill_tokens_per_s=config.synthetic_prefill_tokens_per_s)
        else:
            began = time.monotonic()
            backend = await trio.to_thread.run_sync(
                functools.partial(
                    load_backend, model, backend=config.backend, device=config.device,
                    threads=config.threads, ctx=config.ctx, slots=config.slots,
                    cache_bytes=config.cache_ram_mib << 20, split=config.tensor_split, rpc=config.rpc,
                )
            )
            service.metrics.load_seconds.labels(config.served_name).set(time.monotonic() - began)
        service.backend = backend
        service.state_changed.set()
        service.last_request_end = time.monotonic()  # idle counts from ready
        log.info("model %r loaded with %s on %s", config.model, backend.name, config.device)
        task_status.started(urls)

"""The queen's nursery tree: HTTP server, job tasks, and under --local-hive a hive.

With `--local-hive` the `localhost` hive's service lives here, and its
workers are children of this process (with lifeline pipes): when the queen
stops they are stopped (graceful, then SIGKILL), and when the queen is
killed outright their lifelines close and they exit by themselves.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import httpx
import msgspec
import trio
from quart_trio import QuartTrio

from rbee_common.audit import close_audit, flush_audit_forever, record_job
from rbee_common.auth import TokenSource
from rbee_common.jobs import JobLimits, JobServer
from rbee_hive.serve import open_hive_service
from rbee_hive.service import HiveService
from rbee_queen.app import build_app
from rbee_queen.config import QueenConfig
from rbee_queen.fleet import ssh
from rbee_queen.fleet.remote import Remote
from rbee_queen.service import QueenService
from rbee_queen.worker_client import WorkerLanes


async def _end_streams_on(stop: trio.Event, service: QueenService) -> None:
    """On SIGTERM: end the open OpenAI streams with their terminator (an in-process hive stops its
    workers by itself, while HTTP drains)."""
    await stop.wait()
    service.streams.end_all()


def apply_config(
    config: QueenConfig, service: QueenService, jobs: JobServer, app: QuartTrio, local: list[HiveService],
) -> None:
    """SIGHUP: read the config file again and put what changed to work (area 360)."""
    if config.reload() is None:
        return  # a broken file: logged, nothing changed
    settings = config.settings
    scheduler = service.scheduler
    scheduler.queue_size, scheduler.queue_timeout_s = settings.queue_size, settings.queue_timeout_s
    scheduler.cold_start_enabled = settings.cold_start
    scheduler.use_settings(settings)
    service.workers.stale_after_s = settings.worker_stale_s
    service.audit.max_bytes = settings.audit_max_bytes
    service.audit.max_total_bytes = settings.audit_max_total_bytes
    service.auth_failures.window_s = settings.audit_failure_window_s
    jobs.limits = _job_limits(config)
    jobs.default_deadline_s = settings.default_deadline_s or None
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    service.remote.settings = settings
    for hive in local:  # its address and queen_url stay: they are fixed while it runs
        hive.apply_settings(msgspec.structs.replace(config.hive, queen_url=hive.settings.queen_url))


def _job_limits(config: QueenConfig) -> JobLimits:
    settings = config.settings
    return JobLimits(max_live_jobs=settings.max_live_jobs, max_finished_jobs=settings.max_finished_jobs,
                     retention_s=settings.job_retention_s, event_buffer=settings.event_buffer)


async def serve(
    config: QueenConfig,
    *,
    stop: trio.Event,
    tokens: TokenSource | None = None,
    reloads: list[Callable[[], None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop`; `reloads` gets the function SIGHUP calls to apply a changed config."""
    settings = config.settings
    limits = _job_limits(config)
    limits_http = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(ssh.open_loop())
        http = await stack.enter_async_context(httpx.AsyncClient(limits=limits_http))
        lanes = await stack.enter_async_context(WorkerLanes())
        # Under --local-hive, the localhost hive lives in this process: opened before the queen's own
        # nursery, so it closes after it (its workers stopped, graceful then SIGKILL).
        local = [await stack.enter_async_context(open_hive_service(config.hive, token=config.api_token,
                                                                   stop=stop))
                 for _ in range(1 if settings.local_hive else 0)]
        children = await stack.enter_async_context(trio.open_nursery())
        remote = Remote(settings, config.hives, nursery=children, http=http)
        service = QueenService(config, http=http, nursery=children, remote=remote, local_hives=local,
                               tokens=tokens, lanes=lanes)
        children.start_soon(service.workers.expire_forever)
        children.start_soon(service.replicas.run)
        children.start_soon(flush_audit_forever, service.auth_failures)
        try:
            async with trio.open_nursery() as nursery:
                jobs = JobServer(nursery, service.handle, actor="queen", limits=limits)
                jobs.on_finish = functools.partial(record_job, service.audit)
                jobs.metrics = service.metrics
                jobs.default_deadline_s = settings.default_deadline_s or None
                app = build_app(service, jobs, stop=stop)
                if reloads is not None:
                    reloads.append(functools.partial(apply_config, config, service, jobs, app, local))
                urls = await nursery.start(
                    functools.partial(jobs.serve, app, host=settings.host, port=settings.port, stop=stop)
                )
                for hive in local:
                    hive.heartbeat_to(urls[0])
                children.start_soon(_end_streams_on, stop, service)
                remote.queen_url = urls[0]
                task_status.started(urls)
        finally:
            close_audit(service.auth_failures)
            with trio.CancelScope(shield=True), trio.move_on_after(20):
                await remote.stop_all()  # hives started over SSH, and their workers
            children.cancel_scope.cancel()

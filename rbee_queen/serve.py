"""The queen's nursery tree: HTTP server, job tasks, and under --local-hive a hive.

With `--local-hive` the `localhost` hive's service lives here, and its
workers are children of this process (with lifeline pipes): when the queen
stops they are stopped (graceful, then SIGKILL), and when the queen is
killed outright their lifelines close and they exit by themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import httpx
import msgspec
import trio
from quart_trio import QuartTrio

from rbee_common.audit import record_job
from rbee_common.auth import TokenSource
from rbee_common.jobs import JobLimits, JobServer
from rbee_hive.service import HiveService
from rbee_queen import ssh
from rbee_queen.app import build_app
from rbee_queen.config import QueenConfig
from rbee_queen.inference import WorkerLanes
from rbee_queen.remote import Remote
from rbee_queen.service import QueenService


async def _on_stop(stop: trio.Event, service: QueenService, local: HiveService | None) -> None:
    """On SIGTERM: end the open OpenAI streams with their terminator, and stop the local workers
    while HTTP drains, not after (they drain their own requests)."""
    await stop.wait()
    service.streams.end_all()
    if local is not None:
        await local.workers.stop_all()


def apply_config(config: QueenConfig, service: QueenService, jobs: JobServer, app: QuartTrio) -> None:
    """SIGHUP: read the config file again and put what changed to work (area 360)."""
    if config.reload() is None:
        return  # a broken file: logged, nothing changed
    settings = config.settings
    scheduler = service.scheduler
    scheduler.queue_size, scheduler.queue_timeout_s = settings.queue_size, settings.queue_timeout_s
    scheduler.cold_start_enabled = settings.cold_start
    service.workers.stale_after_s = settings.worker_stale_s
    service.audit.max_bytes = settings.audit_max_bytes
    jobs.limits = _job_limits(config)
    jobs.default_deadline_s = settings.default_deadline_s or None
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if service.remote is not None:
        service.remote.settings = settings
    local = service.local_hive
    if local is not None:  # its address and queen_url stay: they are fixed while it runs
        local.settings = local.workers.settings = msgspec.structs.replace(
            config.hive, queen_url=local.settings.queen_url)
        local.audit.max_bytes = config.hive.audit_max_bytes


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
    async with ssh.open_loop(), httpx.AsyncClient(limits=limits_http) as http, \
            WorkerLanes() as lanes, trio.open_nursery() as children:
        local = HiveService(config.hive, children, token=config.api_token) if settings.local_hive else None
        remote = Remote(settings, config.hives, nursery=children, http=http)
        service = QueenService(config, http=http, nursery=children, local_hive=local, remote=remote,
                               tokens=tokens, lanes=lanes)
        children.start_soon(service.workers.expire_forever)
        try:
            async with trio.open_nursery() as nursery:
                jobs = JobServer(nursery, service.handle, actor="queen", limits=limits)
                jobs.on_finish = functools.partial(record_job, service.audit)
                jobs.default_deadline_s = settings.default_deadline_s or None
                app = build_app(service, jobs, stop=stop)
                if reloads is not None:
                    reloads.append(functools.partial(apply_config, config, service, jobs, app))
                urls = await nursery.start(
                    functools.partial(jobs.serve, app, host=settings.host, port=settings.port, stop=stop)
                )
                if local is not None:
                    # The in-process hive's workers heartbeat to this queen.
                    local.settings = local.workers.settings = msgspec.structs.replace(
                        local.settings, queen_url=urls[0]
                    )
                    children.start_soon(local.workers.monitor_forever)
                children.start_soon(_on_stop, stop, service, local)
                remote.queen_url = urls[0]
                task_status.started(urls)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(20):
                await remote.stop_all()  # hives started over SSH, and their workers
            if local is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(config.hive.worker_stop_grace_s + 3):
                    await local.workers.stop_all()
                local.workers.kill_all()
            children.cancel_scope.cancel()

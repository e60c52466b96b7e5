"""The queen's nursery tree: HTTP server, job tasks, and under --local-hive a hive.

With `--local-hive` the `localhost` hive's service lives here, and its
workers are children of this process (with lifeline pipes): when the queen
stops they are stopped (graceful, then SIGKILL), and when the queen is
killed outright their lifelines close and they exit by themselves.
"""

from __future__ import annotations

import functools

import httpx
import msgspec
import trio

from rbee_common.audit import record_job
from rbee_common.auth import TokenSource
from rbee_common.jobs import JobLimits, JobServer
from rbee_hive.service import HiveService
from rbee_queen import ssh
from rbee_queen.app import build_app
from rbee_queen.config import QueenConfig
from rbee_queen.remote import Remote
from rbee_queen.service import QueenService


async def _stop_workers_on(stop: trio.Event, local: HiveService) -> None:
    """On SIGTERM, stop the local workers while HTTP drains, not after: they drain their own requests."""
    await stop.wait()
    await local.workers.stop_all()


async def serve(
    config: QueenConfig,
    *,
    stop: trio.Event,
    tokens: TokenSource | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    settings = config.settings
    limits = JobLimits(
        max_live_jobs=settings.max_live_jobs,
        max_finished_jobs=settings.max_finished_jobs,
        retention_s=settings.job_retention_s,
        event_buffer=settings.event_buffer,
    )
    limits_http = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with ssh.open_loop(), httpx.AsyncClient(limits=limits_http) as http, \
            trio.open_nursery() as children:
        local = HiveService(config.hive, children, token=config.api_token) if settings.local_hive else None
        remote = Remote(settings, config.hives, nursery=children, http=http)
        service = QueenService(config, http=http, nursery=children, local_hive=local, remote=remote,
                               tokens=tokens)
        try:
            async with trio.open_nursery() as nursery:
                jobs = JobServer(nursery, service.handle, actor="queen", limits=limits)
                jobs.on_finish = functools.partial(record_job, service.audit)
                app = build_app(service, jobs, stop=stop)
                urls = await nursery.start(
                    functools.partial(jobs.serve, app, host=settings.host, port=settings.port, stop=stop)
                )
                if local is not None:
                    # The in-process hive's workers heartbeat to this queen.
                    local.settings = local.workers.settings = msgspec.structs.replace(
                        local.settings, queen_url=urls[0]
                    )
                    children.start_soon(local.workers.monitor_forever)
                    children.start_soon(_stop_workers_on, stop, local)
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

"""The queen's nursery tree: HTTP server, job tasks, background loops."""

from __future__ import annotations

import functools

import httpx
import trio

from rbee_common.jobs import JobLimits, JobServer
from rbee_queen.app import build_app
from rbee_queen.config import QueenConfig
from rbee_queen.service import QueenService


async def serve(
    config: QueenConfig,
    *,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    settings = config.settings
    limits = JobLimits(
        max_live_jobs=settings.max_live_jobs,
        max_finished_jobs=settings.max_finished_jobs,
        retention_s=settings.job_retention_s,
        event_buffer=settings.event_buffer,
    )
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        service = QueenService(config, http=http)
        jobs = JobServer(nursery, service.handle, actor="queen", limits=limits)
        app = build_app(service, jobs, stop=stop)
        urls = await nursery.start(
            functools.partial(jobs.serve, app, host=settings.host, port=settings.port, stop=stop)
        )
        task_status.started(urls)

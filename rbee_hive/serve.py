"""The hive's nursery tree: HTTP server, job tasks, the stdin lifeline."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from rbee_common.audit import record_job
from rbee_common.auth import TokenSource
from rbee_common.config import HiveSettings
from rbee_common.daemon import watch_stdin_lifeline
from rbee_common.jobs import JobLimits, JobServer
from rbee_hive.app import build_app
from rbee_hive.config import reload_hive_settings
from rbee_hive.service import HiveService


async def _stop_workers_on(stop: trio.Event, service: HiveService) -> None:
    """On SIGTERM, stop the workers while HTTP drains, not after: they drain their own requests."""
    await stop.wait()
    await service.workers.stop_all()


async def serve(
    settings: HiveSettings,
    *,
    stop: trio.Event,
    lifeline_stdin: bool = False,
    token: str | TokenSource | None = None,
    reloads: list[Callable[[], None]] | None = None,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop`; `reloads` gets the function SIGHUP calls to apply a changed config."""
    limits = JobLimits(max_live_jobs=settings.max_live_jobs, retention_s=settings.job_retention_s)
    # Workers and downloads live in their own nursery (`children`), outside the
    # job server's (which it cancels when HTTP is down): after the server has
    # stopped, every worker is stopped (graceful, then SIGKILL), then the hive exits.
    tokens = token if isinstance(token, TokenSource) else TokenSource.fixed(token)
    async with trio.open_nursery() as children:
        service = HiveService(settings, children, token=tokens.current)
        children.start_soon(service.workers.monitor_forever)
        children.start_soon(_stop_workers_on, stop, service)
        try:
            async with trio.open_nursery() as nursery:
                jobs = JobServer(nursery, service.handle, actor="hive", limits=limits)
                jobs.on_finish = functools.partial(record_job, service.audit)
                app = build_app(service, jobs, stop=stop, token=tokens)

                def apply_config() -> None:  # SIGHUP (area 360)
                    reloaded = reload_hive_settings(service.settings, config_path, **(overrides or {}))
                    if reloaded is None:
                        return
                    fresh = reloaded[0]
                    service.settings = service.workers.settings = fresh
                    service.audit.max_bytes = fresh.audit_max_bytes
                    jobs.limits = msgspec.structs.replace(
                        jobs.limits, max_live_jobs=fresh.max_live_jobs, retention_s=fresh.job_retention_s)
                    app.config["MAX_CONTENT_LENGTH"] = fresh.max_body_bytes

                if reloads is not None:
                    reloads.append(apply_config)
                if lifeline_stdin:
                    nursery.start_soon(watch_stdin_lifeline, stop)
                urls = await nursery.start(
                    functools.partial(jobs.serve, app, host=settings.host, port=settings.port, stop=stop)
                )
                task_status.started(urls)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(settings.worker_stop_grace_s + 3):
                await service.workers.stop_all()
            service.workers.kill_all()  # anything that outlived the deadline
            children.cancel_scope.cancel()

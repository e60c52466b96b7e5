"""The hive's nursery tree: HTTP server, job tasks, the stdin lifeline."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import trio

from rbee_common.audit import close_audit, flush_audit_forever, record_job
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
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.workers.stop_all)
        nursery.start_soon(service.rpc.stop_all)


@contextlib.asynccontextmanager
async def open_hive_service(
    settings: HiveSettings, *, token: str | None, stop: trio.Event
) -> AsyncIterator[HiveService]:
    """A hive, open for operations: its workers and downloads run in its own nursery.

    When `stop` is set its workers start stopping (while HTTP drains); when the
    block ends every worker is stopped (graceful, then SIGKILL after the grace
    period) and the nursery closes. The hive daemon and the queen's
    `--local-hive` both open a hive this way, so a hive's shutdown is written once.
    """
    async with trio.open_nursery() as children:
        service = HiveService(settings, children, token=token)
        children.start_soon(service.workers.monitor_forever)
        children.start_soon(_stop_workers_on, stop, service)
        children.start_soon(flush_audit_forever, service.auth_failures)
        try:
            yield service
        finally:
            close_audit(service.auth_failures)
            with trio.CancelScope(shield=True), trio.move_on_after(settings.worker_stop_grace_s + 3):
                await service.rpc.stop_all()
                await service.workers.stop_all()
            service.workers.kill_all()  # anything that outlived the deadline
            children.cancel_scope.cancel()


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
    # The job server's nursery is inside the hive's: after the server has stopped,
    # every worker is stopped, then the hive exits.
    tokens = token if isinstance(token, TokenSource) else TokenSource.fixed(token)
    async with open_hive_service(settings, token=tokens.current, stop=stop) as service, \
            trio.open_nursery() as nursery:
        jobs = JobServer(nursery, service.handle, actor="hive", limits=limits)
        jobs.on_finish = functools.partial(record_job, service.audit)
        jobs.metrics = service.metrics
        app = build_app(service, jobs, stop=stop, token=tokens)

        def apply_config() -> None:  # SIGHUP (area 360)
            reloaded = reload_hive_settings(service.settings, config_path, **(overrides or {}))
            if reloaded is None:
                return
            fresh = reloaded[0]
            service.apply_settings(fresh)
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

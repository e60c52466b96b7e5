"""What the queen does, without HTTP: one method per operation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import msgspec
import trio

from rbee_common.config import HiveEntry
from rbee_common.daemon import package_version
from rbee_common.errors import NotImplementedYet, RbeeError
from rbee_common.jobs import JobContext
from rbee_common.wire import (
    HIVE_OPERATIONS,
    GenerationParams,
    HiveGet,
    HiveHealth,
    HiveList,
    HiveRefreshCapabilities,
    HiveStatus,
    Infer,
    ModelList,
    Operation,
    QueenStatus,
    Status,
    WorkerInfo,
    WorkerListActive,
    WorkerStop,
)
from rbee_hive.service import HiveService
from rbee_queen.config import QueenConfig
from rbee_queen.hives import HiveRouter, hive_url
from rbee_queen.inference import Served, generate
from rbee_queen.openai_api import Usage
from rbee_queen.registry import WorkerRegistry
from rbee_queen.scheduler import Scheduler


class InferResult(msgspec.Struct, kw_only=True):
    text: str
    model: str
    worker_id: str
    tokens_in: int
    tokens_out: int
    stop_reason: str
    attempts: int


class QueenService:
    def __init__(
        self, config: QueenConfig, *, http: httpx.AsyncClient, local_hive: HiveService | None = None
    ) -> None:
        self.config = config
        self._http = http
        settings = config.settings
        self.workers = WorkerRegistry(stale_after_s=settings.worker_stale_s)
        self.local_hive = local_hive
        self.router = HiveRouter(config.hives, http=http, local=local_hive)
        self.scheduler = Scheduler(
            self.workers, self.router, queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s, cold_start=settings.cold_start,
        )

    async def handle(self, operation: Operation, context: JobContext) -> Any:
        match operation:
            case Status():
                return await self.status(context)
            case WorkerListActive(model=model, device=device):
                return self.worker_list_active(context, model=model, device=device)
            case HiveList():
                return [{"hive_id": hive_id, "url": hive_url(entry), "local": self.router.is_local(hive_id)}
                        for hive_id, entry in self.config.hives.items()]
            case Infer():
                return await self.infer(operation, context)
            case HiveGet(hive_id=hive_id):
                entry = self.router.entry(hive_id or "localhost")
                return {"hive_id": hive_id or "localhost", "url": hive_url(entry),
                        "local": self.router.is_local(hive_id or "localhost"), **msgspec.to_builtins(entry)}
            case HiveStatus(hive_id=hive_id):
                alias = hive_id or "localhost"
                health = await self.probe_hive(alias, self.router.entry(alias))
                context.narrate("hive_status", f"Hive {alias}: " + (
                    "reachable" if health.reachable else f"{health.problem}"), hive_id=alias)
                return health
            case HiveRefreshCapabilities(hive_id=hive_id):
                alias = hive_id or "localhost"
                caps = await self.router.capabilities(alias)
                context.narrate("hive_refresh_capabilities",
                                f"Hive {alias}: {len(caps.get('devices', []))} device(s)", hive_id=alias)
                return caps
            case WorkerStop(worker_id=worker_id, hive_id=hive_id):
                stopped = await self.router.run(operation, hive_id or "localhost", context)
                self.workers.forget(worker_id, "stopped through the queen")
                return stopped
            case op if isinstance(op, HIVE_OPERATIONS):
                hive_id = getattr(op, "hive_id", None) or "localhost"
                return await self.router.run(op, hive_id, context)
            case _:
                raise NotImplementedYet(
                    f"Operation `{operation.name}` is not implemented yet in this queen.",
                    details={"operation": operation.name},
                    hint="Upgrade rbee; `rbee-keeper status` works today.",
                )

    # --- inference ----------------------------------------------------------------

    async def generate(
        self, model: str, params: GenerationParams, usage: Usage, context: JobContext | None = None,
    ) -> AsyncGenerator[str, None]:
        served = Served()
        async with contextlib.aclosing(generate(
            self.scheduler, self.workers, self._http, model, params,
            attempts=self.config.settings.infer_attempts, context=context, served=served,
        )) as pieces:
            async for piece in pieces:
                yield piece
        usage.prompt_tokens, usage.completion_tokens = served.tokens_in, served.tokens_out
        usage.finish_reason = served.stop_reason

    async def infer(self, operation: Infer, context: JobContext) -> InferResult:
        params = GenerationParams(**{f: getattr(operation, f) for f in GenerationParams.__struct_fields__})
        served = Served()
        text: list[str] = []
        async with contextlib.aclosing(generate(
            self.scheduler, self.workers, self._http, operation.model, params,
            attempts=self.config.settings.infer_attempts, context=context, served=served,
            hive_id=operation.hive_id,
        )) as pieces:
            async for piece in pieces:
                context.token(piece, len(text))
                text.append(piece)
        return InferResult(
            text="".join(text), model=operation.model, worker_id=served.worker_id, tokens_in=served.tokens_in,
            tokens_out=served.tokens_out, stop_reason=served.stop_reason, attempts=served.attempts,
        )

    async def model_names(self) -> list[str]:
        """Models a request can name: what workers serve and what hive catalogs hold."""
        names = {w.model for w in self.workers.active()}

        async def catalog(hive_id: str) -> None:
            # A hive that does not answer within 3 s is left out, not waited for.
            with contextlib.suppress(RbeeError, httpx.HTTPError, OSError), trio.move_on_after(3.0):
                if self.router.is_local(hive_id) and self.local_hive is not None:
                    entries = msgspec.to_builtins(self.local_hive.catalog.list())
                else:
                    entries = await self.router.run(ModelList(hive_id=hive_id), hive_id, None)
                names.update(str(entry["id"]) for entry in entries or [])

        async with trio.open_nursery() as nursery:
            for hive_id in self.router.ids():
                nursery.start_soon(catalog, hive_id)
        return sorted(names)

    # --- status ---------------------------------------------------------------------

    async def probe_hive(self, hive_id: str, entry: HiveEntry) -> HiveHealth:
        if self.router.is_local(hive_id):
            return HiveHealth(hive_id=hive_id, url="in-process", reachable=True)
        url = hive_url(entry)
        timeout = self.config.settings.hive_probe_timeout_s
        problem: str | None = None
        try:
            response = await self._http.get(f"{url}/health", timeout=timeout)
        except httpx.ConnectError:
            problem = "not running (connection refused)"
        except httpx.TimeoutException:
            problem = f"no answer within {timeout:g} s"
        except httpx.HTTPError:
            problem = "the connection failed"
        else:
            if response.status_code != 200:
                problem = f"unhealthy (HTTP {response.status_code})"
        return HiveHealth(hive_id=hive_id, url=url, reachable=problem is None, problem=problem)

    async def status(self, context: JobContext) -> QueenStatus:
        hives = self.config.hives
        context.narrate("status", f"Checking {len(hives)} hive(s)")
        results: dict[str, HiveHealth] = {}

        async def probe(hive_id: str, entry: HiveEntry) -> None:
            health = await self.probe_hive(hive_id, entry)
            results[hive_id] = health
            context.narrate(
                "hive_probe",
                f"Hive {hive_id}: " + ("reachable" if health.reachable else f"{health.problem}"),
                level="info" if health.reachable else "warn",
                hive_id=hive_id,
                reachable=health.reachable,
            )

        async with trio.open_nursery() as nursery:
            for hive_id, entry in hives.items():
                nursery.start_soon(probe, hive_id, entry)
        return QueenStatus(
            version=package_version(),
            hives=[results[hive_id] for hive_id in hives],
            workers=self.workers.active(),
        )

    def worker_list_active(
        self, context: JobContext, *, model: str | None = None, device: str | None = None
    ) -> list[WorkerInfo]:
        workers = [w for w in self.workers.active()
                   if (model is None or w.model == model) and (device is None or w.device == device)]
        context.narrate("worker_list_active", f"{len(workers)} worker(s) heard from recently")
        return workers

"""What the queen does, without HTTP: one method per operation."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from rbee_common.config import HiveEntry
from rbee_common.daemon import package_version
from rbee_common.errors import NotImplementedYet
from rbee_common.jobs import JobContext
from rbee_common.wire import HiveHealth, Operation, QueenStatus, Status, WorkerInfo, WorkerListActive
from rbee_queen.config import QueenConfig
from rbee_queen.registry import WorkerRegistry


def hive_url(entry: HiveEntry) -> str:
    host = f"[{entry.host}]" if ":" in entry.host else entry.host
    return f"http://{host}:{entry.hive_port}"


class QueenService:
    def __init__(self, config: QueenConfig, *, http: httpx.AsyncClient) -> None:
        self.config = config
        self._http = http
        self.workers = WorkerRegistry(stale_after_s=config.settings.worker_stale_s)

    async def handle(self, operation: Operation, context: JobContext) -> Any:
        match operation:
            case Status():
                return await self.status(context)
            case WorkerListActive():
                return self.worker_list_active(context)
            case _:
                raise NotImplementedYet(
                    f"Operation `{operation.name}` is not implemented yet in this queen.",
                    details={"operation": operation.name},
                    hint="Upgrade rbee; `rbee-keeper status` works today.",
                )

    async def probe_hive(self, hive_id: str, entry: HiveEntry) -> HiveHealth:
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

    def worker_list_active(self, context: JobContext) -> list[WorkerInfo]:
        workers = self.workers.active()
        context.narrate("worker_list_active", f"{len(workers)} worker(s) heard from recently")
        return workers

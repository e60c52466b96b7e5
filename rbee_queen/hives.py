"""Hive operations from the queen: forwarded over HTTP, or direct under --local-hive.

Over HTTP the operation becomes a job on the hive; its events are relayed
into the queen's job as they come, and its result is returned. Under
`--local-hive` the `localhost` hive is a `HiveService` in the queen's own
process (the one sanctioned import of `rbee_hive`, DESIGN §1), and the
operation is a method call.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import msgspec
import trio

from rbee_common.client import JobClient
from rbee_common.config import HiveEntry
from rbee_common.errors import NotFound, RbeeError
from rbee_common.jobs import JobContext, detached_context
from rbee_common.wire import ModelGet, Operation, Result
from rbee_hive.service import HiveService


def hive_url(entry: HiveEntry) -> str:
    host = f"[{entry.host}]" if ":" in entry.host else entry.host
    return f"http://{host}:{entry.hive_port}"


class HiveRouter:
    def __init__(
        self, hives: dict[str, HiveEntry], *, http: httpx.AsyncClient, local: HiveService | None
    ) -> None:
        self.hives = hives
        self.http = http
        self.local = local

    def ids(self) -> list[str]:
        return list(self.hives)

    def entry(self, hive_id: str) -> HiveEntry:
        entry = self.hives.get(hive_id)
        if entry is None:
            raise NotFound(
                "No hive with that id is configured.", code="HIVE_NOT_FOUND",
                details={"hives": sorted(self.hives)},
                hint=f"Configured hives: {', '.join(sorted(self.hives))}.",
            )
        return entry

    def is_local(self, hive_id: str) -> bool:
        return self.local is not None and hive_id == "localhost"

    async def run(self, operation: Operation, hive_id: str, context: JobContext | None) -> Any:
        """Run a hive operation; its result as plain JSON values."""
        if self.is_local(hive_id) and self.local is not None:
            context = context or detached_context(operation, "queen")
            return msgspec.to_builtins(await self.local.handle(operation, context))
        client = JobClient(hive_url(self.entry(hive_id)), http=self.http)
        result: Any = None
        async with contextlib.aclosing(client.run(operation)) as events:
            async for event in events:
                if isinstance(event, Result):
                    result = event.value
                elif context is not None:
                    context.emit(event)
        return result

    async def has_model(self, hive_id: str, model: str) -> bool:
        if self.is_local(hive_id) and self.local is not None:
            return self.local.catalog.find(model) is not None
        try:
            await self.run(ModelGet(model=model, hive_id=hive_id), hive_id, None)
        except RbeeError:
            return False
        return True

    async def capabilities(self, hive_id: str) -> dict[str, Any]:
        if self.is_local(hive_id) and self.local is not None:
            value = msgspec.to_builtins(await trio.to_thread.run_sync(self.local.capabilities))
        else:
            response = await self.http.get(f"{hive_url(self.entry(hive_id))}/v1/capabilities", timeout=5.0)
            response.raise_for_status()
            value = response.json()
        if not isinstance(value, dict):
            raise NotFound("The hive answered no capabilities.")
        return value

"""Hive operations from the queen: forwarded over HTTP, or direct under --local-hive.

Over HTTP the operation becomes a job on the hive; its events are relayed
into the queen's job as they come, and its result is returned. Under
`--local-hive` the `localhost` hive is a `HiveService` in the queen's own
process (the one sanctioned import of `rbee_hive`, DESIGN §1), and the
operation is a method call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import trio

from rbee_common.auth import bearer
from rbee_common.client import JobClient
from rbee_common.config import HiveEntry
from rbee_common.errors import NotFound, RbeeError, ServiceUnavailable, error_from_response
from rbee_common.jobs import JobContext, detached_context
from rbee_common.wire import ModelGet, Operation, Result
from rbee_hive.service import HiveService
from rbee_queen.ssh import real_host


def hive_url(entry: HiveEntry) -> str:
    """Where the hive answers HTTP: its host as SSH reaches it (a ~/.ssh/config alias resolved)."""
    host = real_host(entry.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{entry.hive_port}"


class HiveRouter:
    def __init__(
        self, hives: dict[str, HiveEntry], *, http: httpx.AsyncClient, local: HiveService | None,
        token_for: Callable[[str], str | None] = lambda hive_id: None,
    ) -> None:
        self.hives = hives
        self.http = http
        self.local = local
        self.token_for = token_for
        """The token a hive (and its workers) want from us."""
        self.reload: Callable[[], None] | None = None
        """Reads the hives from the config file again (into `hives`, in place)."""

    def headers(self, hive_id: str) -> dict[str, str]:
        return bearer(self.token_for(hive_id))

    def ids(self) -> list[str]:
        return list(self.hives)

    def entry(self, hive_id: str) -> HiveEntry:
        entry = self.hives.get(hive_id)
        if entry is None and self.reload is not None:
            self.reload()  # `rbee-keeper hive add` may have added it since the queen started
            entry = self.hives.get(hive_id)
        if entry is None:
            raise NotFound(  # the other hives' names are not for whoever asked
                "No hive with that id is configured.", code="HIVE_NOT_FOUND",
                hint="See the configured hives with `rbee-keeper hive list`.",
            )
        return entry

    def is_local(self, hive_id: str) -> bool:
        return self.local is not None and hive_id == "localhost"

    async def run(self, operation: Operation, hive_id: str, context: JobContext | None) -> Any:
        """Run a hive operation; its result as plain JSON values."""
        if self.is_local(hive_id) and self.local is not None:
            context = context or detached_context(operation, "queen")
            return msgspec.to_builtins(await self.local.handle(operation, context))
        client = JobClient(hive_url(self.entry(hive_id)), http=self.http, token=self.token_for(hive_id))
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
            url = f"{hive_url(self.entry(hive_id))}/v1/capabilities"
            try:
                response = await self.http.get(url, timeout=5.0, headers=self.headers(hive_id))
            except httpx.HTTPError as error:
                raise ServiceUnavailable(
                    f"Hive {hive_id} did not answer: {type(error).__name__}.", code="HIVE_UNREACHABLE",
                    hint=f"Is it running? rbee-keeper hive status {hive_id}",
                ) from None
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.content)
            value = response.json()
        if not isinstance(value, dict):
            raise NotFound("The hive answered no capabilities.")
        return value

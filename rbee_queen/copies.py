"""Models copied between hives instead of downloaded again from the Hub.

When a hive is to download a model (`model_download`), the queen looks for
another hive that has it and is reached over HTTP; that hive gives a ticket
for the model's files (`model_share`) and the hive that needs it copies them
over the LAN, resuming and checking each file's sha256
(`rbee_hive/sharing.py`, `Downloader.copy`). The Hub is the fallback when no
hive has it, or when the copy fails, unless the operator named the source
(`model download --from-hive`). A replica placed on a hive without its model
(`replicas.py`) has it copied from a hive that has it, never downloaded.

A download of the same model already under way on another hive (started
through this queen) is waited for, and then copied: a LAN copy of a finished
file is faster than a second download from the Internet, and never two
downloads of one model leave the building at once.
"""

from __future__ import annotations

import logging
import time

import msgspec
import trio

from rbee_common.errors import RbeeError, ValidationFailed
from rbee_common.jobs import JobContext
from rbee_common.wire import CatalogEntry, CopySource, CopyUnderWay, ModelDownload, ModelShare
from rbee_queen.fleet.hives import HiveRouter

log = logging.getLogger("rbee.queen.copies")


class Copies:
    def __init__(self, router: HiveRouter) -> None:
        self.router = router
        self.fetching: dict[str, tuple[str, trio.Event]] = {}
        """model -> (the hive downloading it through this queen, set when that ends)."""
        self.under_way: dict[tuple[str, str], tuple[str, float]] = {}
        """(model, target hive) -> (source hive, when it started): the copies in progress."""

    async def download(self, operation: ModelDownload, context: JobContext) -> CatalogEntry:
        """`model_download` on `operation.hive_id`: from another hive when one has it, else the Hub."""
        if operation.source is not None:
            raise ValidationFailed("`source` is the queen's to set; name a hive with `from_hive`.",
                                   details={"field": "source"})
        target = self.router.get(operation.hive_id)
        if await target.has_model(operation.model):
            return await target.run(operation, context)
        key = operation.model  # (two spellings of one model are two keys: only a wait is lost)
        origin = operation.from_hive
        if origin is None:
            origin = await self.holder(operation.model, operation.hive_id)
        if origin is None and key in self.fetching and self.fetching[key][0] != operation.hive_id:
            fetcher, done = self.fetching[key]
            context.narrate("model_download", f"Hive {fetcher} is downloading {key} already: waiting for "
                            "it to finish, then copying from it", model=key, hive_id=fetcher)
            await done.wait()
            origin = await self.holder(operation.model, operation.hive_id)
        if origin is not None:
            try:
                return await self.copy(operation, origin, context)
            except RbeeError as error:
                if operation.from_hive is not None:
                    raise
                context.narrate("model_download", f"The copy from hive {origin} failed ({error.message}); "
                                "downloading from the Hub instead", level="warn", model=key)
        return await self._from_hub(key, operation, context)

    async def _from_hub(self, key: str, operation: ModelDownload, context: JobContext) -> CatalogEntry:
        if key in self.fetching:  # the same hive again: it joins its own transfer
            return await self.router.get(operation.hive_id).run(operation, context)
        done = trio.Event()
        self.fetching[key] = (operation.hive_id, done)
        try:
            return await self.router.get(operation.hive_id).run(operation, context)
        finally:
            del self.fetching[key]
            done.set()

    async def copy(self, operation: ModelDownload, origin: str, context: JobContext) -> CatalogEntry:
        """Copy the model to `operation.hive_id` from hive `origin`."""
        source_hive = self.router.get(origin)
        if source_hive.in_process:
            raise ValidationFailed(
                f"Hive {origin} runs inside the queen (--local-hive): other hives cannot read its files.",
                details={"field": "from_hive"}, hint="Copy from a hive reached over the network.")
        grant = await source_hive.run(ModelShare(model=operation.model, hive_id=origin), context)
        context.narrate("model_download", f"Copying {grant.entry.id} ({grant.entry.size_bytes / 1e6:.0f} MB) "
                        f"from hive {origin} instead of the Hub", model=grant.entry.id, hive_id=origin)
        source = CopySource(url=source_hive.url, hive_id=origin, ticket=grant.ticket, entry=grant.entry,
                            sizes=grant.sizes)
        copied = msgspec.structs.replace(operation, from_hive=None, source=source)
        self.under_way[(operation.model, operation.hive_id)] = (origin, time.monotonic())
        try:
            return await self.router.get(operation.hive_id).run(copied, context)
        finally:
            self.under_way.pop((operation.model, operation.hive_id), None)

    def listing(self) -> list[CopyUnderWay]:
        now = time.monotonic()
        return [CopyUnderWay(model=model, hive_id=target, from_hive=origin, since_s=round(now - began, 1))
                for (model, target), (origin, began) in sorted(self.under_way.items())]

    async def holder(self, model: str, target: str) -> str | None:
        """A hive reached over HTTP, other than `target`, whose catalog has `model`."""
        found: list[str] = []

        async def ask(hive_id: str) -> None:
            hive = self.router.get(hive_id)
            try:
                if await hive.has_model(model):
                    found.append(hive_id)
            except RbeeError as error:
                log.info("hive %s cannot say whether it has %s: %s", hive_id, model, error.code)

        async with trio.open_nursery() as nursery:
            for hive_id in self.router.ids():
                if hive_id != target and not self.router.get(hive_id).in_process:
                    nursery.start_soon(ask, hive_id)
        return sorted(found)[0] if found else None

"""What the hive does, without HTTP: one method per operation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio

from rbee_common.audit import AuditLog, AuthFailures
from rbee_common.config import HiveSettings, data_dir, state_dir
from rbee_common.errors import WrongDaemon
from rbee_common.jobs import JobContext
from rbee_common.wire import (
    Capabilities,
    CatalogEntry,
    CopySource,
    Infer,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    ModelShare,
    Op,
    RpcServe,
    RpcStop,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
    WorkerStop,
)
from rbee_hive.catalog import Catalog
from rbee_hive.devices import available_backends, detect_devices, disk_free, mark_unusable
from rbee_hive.downloads import Downloader
from rbee_hive.metrics import HiveMetrics
from rbee_hive.rpc import RpcServers
from rbee_hive.sharing import Tickets, grant
from rbee_hive.workers import Workers


class HiveService:
    def __init__(self, settings: HiveSettings, nursery: trio.Nursery, *, token: str | None = None) -> None:
        self.settings = settings
        root = Path(settings.data_dir) if settings.data_dir else data_dir()
        self.catalog = Catalog(root / "models")
        self.downloads = Downloader(
            self.catalog, nursery, stall_s=settings.download_stall_s, attempts=settings.download_attempts,
            reserve_bytes=settings.disk_reserve_bytes,
        )
        self.workers = Workers(settings, self.catalog, nursery, log_dir=state_dir() / "workers", token=token)
        self.rpc = RpcServers(settings, nursery, log_dir=state_dir() / "rpc")
        """llama.cpp RPC servers lending this hive's devices to workers on other hives."""
        self.workers.extra_cpu_threads = self.rpc.cpu_threads
        self.audit = AuditLog.of_daemon(f"hive-{settings.hive_id}.jsonl", component="hive", settings=settings)
        self.auth_failures = AuthFailures(self.audit, settings.audit_failure_window_s)
        self.metrics = HiveMetrics()
        self.tickets = Tickets()
        """What this hive gave the queen for other hives to copy its models (`model_share`)."""
        self.downloads.metrics = self.workers.metrics = self.metrics
        self.metrics.watch(detect_devices, self.workers.list, lambda: {
            model: (transfer.done, transfer.total) for model, transfer in self.downloads.transfers.items()})
        self.workers.on_idle_stop = lambda worker: self.audit.record(
            "worker.stop", actor="hive (idle timeout)", outcome="stopping", worker_id=worker.worker_id,
            model=worker.model)
        self.workers.on_evict = lambda worker: self.audit.record(
            "worker.stop", actor="hive (room for another model)", outcome="stopping",
            worker_id=worker.worker_id, model=worker.model)

    async def handle(self, operation: Op[object], context: JobContext) -> object:
        match operation:
            case Infer():
                raise WrongDaemon(
                    "A hive does not run inference: `infer` reached a hive, which is a "
                    "routing bug in the caller.",
                    hint="Send inference to the queen; it talks to workers directly.",
                )
            case WorkerSpawn():
                return await self.workers.spawn(operation, context)
            case WorkerList():
                async with self.workers.http() as http:
                    await self.workers.check_all(http)  # live state and slots
                workers = self.workers.list()
                context.narrate("worker_list", f"{len(workers)} worker(s) on this hive")
                return workers
            case WorkerGet(worker_id=worker_id):
                return self.workers.get(worker_id)
            case WorkerStop(worker_id=worker_id):
                return await self.workers.stop(worker_id, context)
            case ModelDownload(model=model, source=None):
                return await self.downloads.download(model, context)
            case ModelDownload(source=CopySource() as source):
                return await self.downloads.copy(source, context)
            case ModelShare(model=model):
                given = await trio.to_thread.run_sync(grant, self.catalog, self.tickets, model)
                context.narrate("model_share", f"{given.entry.id} may be copied from this hive for "
                                f"{given.expires_s / 60:.0f} min", model=given.entry.id)
                return given
            case RpcServe():
                total, used = self.workers.cpu_budget()
                return await self.rpc.serve(operation, context, free_threads=total - used)
            case RpcStop(server_id=server_id):
                return await self.rpc.stop(server_id, context)
            case ModelList(provider=provider):
                models = [m for m in self.catalog.list() if provider is None or m.provider == provider]
                context.narrate("model_list", f"{len(models)} model(s) in the catalog")
                return models
            case ModelGet(model=model):
                return self.catalog.get(model)
            case ModelDelete(model=model):
                return self.model_delete(model, context)
            case _:
                raise WrongDaemon(
                    f"Operation `{operation.name}` is a queen operation, not a hive one.",
                    details={"operation": operation.name},
                    hint="Send it to the queen.",
                )

    def apply_settings(self, settings: HiveSettings) -> None:
        """A changed config (SIGHUP), for what a running hive can change."""
        self.settings = self.workers.settings = settings
        self.audit.max_bytes = settings.audit_max_bytes
        self.audit.max_total_bytes = settings.audit_max_total_bytes
        self.auth_failures.window_s = settings.audit_failure_window_s

    def heartbeat_to(self, queen_url: str) -> None:
        """The queen the workers it starts from now on heartbeat to (the in-process hive learns its
        queen's address once the queen has bound its port)."""
        self.apply_settings(msgspec.structs.replace(self.settings, queen_url=queen_url))

    def model_delete(self, ref: str, context: JobContext) -> CatalogEntry:
        entry = self.catalog.get(ref)
        deleted = self.catalog.delete(ref, in_use=self.workers.uses_model(entry))
        context.narrate("model_delete", f"Deleted {deleted.id} ({deleted.size_bytes / 1e6:.0f} MB)")
        return deleted

    def capabilities(self) -> Capabilities:
        """Blocking (NVML, disk): call it in a thread."""
        return Capabilities(  # the counts are this hive's, the devices this machine's
            hive_id=self.settings.hive_id, backends=available_backends(),
            # a hive of synthetic workers (tests, benchmarks) needs no llama.cpp on its GPUs
            devices=detect_devices() if self.settings.synthetic_backend else mark_unusable(detect_devices()),
            disk_free_bytes=disk_free(self.catalog.root), models=len(self.catalog.list()),
            workers=len(self.workers.list()),
        )

"""What the queen does, without HTTP: one method per operation."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

import httpx
import msgspec
import trio

from rbee_common import deadlines
from rbee_common.audit import AuditLog, AuthFailures
from rbee_common.auth import TokenSource, bearer, new_token, request_source
from rbee_common.daemon import package_version
from rbee_common.errors import (
    HiveNotFound,
    NotImplementedYet,
    RbeeError,
    ValidationFailed,
    WorkerFailed,
)
from rbee_common.http import OpenStreams
from rbee_common.jobs import JobContext, detached_context
from rbee_common.modelref import catalog_id
from rbee_common.wire import (
    CatalogEntry,
    Embed,
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    HiveDetails,
    HiveGet,
    HiveHealth,
    HiveInstall,
    HiveList,
    HiveListing,
    HiveRefreshCapabilities,
    HiveStart,
    HiveStatus,
    HiveStop,
    HiveUninstall,
    Infer,
    InferenceToken,
    InferResult,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    ModelShare,
    Op,
    QueenStatus,
    SshTest,
    Status,
    WorkerGet,
    WorkerList,
    WorkerListActive,
    WorkerRecord,
    WorkerScale,
    WorkerSpawn,
    WorkerStop,
    check_embed_inputs,
)
from rbee_hive.service import HiveService
from rbee_queen.config import QueenConfig
from rbee_queen.copies import Copies
from rbee_queen.dialects.common import Usage
from rbee_queen.dialects.responses.routes import ResponseStore
from rbee_queen.fleet.hives import HiveRouter, InProcessHive
from rbee_queen.fleet.remote import Remote
from rbee_queen.fleet.split import Splits
from rbee_queen.heartbeats import Heartbeats
from rbee_queen.inference import Served, generate
from rbee_queen.metrics import QueenMetrics
from rbee_queen.registry import WorkerRegistry
from rbee_queen.replicas import Replicas
from rbee_queen.scheduler import Scheduler
from rbee_queen.worker_client import WorkerClient, WorkerLanes, with_retries

_PRIVATE_FIELDS = frozenset({"identity_file", "token_file", "wheelhouse"})
"""Paths on the queen's machine (keys, tokens): the operator's config has them, API clients do not."""


class QueenService:
    def __init__(
        self, config: QueenConfig, *, http: httpx.AsyncClient, nursery: trio.Nursery, remote: Remote,
        local_hives: Sequence[HiveService] = (), tokens: TokenSource | None = None,
        lanes: WorkerLanes | None = None,
    ) -> None:
        self.config = config
        self._http = http
        self._lanes = lanes or WorkerLanes()
        """To workers: HTTP/2, many streams on each connection."""
        self.streams = OpenStreams()
        """The OpenAI streams being answered: SIGTERM ends each with a terminator."""
        settings = config.settings
        self.tokens = tokens or TokenSource.fixed(config.api_token)
        """The token clients present; SIGHUP reads its file again (`TokenSource.reload`)."""
        self.metrics = QueenMetrics()
        self.workers = WorkerRegistry(stale_after_s=settings.worker_stale_s)
        self.workers.on_drop = self.metrics.worker_dropped
        self.audit = AuditLog.of_daemon("queen.jsonl", component="queen", settings=settings)
        self.auth_failures = AuthFailures(self.audit, settings.audit_failure_window_s)
        self.responses = ResponseStore(lambda: self.config.settings.responses_max_stored,
                                       lambda: self.config.settings.responses_ttl_s)
        """The Responses API's stored answers (store=true)."""
        self.remote = remote
        self.local_hives = list(local_hives)
        """Hive services running in this process (--local-hive)."""
        in_process = [InProcessHive("localhost", hive, token=lambda: self.token) for hive in local_hives]
        self.router = HiveRouter(config.hives, http=http, token_for=remote.token,
                                 installed_for=remote.installed, in_process=in_process)
        self.router.reload = config.reload_hives
        self.scheduler = Scheduler(
            self.workers, self.router, queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s, cold_start=settings.cold_start,
        )
        self.worker_client = WorkerClient(self._lanes, self.workers, self.worker_headers)
        """Every call to a worker (inference, embeddings, token counts, cancels)."""
        self.scheduler.mint_tokens = self.token is not None
        self.scheduler.use_settings(settings)
        self.scheduler.on_cold_start = self.audit_cold_start
        self.scheduler.metrics = self.metrics
        self.metrics.watch(self.workers, lambda: self.scheduler.waiting)
        self.copies = Copies(self.router)
        self.splits = Splits(self.router, remote, nursery, self.scheduler.registry)
        self.scheduler.split = self.splits.spawn
        self.scheduler.pull = self.pull_on_demand if self.pulls_on_demand() else None
        self.scheduler.known_models = self.catalog_ids
        """Workers whose layers span hives (llama.cpp RPC): their servers and SSH tunnels."""
        self.replicas = Replicas(self.scheduler, lambda: self.config.settings,
                                 lambda: {self.config.model_ref(m): s for m, s in self.config.models.items()})
        self.replicas.copies = self.copies
        self.heartbeats = Heartbeats(
            self.workers, nursery=nursery, queen_token=lambda: self.token, hive_token=self.hive_token,
            hive_ids=self.router.ids, placement=lambda hive_id: self.router.get(hive_id).placement(),
            ask_hive=lambda op: self.router.get(op.hive_id).run(op, None),
        )

    @property
    def token(self) -> str | None:
        return self.tokens.current

    @property
    def in_process_hive(self) -> bool:
        """Some hive runs inside this queen (--local-hive)."""
        return any(hive.in_process for hive in self.router.hives.values())

    def audit_cold_start(
        self, model: str, hive_id: str, spawned: WorkerRecord | None, error: str | None, job_id: str | None
    ) -> None:
        self.audit.record("worker.spawn", actor="queen (cold start)",
                          outcome="failed" if error else "completed",
                          correlation_id=job_id or str(uuid.uuid4()),
                          model=model, hive_id=hive_id,
                          **({"worker_id": spawned.worker_id} if spawned is not None else {}),
                          **({"error": error} if error else {}))

    def audit_auth_success(self, identity: str) -> None:
        self.audit.record("auth.success", actor=identity, outcome="ok")

    def audit_auth_failure(self, reason: str, identity: str | None, path: str) -> None:
        self.metrics.auth_failed(reason)
        self.auth_failures.refused(request_source(), reason, identity, path)

    def worker_headers(self, worker: WorkerRecord) -> dict[str, str]:
        """What a worker wants from us: its own token, else (a worker that beat with it) its hive's."""
        return bearer(self.workers.token(worker.worker_id) or self.hive_token(worker.hive_id))

    async def handle(self, operation: Op[object], context: JobContext) -> object:
        """Run one operation; the result is the type the operation declares (`wire.py`)."""
        if isinstance(operation, WorkerSpawn | WorkerScale | ModelDownload | ModelGet | ModelDelete):
            named = self.config.model_ref(operation.model)  # an alias names its model here too
            if named != operation.model:
                operation = msgspec.structs.replace(operation, model=named)
        match operation:
            case Status():
                return await self.status(context)
            case WorkerListActive(model=model, device=device):
                return self.worker_list_active(context, model=model, device=device)
            case WorkerScale(model=model, replicas=replicas):
                return await self.replicas.ensure(model, replicas, context)
            case HiveList():
                self.config.reload_hives()
                return [HiveListing(hive_id=hive.hive_id, url=hive.url, local=hive.in_process,
                                    installed=hive.installed())
                        for hive in self.router.all()]
            case Infer():
                return await self.infer(operation, context)
            case Embed(model=model, input=texts, dimensions=dimensions):
                context.narrate("embed", f"Embedding {len(texts)} input(s) with {model}", model=model)
                return await self.embed(model, EmbedRequest(input=list(texts), dimensions=dimensions))
            case HiveGet(hive_id=hive_id):
                hive, entry = self.router.get(hive_id), self.router.entry(hive_id)
                shown = {k: v for k, v in msgspec.structs.asdict(entry).items() if k not in _PRIVATE_FIELDS}
                return HiveDetails(hive_id=hive_id, url=hive.url, local=hive.in_process, **shown)
            case HiveStatus(hive_id=hive_id):
                hive = self.router.get(hive_id)
                health = msgspec.structs.replace(
                    await hive.health(self.config.settings.hive_probe_timeout_s),
                    installed=hive.installed(), attached=hive_id in self.remote.attached)
                context.narrate("hive_status", f"Hive {hive_id}: " + (
                    "reachable" if health.reachable else f"{health.problem}"), hive_id=hive_id)
                return health
            case HiveRefreshCapabilities(hive_id=hive_id):
                caps = await self.router.get(hive_id).capabilities()
                context.narrate("hive_refresh_capabilities",
                                f"Hive {hive_id}: {len(caps.devices)} device(s)", hive_id=hive_id)
                return caps
            case SshTest() | HiveInstall() | HiveUninstall() | HiveStart() | HiveStop():
                return await self.lifecycle(operation, context)
            case WorkerSpawn(helpers=helpers) if helpers:
                if operation.rpc or operation.tensor_split:
                    raise ValidationFailed(
                        "rpc and tensor_split are the queen's to set: name the helper hives only.",
                        details={"operation": "worker_spawn"})
                token = new_token() if self.token is not None else None
                spawned = await self.splits.spawn(
                    msgspec.structs.replace(operation, worker_token=operation.worker_token or token),
                    context)
                if token is not None and operation.worker_token is None:
                    self.workers.bind(spawned.worker_id, token)
                return spawned
            case WorkerSpawn(hive_id=hive_id) if self.token is not None and operation.worker_token is None:
                token = new_token()  # the worker's own credential, which it cannot use as its hive's
                spawned = await self.router.get(hive_id).run(
                    msgspec.structs.replace(operation, worker_token=token), context)
                self.workers.bind(spawned.worker_id, token)
                return spawned
            case WorkerStop(worker_id=worker_id, hive_id=hive_id):
                stopped = await self.router.get(hive_id).run(operation, context)
                self.workers.forget(worker_id, "stopped through the queen", "stopped")
                return stopped
            case ModelDownload():
                return await self.copies.download(operation, context)
            case WorkerSpawn() | WorkerList() | WorkerGet() | ModelList() | ModelGet() | ModelDelete() \
                    | ModelShare():
                return await self.router.get(operation.hive_id).run(operation, context)
        raise NotImplementedYet(  # unreachable while every operation has its case: mypy checks it
            f"This queen does not handle the operation `{operation.name}`.",
            details={"operation": operation.name},
            hint="Run the same rbee version on the keeper and the queen.",
        )

    def pulls_on_demand(self) -> bool:
        """`[queen] pull_on_demand`; by default, only for a queen on loopback (one user's machine)."""
        settings = self.config.settings
        if settings.pull_on_demand is not None:
            return settings.pull_on_demand
        return settings.host in ("127.0.0.1", "localhost", "::1")

    async def pull_on_demand(self, model: str, hive_id: str, context: JobContext | None) -> CatalogEntry:
        """A Hub model no hive has, downloaded to `hive_id` for a request that names it (its
        progress narrated to the request's job)."""
        operation = ModelDownload(model=model, hive_id=hive_id)
        job = context or detached_context(operation, "queen (pull on demand)")
        job.narrate("pull_on_demand", f"No hive has {model}: downloading it to hive {hive_id} first "
                    "([queen] pull_on_demand)", model=model, hive_id=hive_id)
        entry = await self.copies.download(operation, job)
        job.narrate("pull_on_demand", f"{model} is on hive {hive_id} as {entry.id}; starting its worker",
                    model=model, catalog_id=entry.id)
        return entry

    def hive_token(self, hive_id: str) -> str | None:
        """What a hive and its workers want from us (None for a hive we do not know)."""
        try:
            return self.router.get(hive_id).credential()
        except HiveNotFound:
            return None

    async def lifecycle(
        self, operation: SshTest | HiveInstall | HiveUninstall | HiveStart | HiveStop, context: JobContext
    ) -> object:
        """Hive lifecycle over SSH (DESIGN §7)."""
        alias = operation.hive_id
        entry = self.router.get(alias).ssh_entry()
        match operation:
            case SshTest():
                return await self.remote.ssh_test(alias, entry, context)
            case HiveInstall(force=force):
                return await self.remote.install(alias, entry, context, force=force)
            case HiveUninstall(purge=purge):
                return await self.remote.uninstall(alias, entry, context, purge=purge)
            case HiveStart(detached=detached):
                return await self.remote.start(alias, entry, context, detached=detached)
            case HiveStop():
                result = await self.remote.stop(alias, entry, context)
                for worker in self.workers.active():
                    if worker.hive_id == alias:
                        self.workers.forget(worker.worker_id, f"hive {alias} stopped", "stopped")
                return result

    # --- inference ----------------------------------------------------------------

    async def generate(
        self, model: str, params: GenerationParams, usage: Usage, deadline: str | None = None,
    ) -> AsyncGenerator[InferenceToken, None]:
        async with contextlib.aclosing(generate(
            self.scheduler, self.worker_client, self.config.model_ref(model), params,
            attempts=self.config.settings.infer_attempts, served=usage, deadline=deadline,
            metrics=self.metrics,
        )) as pieces:
            async for piece in pieces:
                yield piece

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        """Vectors from a worker of `model` (cold-started like any other)."""
        check_embed_inputs(request.input)
        body = msgspec.json.encode(request)
        answer = await self._ask_worker(model, "/v1/embeddings", body, "these embeddings")
        return msgspec.json.decode(answer, type=EmbedResult)

    async def count_tokens(self, model: str, params: GenerationParams) -> int:
        """The prompt's tokens as a worker of `model` renders and tokenizes it (chat template, tools)."""
        body = msgspec.json.encode(params)  # the worker reads it as an InferenceRequest
        answer = await self._ask_worker(model, "/v1/count-tokens", body, "this token count")
        return int(msgspec.json.decode(answer, type=dict[str, int])["tokens"])

    async def _ask_worker(self, model: str, path: str, body: bytes, what: str) -> bytes:
        """One JSON call to a worker of `model`, chosen (or cold-started) by the scheduler, retried
        as inference is (`worker_client.with_retries`)."""
        model = self.config.model_ref(model)

        async def acquire(excluded: frozenset[str]) -> WorkerRecord:
            return await self.scheduler.acquire(model, None, excluded)

        async def attempt(worker: WorkerRecord, _: int) -> AsyncGenerator[bytes, None]:
            yield await self.worker_client.call(worker, path, body, what)

        async with contextlib.aclosing(with_retries(
            acquire, self.scheduler.release, attempt, attempts=self.config.settings.infer_attempts,
        )) as answers:
            async for answer in answers:
                return answer
        raise WorkerFailed(f"No worker answered {what}.")  # (with_retries yields or raises)

    async def infer(self, operation: Infer, context: JobContext) -> InferResult:
        if operation.hive_id is not None:
            self.router.get(operation.hive_id)  # an unknown hive is HIVE_NOT_FOUND, not "no hive reachable"
        served = Served()
        text: list[str] = []
        deadline = deadlines.current.get()  # the job's (POST /v1/jobs sets the default one)
        async with contextlib.aclosing(generate(
            self.scheduler, self.worker_client, self.config.model_ref(operation.model), operation,
            attempts=self.config.settings.infer_attempts, context=context, served=served,
            hive_id=operation.hive_id, deadline=deadline, metrics=self.metrics,
        )) as pieces:
            async for piece in pieces:
                context.token(piece.t, len(text))
                text.append(piece.t)
        return InferResult(
            text="".join(text), model=operation.model, worker_id=served.worker_id, tokens_in=served.tokens_in,
            tokens_out=served.tokens_out, stop_reason=served.stop_reason, attempts=served.attempts,
            tokens_cached=served.tokens_cached,
        )

    async def catalog_ids(self) -> list[str]:
        return sorted({entry.id for _, entry in await self.catalogs()})

    async def catalogs(self) -> list[tuple[str, CatalogEntry]]:
        """Every hive's catalog entries, each with its hive's id; a hive that does not answer
        within 3 s is left out, not waited for."""
        found: list[tuple[str, CatalogEntry]] = []

        async def catalog(hive_id: str) -> None:
            with contextlib.suppress(RbeeError), trio.move_on_after(3.0):
                entries = await self.router.get(hive_id).run(ModelList(hive_id=hive_id), None)
                found.extend((hive_id, entry) for entry in entries)

        async with trio.open_nursery() as nursery:
            for hive_id in self.router.ids():
                nursery.start_soon(catalog, hive_id)
        return found

    async def models(self) -> dict[str, int | None]:
        """Models a request can name (what workers serve and what hive catalogs hold), each with
        the context it was trained for, where its hives say (the most any says)."""
        found: dict[str, int | None] = {w.model: None for w in self.workers.active()}
        for _, entry in await self.catalogs():
            known = found.get(entry.id)
            found[entry.id] = max(known or 0, entry.context_length or 0) or None
        for alias, settings in self.config.models.items():  # a short name, as the model it names
            if settings.ref is not None and (target := catalog_id(self.config.model_ref(alias))) in found:
                found[alias] = found[target]
        return dict(sorted(found.items()))

    # --- status ---------------------------------------------------------------------

    async def status(self, context: JobContext) -> QueenStatus:
        self.config.reload_hives()
        hives = self.router.ids()
        context.narrate("status", f"Checking {len(hives)} hive(s)")
        results: dict[str, HiveHealth] = {}

        async def probe(hive_id: str) -> None:
            health = await self.router.get(hive_id).health(self.config.settings.hive_probe_timeout_s)
            results[hive_id] = health
            context.narrate(
                "hive_probe",
                f"Hive {hive_id}: " + ("reachable" if health.reachable else f"{health.problem}"),
                level="info" if health.reachable else "warn",
                hive_id=hive_id,
                reachable=health.reachable,
            )

        async with trio.open_nursery() as nursery:
            for hive_id in hives:
                nursery.start_soon(probe, hive_id)
        return QueenStatus(
            version=package_version(),
            hives=[results[hive_id] for hive_id in hives],
            workers=[msgspec.structs.replace(
                worker, slots_busy=max(worker.slots_busy, self.scheduler.load.get(worker.worker_id, 0)),
                tokens_per_s=_round(self.metrics.worker_rate.get(worker.worker_id)))
                for worker in self.workers.active()],
            queues={model: count for model, count in sorted(self.scheduler.waiting.items()) if count},
            oldest_wait_s={model: round(time.monotonic() - line[0].since, 1)
                           for model, line in sorted(self.scheduler.lines.items()) if line},
            added={model: sum(1 for m in self.replicas.added.values() if m == model)
                   for model in sorted(set(self.replicas.added.values()))},
            copies=self.copies.listing(),
        )

    def worker_list_active(
        self, context: JobContext, *, model: str | None = None, device: str | None = None
    ) -> list[WorkerRecord]:
        workers = [w for w in self.workers.active()
                   if (model is None or w.model == model) and (device is None or w.device == device)]
        context.narrate("worker_list_active", f"{len(workers)} worker(s) heard from recently")
        return workers


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)

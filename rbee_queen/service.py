"""What the queen does, without HTTP: one method per operation."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import msgspec
import trio

from rbee_common import deadlines
from rbee_common.audit import AuditLog
from rbee_common.auth import TokenSource, bearer, new_token
from rbee_common.config import HiveEntry, state_dir
from rbee_common.daemon import package_version
from rbee_common.errors import InvalidRequest, NotImplementedYet, RbeeError, error_from_response
from rbee_common.http import OpenStreams
from rbee_common.jobs import JobContext
from rbee_common.wire import (
    HIVE_OPERATIONS,
    Embed,
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    HiveGet,
    HiveHealth,
    HiveInstall,
    HiveList,
    HiveRefreshCapabilities,
    HiveStart,
    HiveStatus,
    HiveStop,
    HiveUninstall,
    Infer,
    InferenceToken,
    ModelList,
    Operation,
    QueenStatus,
    SshTest,
    Status,
    WorkerInfo,
    WorkerListActive,
    WorkerSpawn,
    WorkerStop,
)
from rbee_hive.service import HiveService
from rbee_queen.config import QueenConfig
from rbee_queen.dialects import Usage
from rbee_queen.heartbeats import Heartbeats, Placement
from rbee_queen.hives import HiveRouter, hive_url
from rbee_queen.inference import WORKER_TIMEOUT, Served, WorkerFailed, WorkerLanes, generate
from rbee_queen.registry import WorkerRegistry
from rbee_queen.remote import Remote
from rbee_queen.scheduler import Scheduler
from rbee_queen.ssh import real_host

_PRIVATE_FIELDS = frozenset({"identity_file", "token_file", "wheelhouse"})
"""Paths on the queen's machine (keys, tokens): the operator's config has them, API clients do not."""


class InferResult(msgspec.Struct, kw_only=True):
    text: str
    model: str
    worker_id: str
    tokens_in: int
    tokens_out: int
    stop_reason: str
    attempts: int
    tokens_cached: int = 0


class QueenService:
    def __init__(
        self, config: QueenConfig, *, http: httpx.AsyncClient, nursery: trio.Nursery,
        local_hive: HiveService | None = None, remote: Remote | None = None,
        tokens: TokenSource | None = None, lanes: WorkerLanes | None = None,
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
        self.workers = WorkerRegistry(stale_after_s=settings.worker_stale_s)
        self.audit = AuditLog(state_dir() / "audit" / "queen.jsonl", component="queen",
                              max_bytes=settings.audit_max_bytes)
        self.local_hive = local_hive
        self.remote = remote
        self.router = HiveRouter(config.hives, http=http, local=local_hive, token_for=self.hive_token)
        self.router.reload = config.reload_hives
        self.scheduler = Scheduler(
            self.workers, self.router, queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s, cold_start=settings.cold_start,
        )
        self.scheduler.mint_tokens = self.token is not None
        self.scheduler.on_cold_start = self.audit_cold_start
        self.heartbeats = Heartbeats(
            self.workers, nursery=nursery, queen_token=lambda: self.token, hive_token=self.hive_token,
            hive_ids=self.router.ids, placement=self.placement,
            ask_hive=lambda op: self.router.run(op, op.hive_id, None),
        )

    @property
    def token(self) -> str | None:
        return self.tokens.current

    def audit_cold_start(
        self, model: str, hive_id: str, spawned: Any, error: str | None, job_id: str | None
    ) -> None:
        worker_id = spawned.get("worker_id") if isinstance(spawned, dict) else None
        self.audit.record("worker.spawn", actor="queen (cold start)",
                          outcome="failed" if error else "completed",
                          correlation_id=job_id or str(uuid.uuid4()),
                          model=model, hive_id=hive_id,
                          **({"worker_id": worker_id} if isinstance(worker_id, str) else {}),
                          **({"error": error} if error else {}))

    def audit_auth_success(self, identity: str) -> None:
        self.audit.record("auth.success", actor=identity, outcome="ok")

    def audit_auth_failure(self, reason: str, identity: str | None, path: str) -> None:
        self.audit.record("auth.failure", actor=identity or "anonymous", outcome="refused", reason=reason,
                          path=path)

    def placement(self, hive_id: str) -> Placement:
        """Where a hive's workers may register from (HIVE_NOT_FOUND for a hive we do not know)."""
        entry = self.router.entry(hive_id)
        if self.router.is_local(hive_id):
            hive = self.config.hive
            return Placement(hive.host, hive.worker_port_min, hive.worker_port_max)
        return Placement(real_host(entry.host), entry.worker_port_min, entry.worker_port_max)

    def worker_headers(self, worker: WorkerInfo) -> dict[str, str]:
        """What a worker wants from us: its own token, else (a worker that beat with it) its hive's."""
        return bearer(self.workers.token(worker.worker_id) or self.hive_token(worker.hive_id))

    async def handle(self, operation: Operation, context: JobContext) -> Any:
        match operation:
            case Status():
                return await self.status(context)
            case WorkerListActive(model=model, device=device):
                return self.worker_list_active(context, model=model, device=device)
            case HiveList():
                self.config.reload_hives()
                return [{"hive_id": hive_id, "url": hive_url(entry), "local": self.router.is_local(hive_id),
                         "installed": self.installed(hive_id)}
                        for hive_id, entry in self.config.hives.items()]
            case Infer():
                return await self.infer(operation, context)
            case Embed(model=model, input=texts, dimensions=dimensions):
                context.narrate("embed", f"Embedding {len(texts)} input(s) with {model}", model=model)
                return await self.embed(model, EmbedRequest(input=list(texts), dimensions=dimensions))
            case HiveGet(hive_id=hive_id):
                entry = self.router.entry(hive_id or "localhost")
                shown = {k: v for k, v in msgspec.to_builtins(entry).items() if k not in _PRIVATE_FIELDS}
                return {"hive_id": hive_id or "localhost", "url": hive_url(entry),
                        "local": self.router.is_local(hive_id or "localhost"), **shown}
            case HiveStatus(hive_id=hive_id):
                alias = hive_id or "localhost"
                health = await self.probe_hive(alias, self.router.entry(alias))
                health = msgspec.structs.replace(
                    health, installed=self.installed(alias),
                    attached=self.remote is not None and alias in self.remote.attached)
                context.narrate("hive_status", f"Hive {alias}: " + (
                    "reachable" if health.reachable else f"{health.problem}"), hive_id=alias)
                return health
            case HiveRefreshCapabilities(hive_id=hive_id):
                alias = hive_id or "localhost"
                caps = await self.router.capabilities(alias)
                context.narrate("hive_refresh_capabilities",
                                f"Hive {alias}: {len(caps.get('devices', []))} device(s)", hive_id=alias)
                return caps
            case SshTest() | HiveInstall() | HiveUninstall() | HiveStart() | HiveStop():
                return await self.lifecycle(operation, context)
            case WorkerSpawn(hive_id=hive_id) if self.token is not None and operation.worker_token is None:
                token = new_token()  # the worker's own credential, which it cannot use as its hive's
                spawned = await self.router.run(
                    msgspec.structs.replace(operation, worker_token=token), hive_id, context)
                if isinstance(spawned, dict) and isinstance(spawned.get("worker_id"), str):
                    self.workers.bind(spawned["worker_id"], token)
                return spawned
            case WorkerStop(worker_id=worker_id, hive_id=hive_id):
                stopped = await self.router.run(operation, hive_id or "localhost", context)
                self.workers.forget(worker_id, "stopped through the queen")
                return stopped
            case op if isinstance(op, HIVE_OPERATIONS):
                hive_id = getattr(op, "hive_id", None) or "localhost"
                return await self.router.run(op, hive_id, context)
            case _:
                raise NotImplementedYet(
                    f"This queen does not handle the operation `{operation.name}`.",
                    details={"operation": operation.name},
                    hint="Run the same rbee version on the keeper and the queen.",
                )

    def hive_token(self, hive_id: str) -> str | None:
        """What a hive and its workers want from us; under --local-hive, our own token."""
        if self.router.is_local(hive_id):
            return self.token
        return self.remote.token(hive_id) if self.remote is not None else None

    def installed(self, hive_id: str) -> bool | None:
        """Installed by this queen over SSH (None: not ours to say, as for the in-process hive)."""
        if self.router.is_local(hive_id) or self.remote is None:
            return None
        return self.remote.installs.record(hive_id) is not None

    async def lifecycle(
        self, operation: SshTest | HiveInstall | HiveUninstall | HiveStart | HiveStop, context: JobContext
    ) -> Any:
        """Hive lifecycle over SSH (DESIGN §7)."""
        alias = operation.hive_id or "localhost"
        entry = self.router.entry(alias)
        if self.router.is_local(alias) or self.remote is None:
            raise InvalidRequest(
                f"Hive {alias} runs inside this queen (--local-hive); it has no SSH lifecycle.",
                code="HIVE_IS_LOCAL", hint="Restart the queen to restart it.",
            )
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
                        self.workers.forget(worker.worker_id, f"hive {alias} stopped")
                return result

    # --- inference ----------------------------------------------------------------

    async def generate(
        self, model: str, params: GenerationParams, usage: Usage, deadline: str | None = None,
    ) -> AsyncGenerator[InferenceToken, None]:
        served = Served()
        async with contextlib.aclosing(generate(
            self.scheduler, self.workers, self._lanes, model, params,
            attempts=self.config.settings.infer_attempts, served=served,
            headers=self.worker_headers, deadline=deadline,
        )) as pieces:
            async for piece in pieces:
                yield piece
        usage.prompt_tokens, usage.completion_tokens = served.tokens_in, served.tokens_out
        usage.cached_tokens = served.tokens_cached
        usage.finish_reason = served.stop_reason
        usage.stop_sequence = served.stop_sequence

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        """Vectors from a worker of `model` (cold-started like any other); a worker that cannot be
        reached is left for another, as for inference."""
        excluded: set[str] = set()
        attempts = self.config.settings.infer_attempts
        for _ in range(attempts):
            worker = await self.scheduler.acquire(model, None, frozenset(excluded))
            try:
                with self._lanes.lane(worker.url, worker.slots_total) as http:
                    response = await http.post(
                        f"{worker.url}/v1/embeddings", content=msgspec.json.encode(request),
                        headers={"Content-Type": "application/json", **self.worker_headers(worker)},
                        timeout=WORKER_TIMEOUT)
            except httpx.TransportError as error:
                self.workers.forget(worker.worker_id, f"embedding request failed ({type(error).__name__})")
                excluded.add(worker.worker_id)
                continue
            finally:
                self.scheduler.release(worker.worker_id)
            if response.status_code >= 400:
                raise error_from_response(response.status_code, response.content)
            return msgspec.json.decode(response.content, type=EmbedResult)
        raise WorkerFailed(f"The embedding request failed on {attempts} worker(s).",
                           hint="Check the workers (`worker_list_active`) and the hives' logs.")

    async def infer(self, operation: Infer, context: JobContext) -> InferResult:
        if operation.hive_id is not None:
            self.router.entry(operation.hive_id)  # an unknown hive is HIVE_NOT_FOUND, not "no hive reachable"
        params = GenerationParams(**{f: getattr(operation, f) for f in GenerationParams.__struct_fields__})
        served = Served()
        text: list[str] = []
        deadline = deadlines.current.get()  # the job's (POST /v1/jobs sets the default one)
        async with contextlib.aclosing(generate(
            self.scheduler, self.workers, self._lanes, operation.model, params,
            attempts=self.config.settings.infer_attempts, context=context, served=served,
            hive_id=operation.hive_id, headers=self.worker_headers, deadline=deadline,
        )) as pieces:
            async for piece in pieces:
                context.token(piece.t, len(text))
                text.append(piece.t)
        return InferResult(
            text="".join(text), model=operation.model, worker_id=served.worker_id, tokens_in=served.tokens_in,
            tokens_out=served.tokens_out, stop_reason=served.stop_reason, attempts=served.attempts,
            tokens_cached=served.tokens_cached,
        )

    async def catalogs(self) -> list[dict[str, Any]]:
        """Every hive's catalog entries, each with its `hive_id`; a hive that does not answer
        within 3 s is left out, not waited for."""
        found: list[dict[str, Any]] = []

        async def catalog(hive_id: str) -> None:
            with contextlib.suppress(RbeeError, httpx.HTTPError, OSError), trio.move_on_after(3.0):
                if self.router.is_local(hive_id) and self.local_hive is not None:
                    entries = msgspec.to_builtins(self.local_hive.catalog.list())
                else:
                    entries = await self.router.run(ModelList(hive_id=hive_id), hive_id, None)
                found.extend({**entry, "hive_id": hive_id}
                             for entry in entries or [] if isinstance(entry, dict))

        async with trio.open_nursery() as nursery:
            for hive_id in self.router.ids():
                nursery.start_soon(catalog, hive_id)
        return found

    async def model_names(self) -> list[str]:
        """Models a request can name: what workers serve and what hive catalogs hold."""
        names = {w.model for w in self.workers.active()}
        names.update(str(entry["id"]) for entry in await self.catalogs())
        return sorted(names)

    # --- status ---------------------------------------------------------------------

    async def probe_hive(self, hive_id: str, entry: HiveEntry) -> HiveHealth:
        if self.router.is_local(hive_id):
            return HiveHealth(hive_id=hive_id, url="in-process", reachable=True)
        url = hive_url(entry)
        timeout = self.config.settings.hive_probe_timeout_s
        problem: str | None = None
        version: str | None = None
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
            else:
                with contextlib.suppress(ValueError, AttributeError):
                    version = response.json().get("version")
        return HiveHealth(
            hive_id=hive_id, url=url, reachable=problem is None, problem=problem, version=version)

    async def status(self, context: JobContext) -> QueenStatus:
        self.config.reload_hives()
        hives = dict(self.config.hives)
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

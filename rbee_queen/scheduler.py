"""Choosing a worker for each request (DESIGN §3).

`pick_worker` is the pure part: among workers serving the model, ready or
busy, the least loaded one with a free slot. The `Scheduler` adds what needs
time: a bounded wait per model when every slot is taken, first come first
served (429 when the queue is full, 503 at the deadline), and a cold start when no worker serves the
model at all: a `worker_spawn` on the best hive, narrated into the request.
Load is what the queen itself has sent and not yet seen finish; heartbeats
lag by up to one period, so they only add and remove workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

import msgspec
import trio

from rbee_common.auth import new_token
from rbee_common.config import QueenSettings
from rbee_common.errors import ModelNotFound, NoHive, NoWorker, QueueFull, QueueTimeout, RbeeError
from rbee_common.jobs import JobContext, detached_context
from rbee_common.modelref import catalog_id, hub_reference
from rbee_common.prefixes import Block, held_share
from rbee_common.wire import WorkerHeartbeat, WorkerRecord, WorkerSpawn
from rbee_queen.fleet.hives import HiveRouter
from rbee_queen.metrics import QueenMetrics
from rbee_queen.placement import Option, gather, need_bytes, place, plan_beyond_one_device
from rbee_queen.registry import WorkerRegistry

log = logging.getLogger("rbee.queen.scheduler")
ROUTABLE = ("ready", "busy")
MAX_SESSIONS = 10_000
"""Sessions whose worker the queen remembers; the oldest are forgotten first."""


class Ticket:
    """A request waiting in its model's line: whom to tell what the queen does about the wait."""

    __slots__ = ("context", "since")

    def __init__(self, context: JobContext | None) -> None:
        self.context = context
        self.since = time.monotonic()


def serves(worker: WorkerRecord, model: str, aliases: Mapping[str, str]) -> bool:
    return worker.model == model or worker.model == aliases.get(model)


class Prefer(msgspec.Struct, frozen=True, kw_only=True):
    """Prefix routing for one request: its prompt's blocks, what each worker holds, and the rule
    (SGLang's cache-aware router: the cache decides above a share unless load is out of balance)."""

    blocks: list[Block]
    held: Mapping[str, Collection[int]]
    min_share: float = 0.5
    margin: int = 4
    session_worker: str | None = None
    """Where the request's session (a client's conversation key) went last: it wins ties, and takes
    the request when no prefix decides."""


def pick_worker(
    workers: Sequence[WorkerRecord], model: str, *, load: Mapping[str, int],
    aliases: Mapping[str, str] | None = None, exclude: frozenset[str] = frozenset(),
    prefer: Prefer | None = None,
) -> WorkerRecord | None:
    """The worker of `model` with a free slot that holds most of the prompt's prefix (`prefer`)
    while it runs at most `margin` requests more than the least loaded; else the least loaded."""
    return pick_worker_why(workers, model, load=load, aliases=aliases, exclude=exclude, prefer=prefer)[0]


def pick_worker_why(
    workers: Sequence[WorkerRecord], model: str, *, load: Mapping[str, int],
    aliases: Mapping[str, str] | None = None, exclude: frozenset[str] = frozenset(),
    prefer: Prefer | None = None,
) -> tuple[WorkerRecord | None, str]:
    """`pick_worker`, and why: `cache` (it holds the prefix), `session` (its session's worker) or
    `load` (the least loaded)."""
    free = [
        w for w in workers
        if serves(w, model, aliases or {}) and w.state in ROUTABLE and w.worker_id not in exclude
        and load.get(w.worker_id, 0) < w.slots_total
    ]
    if not free:
        return None, "none"

    held = prefer.held if prefer is not None else {}

    def busy(worker: WorkerRecord) -> tuple[float, int, int, str]:
        """Its share of slots in use; among equals, the one holding the fewest prefixes (as SGLang
        sends a request no cache matches to the smallest tree), which spreads new conversations."""
        used = load.get(worker.worker_id, 0)
        return used / worker.slots_total, used, len(held.get(worker.worker_id, ())), worker.worker_id

    least = min(free, key=busy)
    if prefer is None or len(free) < 2:
        return least, "load"

    def balanced(worker: WorkerRecord) -> bool:
        return load.get(worker.worker_id, 0) - load.get(least.worker_id, 0) <= prefer.margin

    shares = {w.worker_id: held_share(prefer.blocks, prefer.held.get(w.worker_id, ())) for w in free}
    best = max(free, key=lambda w: (shares[w.worker_id], w.worker_id == prefer.session_worker,
                                    [-x for x in busy(w)[:2]]))
    if shares[best.worker_id] >= prefer.min_share and balanced(best):
        return best, "cache"
    session = next((w for w in free if w.worker_id == prefer.session_worker), None)
    if session is not None and balanced(session) and shares[session.worker_id] >= shares[best.worker_id]:
        return session, "session"
    return least, "load"



class Scheduler:
    def __init__(
        self, registry: WorkerRegistry, router: HiveRouter, *, queue_size: int, queue_timeout_s: float,
        cold_start: bool,
    ) -> None:
        self.registry = registry
        self.router = router
        self.split: Callable[[WorkerSpawn, JobContext], Awaitable[WorkerRecord]] = self._no_split
        self.known_models: Callable[[], Awaitable[list[str]]] = self._no_models
        """The models the fleet's hives have (set by the queen), for the error naming them."""
        self.pull: Callable[[str, str, JobContext | None], Awaitable[object]] | None = None
        """Downloads a Hub model (`hf:…`) to a hive before its cold start (`[queen] pull_on_demand`,
        set by the queen); None: a model no hive has is refused."""
        """Spawns a worker whose layers span hives (`rbee_queen.fleet.split`, set by the queen)."""
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.cold_start_enabled = cold_start
        self.prefix_routing = True
        self.prefix_min_share = 0.5
        self.prefix_load_margin = 4
        self.sessions: dict[str, str] = {}
        """A client's session key -> the worker its last request went to (least recent first)."""
        self.mint_tokens = False
        """Give each worker we start a token of its own (when the queen runs with a token)."""
        self.on_cold_start: Callable[[str, str, WorkerRecord | None, str | None, str | None], None] = (
            lambda *_: None)
        """(model, hive_id, the spawn's result or None, error code or None, job id): the audit log."""
        self.metrics: QueenMetrics | None = None
        self.load: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        """worker_id -> when a request last took or gave back one of its slots (monotonic)."""
        self.waiting: dict[str, int] = {}
        self.aliases: dict[str, str] = {}
        """Requested model -> the name its workers report (a catalog id)."""
        self._changed = trio.Event()
        self._cold: dict[str, trio.Event] = {}
        self.lines: dict[str, list[Ticket]] = {}
        """Per model, the requests waiting for a slot, first come first: only the first may take
        one, and a new request queues behind them."""
        registry.on_change = self.notify

    def use_settings(self, settings: QueenSettings) -> None:
        """The prefix routing's settings (at start and on SIGHUP)."""
        self.prefix_routing = settings.prefix_routing
        self.prefix_min_share = settings.prefix_min_share
        self.prefix_load_margin = settings.prefix_load_margin

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def routable(self, min_ctx: int = 0) -> list[WorkerRecord]:
        """The workers a request may go to; with `min_ctx`, only those whose sequences hold it."""
        workers = self.registry.routable()
        return [w for w in workers if w.ctx >= min_ctx] if min_ctx else workers

    def candidates(self, model: str, exclude: frozenset[str], min_ctx: int = 0) -> list[WorkerRecord]:
        return [w for w in self.routable(min_ctx) if serves(w, model, self.aliases)
                and w.worker_id not in exclude and w.state != "draining"]

    async def acquire(
        self, model: str, context: JobContext | None, exclude: frozenset[str], hive_id: str | None = None,
        *, min_ctx: int = 0, blocks: list[Block] | None = None, session: str | None = None,
    ) -> WorkerRecord:
        """A worker slot for one request (on `hive_id` if given, with sequences of at least `min_ctx`
        tokens if given: a cold start makes one); call `release` when it ends."""
        deadline = trio.current_time() + self.queue_timeout_s
        queued = False
        queued_at = 0.0
        given = exclude
        ticket = Ticket(context)
        try:
            while True:
                line = self.lines.setdefault(model, [])
                if hive_id is not None:  # workers of other hives do not count
                    exclude = given | {w.worker_id for w in self.registry.routable() if w.hive_id != hive_id}
                first = not line or line[0] is ticket  # first come, first served
                prefer = Prefer(
                    blocks=blocks, held=self.registry.prefixes, min_share=self.prefix_min_share,
                    margin=self.prefix_load_margin, session_worker=self.sessions.get(session or ""),
                ) if blocks and self.prefix_routing else None
                worker, why = pick_worker_why(self.routable(min_ctx), model, load=self.load,
                                              aliases=self.aliases, exclude=exclude,
                                              prefer=prefer) if first else (None, "none")
                if worker is not None:
                    self.load[worker.worker_id] = self.load.get(worker.worker_id, 0) + 1
                    self.last_used[worker.worker_id] = time.monotonic()
                    if session:
                        self.sessions.pop(session, None)
                        self.sessions[session] = worker.worker_id
                        while len(self.sessions) > MAX_SESSIONS:
                            del self.sessions[next(iter(self.sessions))]
                    if blocks:  # it will hold this prompt: the next turn can find it before a heartbeat
                        self.registry.sent(worker.worker_id, [block.hash for block in blocks])
                    if self.metrics is not None and prefer is not None:
                        self.metrics.routing.labels(why).inc()
                    return worker
                if not self.candidates(model, exclude, min_ctx):
                    await self.cold_start(model, context, hive_id, ctx=min_ctx or None)
                    continue
                if not queued:
                    if self.waiting.get(model, 0) >= self.queue_size:
                        raise QueueFull(
                            f"All workers of this model are busy and {self.queue_size} requests wait.",
                            retry_after_s=2, hint="Retry later, or start more workers of this model.",
                        )
                    self.waiting[model] = self.waiting.get(model, 0) + 1
                    queued, queued_at = True, time.monotonic()
                    ticket.since = queued_at
                    line.append(ticket)
                    if context is not None:
                        context.narrate("queued", "Every worker of this model is busy; waiting for a slot")
                changed = self._changed
                with trio.move_on_at(deadline) as scope:
                    await changed.wait()
                if scope.cancelled_caught:
                    raise QueueTimeout(
                        f"No worker slot became free within {self.queue_timeout_s:g} s.",
                        hint="Retry later, or start more workers of this model.",
                    )
        finally:
            if queued:
                self.waiting[model] -= 1
                line = self.lines[model]
                line.remove(ticket)
                if not line:
                    del self.lines[model]
                self.notify()  # the next in line may go
                if self.metrics is not None:
                    self.metrics.queue_wait.labels(model).observe(time.monotonic() - queued_at)

    def release(self, worker_id: str) -> None:
        self.load[worker_id] = max(self.load.get(worker_id, 0) - 1, 0)
        self.last_used[worker_id] = time.monotonic()
        self.notify()

    async def cold_start(
        self, model: str, context: JobContext | None, hive_id: str | None = None, *, ctx: int | None = None,
    ) -> None:
        """Start a worker of `model` (with sequences of `ctx` tokens if given) on the best hive."""
        if not self.cold_start_enabled:
            raise NoWorker(
                "No worker serves this model, and cold starts are off.",
                hint="Spawn one with `worker_spawn`, or set [queen] cold_start = true.",
            )
        key = f"{model}@{ctx}" if ctx else model
        running = self._cold.get(key)
        if running is not None:
            if context is not None:
                context.narrate("cold_start", "A worker for this model is starting; waiting for it")
            await running.wait()
            return
        done = self._cold[key] = trio.Event()
        began = time.monotonic()
        try:
            hub = hub_reference(model)  # one Hub model, however it is spelled
            if hub is not None and not ctx:
                for name in (hub, catalog_id(hub)):  # the reference as spawned before, or its catalog id
                    if name != model and self.candidates(name, frozenset()):
                        self.aliases[model] = self.aliases.get(name, name)
                        return
            known = hub or model
            pick = await self.best_hive(known, only=hive_id)
            hive_id, device = pick.hive_id, pick.device
            why = (f"No worker of {model} has room for a prompt of this length; starting one with a "
                   f"context of {ctx} tokens" if ctx else f"No worker serves {model}; starting one")
            said = f"{why} on hive {hive_id} ({device})" + (f": {pick.why}" if pick.why else "")
            log.info("%s", said)
            if context is not None:
                context.narrate("cold_start", said, hive_id=hive_id, device=device,
                                helpers=list(pick.helpers))
            try:
                if hub is not None and not pick.has_model and self.pull is not None:
                    await self.pull(hub, hive_id, context)
                try:
                    spawned = await self.start_worker(known, hive_id, device, context, ctx=ctx,
                                                      helpers=pick.helpers)
                except ModelNotFound:
                    if not pick.has_model:  # no hive has it: say what there is
                        await self._unknown(model, hub)
                    raise
                self.aliases[model] = spawned.model  # (the spelling asked for, too)
            except RbeeError:
                if self.metrics is not None:  # (no model label: a failed one may name no model at all)
                    self.metrics.cold_starts.labels("failed").inc()
                raise
            if self.metrics is not None:
                self.metrics.cold_starts.labels("completed").inc()
                self.metrics.cold_start_duration.labels(model).observe(time.monotonic() - began)
        finally:
            del self._cold[key]
            done.set()
            self.notify()

    async def start_worker(
        self, model: str, hive_id: str, device: str, context: JobContext | None, *, ctx: int | None = None,
        keep: bool = False, helpers: Sequence[str] = (),
    ) -> WorkerRecord:
        """Spawn a worker of `model` on `device` of `hive_id` (audited) and route to it at once;
        `keep`: its hive does not stop it when idle; `helpers`: hives that hold part of its layers."""
        token = new_token() if self.mint_tokens else None
        job_id = context.job_id if context else None
        try:
            spawn = WorkerSpawn(model=model, device=device, hive_id=hive_id, worker_token=token, ctx=ctx,
                                keep=keep, helpers=list(helpers))
            if helpers:
                spawned = await self.split(spawn, context or detached_context(spawn, "queen (cold start)"))
            else:
                spawned = await self.router.get(hive_id).run(spawn, context)
        except RbeeError as error:
            self.on_cold_start(model, hive_id, None, error.code, job_id)
            raise
        self.on_cold_start(model, hive_id, spawned, None, job_id)
        self.register_spawned(model, hive_id, spawned, token)
        return spawned

    def register_spawned(self, model: str, hive_id: str, spawned: WorkerRecord, token: str | None) -> None:
        """Route to a worker we started at once, without waiting for its first heartbeat.

        Its hive just answered for it, so it is confirmed; `token` is the one we minted for it.
        """
        self.aliases[model] = spawned.model
        self.registry.record(WorkerHeartbeat(
            worker_id=spawned.worker_id, hive_id=hive_id, url=spawned.url, model=spawned.model,
            backend=spawned.backend, device=spawned.device, state="ready",
            slots_total=spawned.slots_total, slots_busy=0, pid=spawned.pid, ctx=spawned.ctx,
        ))
        self.registry.confirm(spawned.worker_id, token)
        self.last_used[spawned.worker_id] = time.monotonic()

    async def _no_models(self) -> list[str]:
        return []

    async def _unknown(self, model: str, hub: str | None) -> None:
        """No hive has `model`: say which models there are, and how to get this one."""
        names = sorted(await self.known_models())
        listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        if hub is not None:
            hint = ("Download it first: rbee-keeper model download hf:<org>/<repo>[:<quant>] (or set "
                    "[queen] pull_on_demand = true to download on first use).")
        else:
            hint = ("Name one of those, or get a model from the Hub: rbee-keeper model download "
                    "hf:<org>/<repo>[:<quant>] (rbee-keeper model list shows what each hive has).")
        # (the name asked for is not echoed: the client knows it, and a log or proxy need not)
        raise ModelNotFound("No hive has that model." + (f" The fleet has: {listed}." if names else ""),
                            details={"models": names[:100]}, hint=hint)

    async def _no_split(self, spawn: WorkerSpawn, context: JobContext) -> WorkerRecord:
        raise NoHive("This queen cannot split a model over hives.", hint="Give the model a hive with room.")

    async def best_hive(self, model: str, only: str | None = None) -> Option:
        """The best device of the fleet for a first worker of `model` (`placement.place`), among those
        with room for it; for a model no device holds, a hive's GPUs together or several hives
        (`placement.plan_beyond_one_device`); else the best there is (its preflight then says why)."""
        options = await gather(self.router, model, only=only)
        need = need_bytes(options)
        roomy = [o for o in options if need is None or o.free_bytes >= need]
        picks = place(roomy, 1, taken=set(), cpu_hives=set())
        if not picks and need is not None and (plan := plan_beyond_one_device(options, need)) is not None:
            return plan
        picks = picks or place(options, 1, taken=set(), cpu_hives=set())
        if not picks:
            raise NoHive(
                "No hive is reachable to start a worker on.",
                hint="Start a hive (`rbee-keeper hive start`), or run the queen with --local-hive.",
            )
        return picks[0]

"""More workers for a busy model, and fewer when it is quiet again.

The queen watches its lines: when the oldest request waiting for a model has
waited `[queen] scale_after_s` (a quarter of it when the line is a whole round
deep: as many requests as the model's workers have slots), it starts more
workers of that model, as many as the line would keep busy (its length over a
worker's slots, less those already starting), at most `max_workers_per_model`
(0: as many as there are devices to put them on). Each goes on the best free device of the fleet: a hive
that already has the model's file first, then a GPU before a CPU, then the
most free memory; never a second worker of the model on one device, nor a
second CPU worker on one hive's cores. The waiting requests stay in line and go
to whichever worker frees first. Every decision is narrated into the waiting
requests and logged ("queue of 9 for smollm2-135m waited 2.1 s: starting a
second worker on gpu-node-2 GPU-0"), and counted (`rbee_queen_replicas_total`).

A worker started this way that has been idle `replica_idle_s` is stopped while
its model has another worker: the model's first worker goes last, by its
hive's idle timeout, as before.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import trio

from rbee_common.config import ModelSettings, QueenSettings
from rbee_common.errors import RbeeError
from rbee_common.jobs import JobContext, detached_context
from rbee_common.wire import ModelDownload, WorkerRecord, WorkerStop
from rbee_queen.copies import Copies
from rbee_queen.placement import Option, gather, place
from rbee_queen.scheduler import Scheduler, serves

log = logging.getLogger("rbee.queen.replicas")

TICK_S = 0.25
"""How often the lines are looked at."""
FAILED_DEVICE_S = 60.0
"""A device where a worker of a model failed to start is not tried for that model for this long."""
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def wanted(waiting: int, *, workers: int, starting: int, slots: int, limit: int) -> int:
    """How many more workers to start for a line of `waiting` requests: enough that each waiting
    request has a slot (`slots` a worker), less those `starting`; with a `limit` (0: none), no more
    than it allows beside the `workers` running."""
    need = -(-waiting // max(slots, 1)) - starting
    if limit:
        need = min(need, limit - workers - starting)
    return max(need, 0)


def ordinal(n: int) -> str:
    return ORDINALS[n - 1] if 0 < n <= len(ORDINALS) else f"{n}th"


class Replicas:
    """The loop over the scheduler's lines and the registry's workers that adds and stops workers,
    and the `worker_scale` operation."""

    def __init__(
        self, scheduler: Scheduler, settings: Callable[[], QueenSettings],
        models: Callable[[], Mapping[str, ModelSettings]] = dict,
    ) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.models = models
        """The `[models.<id>]` sections (`min_workers`), as the config has them now."""
        self.starting: dict[str, int] = {}
        """model -> workers being started for it now."""
        self.added: dict[str, str] = {}
        """worker_id -> model: the workers added for a line (only these are stopped when idle)."""
        self.failed: dict[tuple[str, str, str], float] = {}
        """(model, hive, device) -> until when that device is not tried again for that model; with
        no hive and device, until when no device is looked for (none was free)."""
        self.stopping: set[str] = set()
        self.copies: Copies | None = None
        """Gets the model onto a hive that lacks it before a worker starts there."""
        self.placing: set[tuple[str, str, str]] = set()
        """(model, hive, device) of the workers being started: taken as if running."""

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(TICK_S)
                settings = self.settings()
                self.keep_up(nursery)
                if settings.replicas:
                    self.scale_out(nursery, settings)
                    self.scale_in(nursery, settings)

    @staticmethod
    async def _safely(work: Callable[[], Awaitable[object]]) -> None:
        """A task of the loop: a bug in it is logged, and neither the loop nor the queen ends."""
        try:
            await work()
        except Exception as error:
            log.error("adding or stopping workers failed", exc_info=error)

    def workers_of(self, model: str) -> list[WorkerRecord]:
        scheduler = self.scheduler
        return [w for w in scheduler.registry.routable() if serves(w, model, scheduler.aliases)]

    def _reserve(self, model: str, count: int) -> None:
        self.starting[model] = self.starting.get(model, 0) + count

    def scale_out(self, nursery: trio.Nursery, settings: QueenSettings) -> None:
        """Workers for the lines whose first request has waited `scale_after_s`, or a quarter of it
        when a whole round waits (as many requests as the model's workers have slots)."""
        now = time.monotonic()
        for model, line in list(self.scheduler.lines.items()):
            if not line or self.failed.get((model, "", ""), 0.0) > now:
                continue
            workers = self.workers_of(model)
            if not workers:
                continue  # a cold start is the scheduler's
            deep = len(line) >= sum(w.slots_total for w in workers)
            if now - line[0].since < settings.scale_after_s / (4 if deep else 1):
                continue
            count = wanted(len(line), workers=len(workers), starting=self.starting.get(model, 0),
                           slots=max(w.slots_total for w in workers), limit=settings.max_workers_per_model)
            if not count:
                continue
            waiting, waited = len(line), now - line[0].since

            def said(n: int, pick: Option, waiting: int = waiting, waited: float = waited,
                     model: str = model) -> str:
                return (f"queue of {waiting} for {model} waited {waited:.1f} s: starting a {ordinal(n)} "
                        f"worker on {pick.hive_id} {pick.device}")

            self._reserve(model, count)
            nursery.start_soon(self._safely, functools.partial(self.grow, model, count, said, line=True))

    def keep_up(self, nursery: trio.Nursery) -> None:
        """Start the workers `[models.<id>] min_workers` wants and does not have (at start, after a
        crash or a stop)."""
        now = time.monotonic()
        for model, wants in self.models().items():
            missing = wants.min_workers - len(self.workers_of(model)) - self.starting.get(model, 0)
            if missing <= 0 or self.failed.get((model, "", ""), 0.0) > now:
                continue

            def said(n: int, pick: Option, model: str = model, wants: int = wants.min_workers) -> str:
                return (f"{model} keeps at least {wants} worker(s) (min_workers): starting a {ordinal(n)} "
                        f"worker on {pick.hive_id} {pick.device}")

            self._reserve(model, missing)
            nursery.start_soon(self._safely, functools.partial(self.grow, model, missing, said, keep=True))

    async def ensure(self, model: str, replicas: int, context: JobContext) -> list[WorkerRecord]:
        """`worker_scale`: at least `replicas` workers of `model`, the missing ones placed as a
        line's are; the model's workers after it."""
        missing = replicas - len(self.workers_of(model)) - self.starting.get(model, 0)
        if missing <= 0:
            context.narrate("worker_scale", f"{model} has {len(self.workers_of(model))} worker(s) already")
            return self.workers_of(model)

        def said(n: int, pick: Option) -> str:
            return f"{model}: starting a {ordinal(n)} worker on {pick.hive_id} {pick.device}"

        self._reserve(model, missing)
        started = await self.grow(model, missing, said, context=context)
        if len(started) < missing:
            context.narrate("worker_scale", f"Only {len(started)} of {missing} more worker(s) of {model} "
                            "started: no other free device fits it (see the narration above)")
        return self.workers_of(model)

    async def grow(
        self, model: str, count: int, said: Callable[[int, Option], str], *, line: bool = False,
        keep: bool = False, context: JobContext | None = None,
    ) -> list[WorkerRecord]:
        """Start up to `count` (reserved in `starting`) workers of `model` on the best free devices,
        all at once; those that started."""
        scheduler = self.scheduler
        try:
            options = await self.options(model)
        except BaseException:
            self.starting[model] -= count
            raise
        running = scheduler.registry.routable()
        taken = {(w.hive_id, w.device) for w in running if serves(w, model, scheduler.aliases)}
        taken |= {(hive_id, device) for m, hive_id, device in self.placing if m == model}
        cpu_hives = {w.hive_id for w in running if w.device.startswith("CPU") and w.backend != "synthetic"}
        cpu_hives |= {hive_id for _, hive_id, device in self.placing if device.startswith("CPU")}
        picks = place(options, count, taken=taken, cpu_hives=cpu_hives)
        self.starting[model] -= count - len(picks)
        self.placing |= {(model, pick.hive_id, pick.device) for pick in picks}
        if not picks:
            log.info("no free device for another worker of %s", model)
            if context is not None:
                context.narrate("worker_scale", f"No free device for another worker of {model}")
            self.failed[(model, "", "")] = time.monotonic() + 5 * self.settings().scale_after_s
            return []
        first = len(self.workers_of(model)) + self.starting[model] - len(picks) + 1
        started: list[WorkerRecord] = []
        async with trio.open_nursery() as nursery:
            for k, pick in enumerate(picks):
                tell = said(first + k, pick)
                nursery.start_soon(functools.partial(self.start, model, pick, tell, started, line=line,
                                                     keep=keep, context=context))
        return started

    async def options(self, model: str) -> list[Option]:
        """Every device of every reachable hive, less those that failed this model lately."""
        now = time.monotonic()
        return await gather(self.scheduler.router, model,
                            skip=lambda hive_id, device: self.failed.get((model, hive_id, device), 0.0) > now)

    async def start(
        self, model: str, pick: Option, said: str, started: list[WorkerRecord], *, line: bool, keep: bool,
        context: JobContext | None,
    ) -> None:
        scheduler = self.scheduler
        log.info("%s", said)
        told = [t.context for t in scheduler.lines.get(model, []) if t.context is not None] if line else []
        for job in [*told, *([context] if context is not None else [])]:
            job.narrate("scale_out", said, model=model, hive_id=pick.hive_id, device=pick.device)
        try:
            copies = None if pick.has_model else self.copies
            holder = await copies.holder(model, pick.hive_id) if copies is not None else None
            if copies is not None and holder is not None:  # copied from a hive that has it first
                fetch = ModelDownload(model=model, hive_id=pick.hive_id)
                await copies.copy(fetch, holder, context or detached_context(fetch, "queen (replica)"))
            spawned = await scheduler.start_worker(model, pick.hive_id, pick.device, context, keep=keep)
        except RbeeError as error:
            log.warning("another worker of %s on %s %s failed to start: %s (%s)", model, pick.hive_id,
                        pick.device, error.message, error.code)
            if context is not None:
                context.narrate("scale_out", f"The worker on {pick.hive_id} {pick.device} failed to start: "
                                f"{error.message}", hive_id=pick.hive_id, device=pick.device)
            self.failed[(model, pick.hive_id, pick.device)] = time.monotonic() + FAILED_DEVICE_S
            self.count(model, "failed")
            return
        finally:
            self.starting[model] -= 1
            self.placing.discard((model, pick.hive_id, pick.device))
            scheduler.notify()
        if line:
            self.added[spawned.worker_id] = model
        started.append(spawned)
        self.count(model, "started")

    def scale_in(self, nursery: trio.Nursery, settings: QueenSettings) -> None:
        """Stop the workers added for a line that have been idle `replica_idle_s`, while their model
        keeps another (and its `min_workers`)."""
        scheduler = self.scheduler
        now = time.monotonic()
        live = {w.worker_id: w for w in scheduler.registry.routable()}
        for worker_id in [w for w in self.added if w not in live and w not in self.stopping]:
            del self.added[worker_id]  # gone by itself (stopped, crashed, its hive's idle timeout)
        for worker_id, model in list(self.added.items()):
            worker = live.get(worker_id)
            if (worker is None or worker_id in self.stopping or scheduler.load.get(worker_id, 0)
                    or scheduler.lines.get(model)
                    or now - scheduler.last_used.get(worker_id, now) < settings.replica_idle_s):
                continue
            others = [w for w in self.workers_of(model) if w.worker_id != worker_id
                      and w.worker_id not in self.stopping]
            floor = self.models().get(model, ModelSettings()).min_workers
            if not others or len(others) < floor:
                continue  # the last one goes by its hive's idle timeout
            self.stopping.add(worker_id)
            idle_s = now - scheduler.last_used.get(worker_id, now)
            log.info("worker %s of %s idle for %.0f s: stopping it (%d other(s) serve %s)", worker_id,
                     model, idle_s, len(others), model)
            scheduler.registry.forget(worker_id, f"idle for {idle_s:.0f} s, stopped by the queen", "stopped")
            nursery.start_soon(self._safely, functools.partial(self.stop, worker, model))

    async def stop(self, worker: WorkerRecord, model: str) -> None:
        """Stop a worker already out of routing (no request holds it)."""
        try:
            await self.scheduler.router.get(worker.hive_id).run(
                WorkerStop(worker_id=worker.worker_id, hive_id=worker.hive_id), None)
            # out again: a heartbeat it sent while stopping brought it back until it went stale
            self.scheduler.registry.forget(worker.worker_id, "stopped by the queen (idle)", "stopped")
            self.count(model, "stopped")
        except RbeeError as error:
            log.warning("stopping idle worker %s failed: %s", worker.worker_id, error.message)
        finally:
            self.stopping.discard(worker.worker_id)
            self.added.pop(worker.worker_id, None)

    def count(self, model: str, event: str) -> None:
        if self.scheduler.metrics is not None:
            self.scheduler.metrics.replicas.labels(model, event).inc()

"""Where a new worker goes: the devices of the fleet's hives, best first.

A hive that has the model's file first (no download), then a GPU before a
CPU, then the most free memory; never a second worker of a model on one
device, nor a second CPU worker on one hive's cores. The scheduler's cold
start takes the first; the queen's replicas take as many as they need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from rbee_common.errors import RbeeError
from rbee_queen.fleet.hives import HiveRouter

log = logging.getLogger("rbee.queen.placement")


@dataclass(frozen=True)
class Option:
    """A device a worker could start on."""

    hive_id: str
    device: str
    cpu: bool
    free_bytes: int
    has_model: bool
    model_bytes: int | None = None
    """The model's file on this hive, when it has it."""
    helpers: tuple[str, ...] = ()
    """Other hives that hold part of the layers (llama.cpp RPC): a model that fits no single hive."""
    why: str = ""
    """Said in the cold start's narration when the plan is more than one device."""


def place(
    options: Iterable[Option], count: int, *, taken: set[tuple[str, str]], cpu_hives: set[str],
) -> list[Option]:
    """Up to `count` devices for new workers of one model, best first: the model's file already
    there, a GPU before a CPU, the most free memory. `taken`: (hive, device) pairs running the model
    already; `cpu_hives`: hives whose CPU runs a worker (of any model). Both grow with the picks."""
    picks: list[Option] = []
    for option in sorted(options, key=lambda o: (o.has_model, not o.cpu, o.free_bytes), reverse=True):
        if len(picks) >= count:
            break
        if (option.hive_id, option.device) in taken or (option.cpu and option.hive_id in cpu_hives):
            continue
        picks.append(option)
        taken.add((option.hive_id, option.device))
        if option.cpu:
            cpu_hives.add(option.hive_id)
    return picks


NEED_FACTOR = 1.2
"""What a worker needs at least, per byte of its model's file (weights and compute buffers; the
cache comes on top, and the hive's preflight checks the whole)."""


def need_bytes(options: Iterable[Option]) -> int | None:
    """What a worker of the model needs at least, from the size of its file where a hive has it."""
    sizes = [o.model_bytes for o in options if o.model_bytes]
    return round(max(sizes) * NEED_FACTOR) if sizes else None


def plan_beyond_one_device(options: list[Option], need: int) -> Option | None:
    """For a model no single device holds: a hive's GPUs together, the fewest that hold it (the most
    free first); else the hives together, each with its roomiest device, the one with the file (then
    the most free) running the worker and the fewest others, the most free first, lending theirs.
    None when even that is too little."""
    by_hive: dict[str, list[Option]] = {}
    for option in options:
        by_hive.setdefault(option.hive_id, []).append(option)
    sets = []
    for hive_id, found in by_hive.items():
        gpus = sorted((o for o in found if not o.cpu and "," not in o.device), key=lambda o: -o.free_bytes)
        for count in range(2, len(gpus) + 1):
            chosen = gpus[:count]
            if sum(o.free_bytes for o in chosen) >= need:
                sets.append(Option(
                    hive_id, ",".join(sorted((o.device for o in chosen), key=lambda d: int(d[4:]))),
                    cpu=False, free_bytes=sum(o.free_bytes for o in chosen), has_model=chosen[0].has_model,
                    model_bytes=chosen[0].model_bytes,
                    why=f"it needs about {need / 1e9:.1f} GB and no single GPU has that free: "
                        f"{count} GPUs of {hive_id} together"))
                break
    if sets:
        return max(sets, key=lambda o: (o.has_model, -len(o.device), o.free_bytes))
    best = [max(found, key=lambda o: o.free_bytes) for found in by_hive.values()]
    best.sort(key=lambda o: (o.has_model, o.free_bytes), reverse=True)
    total, chosen = 0, []
    for option in best:
        chosen.append(option)
        total += option.free_bytes
        if total >= need:
            break
    if total < need or len(chosen) < 2:
        return None
    main, helpers = chosen[0], tuple(o.hive_id for o in chosen[1:])
    return Option(main.hive_id, main.device, main.cpu, main.free_bytes, main.has_model, main.model_bytes,
                  helpers=helpers,
                  why=f"it needs about {need / 1e9:.1f} GB and no single hive has that free: over "
                      f"{main.hive_id} and {', '.join(helpers)}, by free memory")


async def gather(
    router: HiveRouter, model: str, *, only: str | None = None,
    skip: Callable[[str, str], bool] = lambda hive_id, device: False,
) -> list[Option]:
    """Every device of every reachable hive (or of `only`), less those `skip(hive, device)` names."""
    found: list[Option] = []

    async def consider(hive_id: str) -> None:
        try:
            hive = router.get(hive_id)
            caps = await hive.capabilities()
            size = await hive.model_bytes(model)
        except RbeeError as error:
            log.info("hive %s cannot take a worker: %s", hive_id, error.code)
            return
        for device in caps.devices:
            if device.unusable:
                log.info("hive %s: %s is unusable: %s", hive_id, device.id, device.unusable)
            elif not skip(hive_id, device.id):
                found.append(Option(hive_id, device.id, device.kind == "cpu", device.memory_free_bytes,
                                    size is not None, size))

    async with trio.open_nursery() as nursery:
        for hive_id in [only] if only else router.ids():
            nursery.start_soon(consider, hive_id)
    return found

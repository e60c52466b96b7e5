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
from rbee_queen.hives import HiveRouter

log = logging.getLogger("rbee.queen.placement")


@dataclass(frozen=True)
class Option:
    """A device a worker could start on."""

    hive_id: str
    device: str
    cpu: bool
    free_bytes: int
    has_model: bool


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
            has = await hive.has_model(model)
        except RbeeError as error:
            log.info("hive %s cannot take a worker: %s", hive_id, error.code)
            return
        for device in caps.devices:
            if not skip(hive_id, device.id):
                found.append(Option(hive_id, device.id, device.kind == "cpu", device.memory_free_bytes, has))

    async with trio.open_nursery() as nursery:
        for hive_id in [only] if only else router.ids():
            nursery.start_soon(consider, hive_id)
    return found

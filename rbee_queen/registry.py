"""The queen's worker registry, built only from heartbeats (DESIGN §1, §6).

A worker that has not been heard from for `stale_after_s` is dropped, so a
queen restarted next to persistent hives rebuilds its view within one
heartbeat period and never routes to a worker that died. A worker is routed
to only once its hive has confirmed it (`confirm`): a heartbeat alone, even
with a valid token, cannot make the queen send prompts somewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from rbee_common.errors import Conflict
from rbee_common.wire import WorkerHeartbeat, WorkerInfo

log = logging.getLogger("rbee.queen.workers")


class WorkerRegistry:
    def __init__(self, *, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._seen: dict[str, tuple[float, WorkerHeartbeat]] = {}
        self._confirmed: set[str] = set()
        self._tokens: dict[str, str] = {}
        """worker_id -> the worker's own API token, once bound (minted at spawn or confirmed)."""
        self.on_change: Callable[[], None] = lambda: None

    def record(self, heartbeat: WorkerHeartbeat) -> bool:
        """Register or refresh a worker; True when it is new (or came back elsewhere).

        One id claimed by a second live worker is a conflict.
        """
        previous = self._seen.get(heartbeat.worker_id)
        fresh = previous is not None and time.monotonic() - previous[0] <= self.stale_after_s
        moved = previous is None or (previous[1].hive_id, previous[1].url, previous[1].pid) != (
            heartbeat.hive_id, heartbeat.url, heartbeat.pid)
        if fresh and moved:
            raise Conflict(
                "Another live worker is registered under that worker_id.",
                code="WORKER_ALREADY_REGISTERED",
                hint="Worker ids must be unique in the fleet; the hive makes them so.",
            )
        if moved:
            self._confirmed.discard(heartbeat.worker_id)
        self._seen[heartbeat.worker_id] = (time.monotonic(), heartbeat)
        if previous is None:
            log.info("worker %s (%r on %s) registered: %r", heartbeat.worker_id, heartbeat.model,
                     heartbeat.hive_id, heartbeat.url)
        if previous is None or previous[1].state != heartbeat.state:
            self.on_change()
        return moved

    def confirm(self, worker_id: str, token: str | None = None) -> None:
        """Its hive knows it: route to it (with `token`, its own credential, if given)."""
        if worker_id not in self._seen:
            return
        self._confirmed.add(worker_id)
        if token is not None:
            self._tokens[worker_id] = token
        self.on_change()

    def bind(self, worker_id: str, token: str) -> None:
        """The token a worker we are about to start will present (we minted it)."""
        self._tokens[worker_id] = token

    def token(self, worker_id: str) -> str | None:
        return self._tokens.get(worker_id)

    def bound_tokens(self) -> list[str]:
        return list(self._tokens.values())

    def is_confirmed(self, worker_id: str) -> bool:
        return worker_id in self._confirmed

    def forget(self, worker_id: str, why: str) -> None:
        self._confirmed.discard(worker_id)
        self._tokens.pop(worker_id, None)
        if self._seen.pop(worker_id, None) is not None:
            log.warning("worker %s out of routing: %s", worker_id, why)
            self.on_change()

    def active(self) -> list[WorkerInfo]:
        now = time.monotonic()
        for worker_id, (seen, _) in list(self._seen.items()):
            if now - seen > self.stale_after_s:
                self.forget(worker_id, f"no heartbeat for {now - seen:.1f} s (three missed)")
        return [
            WorkerInfo(**msgspec.structs.asdict(beat), last_seen_s=round(now - seen, 2),
                       confirmed=worker_id in self._confirmed)
            for worker_id, (seen, beat) in sorted(self._seen.items())
        ]

    def routable(self) -> list[WorkerInfo]:
        """Live workers their hives have confirmed: the only ones a request may go to."""
        return [worker for worker in self.active() if worker.confirmed]

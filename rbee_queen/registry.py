"""The queen's worker registry, built only from heartbeats (DESIGN §1, §6).

A worker that has not been heard from for `stale_after_s` is dropped, so a
queen restarted next to persistent hives rebuilds its view within one
heartbeat period and never routes to a worker that died.
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
        self.on_change: Callable[[], None] = lambda: None

    def record(self, heartbeat: WorkerHeartbeat) -> None:
        """Register or refresh a worker; one id claimed by a second live worker is a conflict."""
        previous = self._seen.get(heartbeat.worker_id)
        if previous is not None and time.monotonic() - previous[0] <= self.stale_after_s:
            known = previous[1]
            if (known.hive_id, known.url, known.pid) != (heartbeat.hive_id, heartbeat.url, heartbeat.pid):
                raise Conflict(
                    "Another live worker is registered under that worker_id.",
                    code="WORKER_ALREADY_REGISTERED",
                    hint="Worker ids must be unique in the fleet; the hive makes them so.",
                )
        self._seen[heartbeat.worker_id] = (time.monotonic(), heartbeat)
        if previous is None:
            log.info("worker %s (%s on %s) registered: %s", heartbeat.worker_id, heartbeat.model,
                     heartbeat.hive_id, heartbeat.url)
        if previous is None or previous[1].state != heartbeat.state:
            self.on_change()

    def forget(self, worker_id: str, why: str) -> None:
        if self._seen.pop(worker_id, None) is not None:
            log.warning("worker %s out of routing: %s", worker_id, why)
            self.on_change()

    def active(self) -> list[WorkerInfo]:
        now = time.monotonic()
        for worker_id, (seen, _) in list(self._seen.items()):
            if now - seen > self.stale_after_s:
                self.forget(worker_id, f"no heartbeat for {now - seen:.1f} s (three missed)")
        return [
            WorkerInfo(**msgspec.structs.asdict(beat), last_seen_s=round(now - seen, 2))
            for worker_id, (seen, beat) in sorted(self._seen.items())
        ]

"""The queen's worker registry, built only from heartbeats (DESIGN §1, §6).

A worker that has not been heard from for `stale_after_s` is dropped, so a
queen restarted next to persistent hives rebuilds its view within one
heartbeat period and never routes to a worker that died.
"""

from __future__ import annotations

import time

import msgspec

from rbee_common.wire import WorkerHeartbeat, WorkerInfo


class WorkerRegistry:
    def __init__(self, *, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._seen: dict[str, tuple[float, WorkerHeartbeat]] = {}

    def record(self, heartbeat: WorkerHeartbeat) -> None:
        self._seen[heartbeat.worker_id] = (time.monotonic(), heartbeat)

    def forget(self, worker_id: str) -> None:
        self._seen.pop(worker_id, None)

    def active(self) -> list[WorkerInfo]:
        now = time.monotonic()
        for worker_id, (seen, _) in list(self._seen.items()):
            if now - seen > self.stale_after_s:
                del self._seen[worker_id]
        return [
            WorkerInfo(**msgspec.structs.asdict(beat), last_seen_s=round(now - seen, 2))
            for worker_id, (seen, beat) in sorted(self._seen.items())
        ]

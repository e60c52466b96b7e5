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
import trio

from rbee_common.errors import WorkerAlreadyRegistered
from rbee_common.wire import WorkerHeartbeat, WorkerRecord

log = logging.getLogger("rbee.queen.workers")
SENT_KEPT_S = 30.0
"""How long a prefix the queen sent counts as held without a heartbeat saying so (heartbeats come
every 5 s, and at once when a worker's state changes, maybe before it took the prompt)."""


class WorkerRegistry:
    def __init__(self, *, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._seen: dict[str, tuple[float, WorkerHeartbeat]] = {}
        self._alive: dict[str, float] = {}
        """worker_id -> when data last came from it on a stream: a streaming worker is alive."""
        self._confirmed: set[str] = set()
        self._tokens: dict[str, str] = {}
        """worker_id -> the worker's own API token, once bound (minted at spawn or confirmed)."""
        self._routable: list[WorkerRecord] | None = None
        """Built when the set of routable workers changes, not per request."""
        self.prefixes: dict[str, set[int]] = {}
        """worker_id -> the prompt prefix hashes it holds (`rbee_common.prefixes`): what its last
        heartbeat said, plus what the queen has sent it lately."""
        self._sent: dict[str, dict[int, float]] = {}
        """worker_id -> prefix hashes the queen sent it, and when: a heartbeat sent before the
        worker took them must not erase them."""
        self.helpers: dict[str, list[str]] = {}
        """worker_id -> the hives that hold part of its layers (`rbee_queen.fleet.split`), while it lives."""
        self.on_change: Callable[[], None] = lambda: None
        self.on_drop: Callable[[str, str], None] = lambda worker_id, reason: None
        """A worker left routing, and why: `stale`, `unreachable` or `stopped` (the metrics)."""

    def _changed(self) -> None:
        self._routable = None
        self.on_change()

    def record(self, heartbeat: WorkerHeartbeat) -> bool:
        """Register or refresh a worker; True when it is new (or came back elsewhere).

        One id claimed by a second live worker is a conflict.
        """
        now = time.monotonic()
        previous = self._seen.get(heartbeat.worker_id)
        silent = now - self._last(heartbeat.worker_id, previous[0]) if previous is not None else None
        fresh = silent is not None and silent <= self.stale_after_s
        old = previous[1] if previous is not None else None
        where = (heartbeat.hive_id, heartbeat.url, heartbeat.pid)
        moved = old is None or (old.hive_id, old.url, old.pid) != where
        if fresh and moved:
            raise WorkerAlreadyRegistered(
                "Another live worker is registered under that worker_id.",
                hint="Worker ids must be unique in the fleet; the hive makes them so.",
            )
        if moved:
            self._confirmed.discard(heartbeat.worker_id)
        self._seen[heartbeat.worker_id] = (now, heartbeat)
        sent = self._sent.get(heartbeat.worker_id, {})
        for value, at in list(sent.items()):
            if now - at > SENT_KEPT_S:
                del sent[value]
        self.prefixes[heartbeat.worker_id] = set(heartbeat.prefixes) | sent.keys()
        if old is None:
            log.info("worker %s (%r on %s) registered: %r", heartbeat.worker_id, heartbeat.model,
                     heartbeat.hive_id, heartbeat.url)
        if moved or (old is not None and (old.state, old.slots_total, old.model) != (
                heartbeat.state, heartbeat.slots_total, heartbeat.model)):
            self._changed()
        return moved

    def sent(self, worker_id: str, hashes: list[int]) -> None:
        """The queen gave this worker a prompt with these prefix hashes: it holds them from now."""
        now = time.monotonic()
        self.prefixes.setdefault(worker_id, set()).update(hashes)
        self._sent.setdefault(worker_id, {}).update(dict.fromkeys(hashes, now))

    def touch(self, worker_id: str) -> None:
        """Data came from the worker on a stream: it lives, whatever its heartbeats are doing."""
        self._alive[worker_id] = time.monotonic()

    def _last(self, worker_id: str, beat_at: float) -> float:
        return max(beat_at, self._alive.get(worker_id, beat_at))

    def confirm(self, worker_id: str, token: str | None = None) -> None:
        """Its hive knows it: route to it (with `token`, its own credential, if given)."""
        if worker_id not in self._seen:
            return
        self._confirmed.add(worker_id)
        if token is not None:
            self._tokens[worker_id] = token
        self._changed()

    def bind(self, worker_id: str, token: str) -> None:
        """The token a worker we are about to start will present (we minted it)."""
        self._tokens[worker_id] = token

    def token(self, worker_id: str) -> str | None:
        return self._tokens.get(worker_id)

    def bound_tokens(self) -> list[str]:
        return list(self._tokens.values())

    def is_confirmed(self, worker_id: str) -> bool:
        return worker_id in self._confirmed

    def forget(self, worker_id: str, why: str, reason: str = "unreachable") -> None:
        """Out of routing until its next heartbeat; `reason` is `why` in one word."""
        self._confirmed.discard(worker_id)
        self._tokens.pop(worker_id, None)
        self._alive.pop(worker_id, None)
        self.prefixes.pop(worker_id, None)
        self._sent.pop(worker_id, None)
        if self._seen.pop(worker_id, None) is not None:
            log.warning("worker %s out of routing: %s", worker_id, why)
            self.on_drop(worker_id, reason)
            self._changed()

    def expire(self) -> None:
        """Drop the workers not heard from (beat or stream) for `stale_after_s`."""
        now = time.monotonic()
        for worker_id, (seen, _) in list(self._seen.items()):
            silent = now - self._last(worker_id, seen)
            if silent > self.stale_after_s:
                self.forget(worker_id, f"no heartbeat for {silent:.1f} s (three missed)", "stale")

    async def expire_forever(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.stale_after_s / 3))
            self.expire()

    def active(self) -> list[WorkerRecord]:
        self.expire()
        now = time.monotonic()
        return [
            WorkerRecord(**{k: v for k, v in msgspec.structs.asdict(beat).items() if k != "prefixes"},
                         confirmed=worker_id in self._confirmed,
                       last_seen_s=round(now - self._last(worker_id, seen), 2))
            for worker_id, (seen, beat) in sorted(self._seen.items())
        ]

    def routable(self) -> list[WorkerRecord]:
        """Live workers their hives have confirmed: the only ones a request may go to.

        Cached until a worker comes, goes, changes state or is confirmed; `expire_forever` drops
        the silent ones. (`last_seen_s` in it is as of the cache.)
        """
        if self._routable is None:
            self._routable = [worker for worker in self.active() if worker.confirmed]
        return self._routable

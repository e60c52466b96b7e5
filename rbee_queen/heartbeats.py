"""Who may register a worker, and where (DESIGN §8).

A registered worker gets users' prompts, so a heartbeat is taken only:

- with a credential: the worker's own token (minted by the queen at spawn,
  or by its hive, whose `worker_get` then gives the token's SHA-256), its
  hive's token, or the queen's; the header is checked before the body is read;
- from the host its hive runs on (the address the queen reaches that hive at;
  loopback for `localhost`), on a port in that hive's worker port range;
- and the worker is routed to only once its hive confirms it (`worker_get`:
  the same url and model). A worker the hive does not know stays unrouted.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import msgspec
import trio

from rbee_common.auth import is_loopback, matches, refuse_token, token_sha256
from rbee_common.errors import InvalidRequest, NotFound, RbeeError, WorkerNotAllowed
from rbee_common.validation import decode_body
from rbee_common.wire import WorkerGet, WorkerHeartbeat, WorkerRecord
from rbee_queen.registry import WorkerRegistry

log = logging.getLogger("rbee.queen.heartbeats")
_decoder = msgspec.json.Decoder(WorkerHeartbeat)
CONFIRM_TIMEOUT_S = 5.0
RETRY_REFUSED_S = 30.0



class Placement(msgspec.Struct, frozen=True):
    """Where a hive's workers may be: its host, and its worker port range."""

    host: str
    port_min: int
    port_max: int


def placement_problem(url: str, placement: Placement) -> str | None:
    """Why a worker at `url` cannot belong to that hive, or None. Pure."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "its url is not a valid http url"
    if port is None or not placement.port_min <= port <= placement.port_max:
        return "its port is outside its hive's worker port range"
    if is_loopback(placement.host):
        return None if is_loopback(host) else "its host is not its hive's host"
    if _same_host(host, placement.host):
        return None
    return "its host is not its hive's host"


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower() == b.lower()


class Heartbeats:
    def __init__(
        self, registry: WorkerRegistry, *, nursery: trio.Nursery,
        queen_token: Callable[[], str | None], hive_token: Callable[[str], str | None],
        hive_ids: Callable[[], list[str]], placement: Callable[[str], Placement],
        ask_hive: Callable[[WorkerGet], Awaitable[WorkerRecord]],
    ) -> None:
        self.registry = registry
        self.nursery = nursery
        self.queen_token = queen_token
        self.hive_token = hive_token
        self.hive_ids = hive_ids
        self.placement = placement
        """Where a configured hive's workers may be (NotFound for an unknown hive)."""
        self.ask_hive = ask_hive
        self._refused: dict[tuple[str, str], float] = {}
        """(worker_id, token sha) -> when its hive last said no: not asked again for a while."""

    async def accept(self, body: bytes, token: str | None) -> None:
        """Take one heartbeat (`token`: what the request presented; None in dev mode)."""
        auth = self.queen_token() is not None
        try:
            beat = decode_body(body, _decoder)
            placement = self.placement(beat.hive_id)
        except (InvalidRequest, NotFound):
            if auth and not self._known_anywhere(token):
                raise refuse_token(token) from None  # a stranger learns nothing from our validation
            raise
        credential = self._credential(beat, token) if auth else "none"
        if credential is None:
            raise refuse_token(token)
        problem = placement_problem(beat.url, placement)
        if problem is not None:
            log.warning("heartbeat refused: worker %s of hive %s: %s (%r)", beat.worker_id, beat.hive_id,
                        problem, beat.url)
            raise WorkerNotAllowed(
                f"A worker of that hive cannot be registered there: {problem}.",
                hint="Workers register from their hive's host, on a port in its worker port range.",
            )
        if credential == "candidate" and token is not None:  # a token we never saw: its hive decides
            why = await self._ask(beat, token)
            if why is not None:
                raise refuse_token(token)
            self.registry.record(beat)
            self.registry.confirm(beat.worker_id, token)
            return
        new = self.registry.record(beat)
        if credential == "worker":  # the token we minted for the worker its hive started for us
            if not self.registry.is_confirmed(beat.worker_id):
                self.registry.confirm(beat.worker_id)
        elif new or not self.registry.is_confirmed(beat.worker_id):
            self.nursery.start_soon(self._confirm, beat)

    def _known_anywhere(self, token: str | None) -> bool:
        """Is `token` any credential this queen holds (queen, hive or bound worker token)?"""
        if token is None:
            return False
        known = [self.queen_token(), *(self.hive_token(h) for h in self.hive_ids()),
                 *self.registry.bound_tokens()]
        return matches(token, [t for t in known if t])

    def _credential(self, beat: WorkerHeartbeat, token: str | None) -> str | None:
        """'worker' (its bound token), 'queen', 'hive', 'candidate' (unknown: its hive decides) or None."""
        if token is None:
            return None
        bound = self.registry.token(beat.worker_id)
        if bound is not None:
            return "worker" if matches(token, [bound]) else None
        queen = self.queen_token()
        if queen is not None and matches(token, [queen]):
            return "queen"
        hive = self.hive_token(beat.hive_id)
        if hive is not None and matches(token, [hive]):
            return "hive"
        return "candidate"

    async def _ask(self, beat: WorkerHeartbeat, candidate: str | None) -> str | None:
        """Why the worker's hive does not vouch for this heartbeat, or None when it does."""
        key = (beat.worker_id, token_sha256(candidate or ""))
        if time.monotonic() - self._refused.get(key, -RETRY_REFUSED_S) < RETRY_REFUSED_S:
            return "its hive refused it a moment ago"
        why: str | None = None
        known: WorkerRecord | None = None
        try:
            with trio.fail_after(CONFIRM_TIMEOUT_S):
                known = await self.ask_hive(WorkerGet(worker_id=beat.worker_id, hive_id=beat.hive_id))
        except (RbeeError, trio.TooSlowError) as error:
            why = f"its hive did not confirm it ({type(error).__name__})"
        if known is not None:
            if (known.url, known.model) != (beat.url, beat.model):
                why = "its hive knows no such worker at that url"
            elif candidate is not None and known.token_sha256 != token_sha256(candidate):
                why = "its token is not the one its hive gave it"
        if why is not None:
            self._refused[key] = time.monotonic()
            if len(self._refused) > 10_000:
                self._refused.clear()
            log.warning("worker %s of hive %s not routed: %s", beat.worker_id, beat.hive_id, why)
        return why

    async def _confirm(self, beat: WorkerHeartbeat) -> None:
        """A worker that beat with its hive's or our token: route to it once its hive agrees."""
        if await self._ask(beat, None) is None:
            log.info("worker %s confirmed by hive %s", beat.worker_id, beat.hive_id)
            self.registry.confirm(beat.worker_id)

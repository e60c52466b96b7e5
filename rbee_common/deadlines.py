"""Request deadlines (DESIGN §3; area 340): one absolute time, computed once, on every hop.

A client gives a deadline as `X-Request-Deadline` (ISO-8601, absolute) or as a
timeout in seconds (`X-Stainless-Timeout`, which the official OpenAI clients
send); the earliest wins and nothing later can extend it. The queen forwards
the same header, unchanged, to the hive (a cold start's spawn job) and to the
worker, and each of them stops its work at that instant. Past it, the answer
is 408 `REQUEST_TIMEOUT`.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import math
import time
from typing import Protocol

import trio

from rbee_common.errors import DeadlineExceeded, ValidationFailed

log = logging.getLogger("rbee.deadlines")

HEADER = "X-Request-Deadline"
TIMEOUT_HEADER = "X-Stainless-Timeout"

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("rbee_deadline", default=None)
"""The deadline header of the request this task works for: outgoing hops forward it."""


def exceeded(header: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        "Request exceeded deadline", details={"deadline": header},
        hint="Give the request more time (X-Request-Deadline, or your client's timeout).",
    )


def parse(raw: str, field: str = HEADER) -> float:
    """Seconds since the epoch; a 400 naming the header for anything but an ISO-8601 time with a zone."""
    try:
        if len(raw) > 64:
            raise ValueError
        when = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError
        value = when.timestamp()
    except (ValueError, OverflowError):
        raise ValidationFailed(
            f"{field} must be an ISO-8601 time with a zone, such as 2026-12-01T12:00:00Z.",
            details={"field": field},
        ) from None
    return value


def format_epoch(epoch: float) -> str:
    when = dt.datetime.fromtimestamp(epoch, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Headers(Protocol):
    def get(self, key: str, /) -> str | None: ...


def from_headers(headers: _Headers, *, default_s: float | None) -> str | None:
    """The request's deadline header: its own, its timeout's, or `default_s` from now (None: none).

    The earliest of what the client gave wins; a later one is logged and ignored.
    """
    candidates: list[tuple[float, str]] = []
    raw = headers.get(HEADER)
    if raw is not None:
        candidates.append((parse(raw), raw))
    timeout = headers.get(TIMEOUT_HEADER)
    if timeout == "NOT_GIVEN":  # what the Stainless clients (Anthropic's) send for a stream: no timeout
        timeout = None
    if timeout is not None:
        try:
            seconds = float(timeout)
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError
        except ValueError:
            raise ValidationFailed(f"{TIMEOUT_HEADER} must be a positive number of seconds.",
                                   details={"field": TIMEOUT_HEADER}) from None
        epoch = time.time() + seconds
        candidates.append((epoch, format_epoch(epoch)))
    if not candidates:
        if default_s is None:
            return None
        return format_epoch(time.time() + default_s)
    candidates.sort()
    for _, later in candidates[1:]:
        log.warning("deadline cannot be extended: %s ignored for the earlier %s", later, candidates[0][1])
    return candidates[0][1]


def trio_deadline(header: str | None) -> float:
    """The deadline as trio's clock reads it (inf for none)."""
    if header is None:
        return math.inf
    return trio.current_time() + (parse(header) - time.time())


def outgoing() -> dict[str, str]:
    """Headers for a hop made on behalf of the current request."""
    header = current.get()
    return {HEADER: header} if header is not None else {}

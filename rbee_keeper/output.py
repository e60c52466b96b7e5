"""How the keeper shows events: narration on stderr, results on stdout."""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from rbee_common.errors import RbeeError
from rbee_common.wire import JobEvent, Narration, Progress, QueenStatus, Result, Token

_LEVEL_MARK = {"debug": "  ", "info": "  ", "warn": "! ", "error": "✗ "}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def show_event(event: JobEvent) -> Any:
    """Render one event; return the result value when it is the result."""
    match event:
        case Narration(level="debug"):
            return None
        case Narration():
            say(f"{_LEVEL_MARK[event.level]}{event.human}")
        case Progress():
            total = f"/{event.total}" if event.total is not None else ""
            say(f"  {event.what}: {event.done}{total} {event.unit}")
        case Token():
            sys.stdout.write(event.t)
            sys.stdout.flush()
        case Result():
            return event.value
    return None


def show_error(error: RbeeError) -> None:
    say(f"error: {error.message}")
    if error.hint:
        say(f"hint: {error.hint}")


def show_status(url: str, value: Any) -> None:
    status = msgspec.convert(value, QueenStatus)
    print(f"queen    {url}  healthy (rbee {status.version})")
    print("hives")
    for hive in status.hives:
        state = "reachable" if hive.reachable else (hive.problem or "unreachable")
        print(f"  {hive.hive_id:<16} {hive.url:<28} {state}")
    print("workers")
    if not status.workers:
        print("  (none)")
    for worker in status.workers:
        print(f"  {worker}")

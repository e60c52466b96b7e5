"""How the keeper shows events: narration on stderr, results on stdout."""

from __future__ import annotations

import sys
import time

from rbee_common.errors import ErrorBody, RbeeError
from rbee_common.wire import JobEvent, Narration, Progress, QueenStatus, Token

_LEVEL_MARK = {"debug": "  ", "info": "  ", "warn": "! ", "error": "✗ "}


_open_line = False
"""An answer's last token went to stdout without a newline: the next line on the terminal would
run on after it (`…nitrogenShutting down queen`)."""


def end_line() -> None:
    """End the answer's line on stdout, if it is open."""
    global _open_line
    if _open_line:
        sys.stdout.write("\n")
        sys.stdout.flush()
        _open_line = False


def say(text: str) -> None:
    end_line()
    print(text, file=sys.stderr, flush=True)


_last_progress: dict[str, tuple[float, int]] = {}


def _bar(event: Progress) -> str:
    if event.unit == "bytes" and event.total:
        share = event.done / event.total
        filled = int(share * 20)
        rate = f"  {event.rate / 1e6:.1f} MB/s" if event.rate else ""
        return (f"  {event.what} [{'#' * filled}{'-' * (20 - filled)}] {share:4.0%} "
                f"{event.done / 1e6:.1f}/{event.total / 1e6:.1f} MB{rate}")
    if event.unit == "ms":
        return f"  {event.what} … {event.done / 1000:.1f} s"
    total = f"/{event.total}" if event.total is not None else ""
    return f"  {event.what}: {event.done}{total} {event.unit}"


def show_progress(event: Progress) -> None:
    """A bar that redraws in place on a terminal; at most a line a second otherwise."""
    now = time.monotonic()
    last_at, last_done = _last_progress.get(event.what, (0.0, -1))
    finished = event.total is not None and event.done >= event.total
    if sys.stderr.isatty():
        sys.stderr.write("\r" + _bar(event) + ("\n" if finished else ""))
        sys.stderr.flush()
    elif (finished and last_done != event.done) or now - last_at >= 1.0:
        say(_bar(event))
    else:
        return
    _last_progress[event.what] = (now, event.done)


def show_event(event: JobEvent, *, tokens: bool = True) -> None:
    """Render one event: narration and progress on stderr, tokens on stdout."""
    global _open_line
    match event:
        case Narration(level="debug"):
            return None
        case Narration(error=ErrorBody()):
            return None  # the job's failure: said once, at the end (`show_error`)
        case Narration():
            say(f"{_LEVEL_MARK[event.level]}{event.human}")
        case Progress():
            show_progress(event)
        case Token() if tokens and event.t:
            sys.stdout.write(event.t)
            sys.stdout.flush()
            _open_line = not event.t.endswith("\n")
    return None


def show_error(error: RbeeError) -> None:
    say(f"error: {error.message}")
    if error.hint:
        say(f"hint: {error.hint}")


def show_status(url: str, status: QueenStatus) -> None:
    print(f"queen    {url}  healthy (rbee {status.version})")
    print("hives")
    for hive in status.hives:
        state = "reachable" if hive.reachable else (hive.problem or "unreachable")
        print(f"  {hive.hive_id:<16} {hive.url:<28} {state}")
    print("workers")
    if not status.workers:
        print("  (none)")
    for worker in status.workers:
        print(f"  {worker.worker_id:<22} {worker.model:<24} {worker.hive_id:<12} {worker.device:<7} "
              f"{worker.state:<8} {worker.slots_busy}/{worker.slots_total} busy  {worker.url}")

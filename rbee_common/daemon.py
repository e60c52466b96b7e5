"""Running a daemon: logging, signals, and the ready line.

`serve(stop=..., task_status=...)` functions install no signal handlers; this
entry helper does. The first SIGINT/SIGTERM sets `stop` (graceful: jobs are
cancelled, streams end with a terminator, children are stopped); a second one
cancels everything at once. When `serve` has bound its sockets, one JSON line
`{"event": "ready", "url": ...}` goes to stdout so a parent can learn the real
port (port 0 works).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, NoReturn, Protocol

import trio

from rbee_common.errors import RbeeError, first_leaf

log = logging.getLogger("rbee.daemon")


class Serve(Protocol):
    def __call__(
        self, *, stop: trio.Event, task_status: trio.TaskStatus[list[str]] = ...
    ) -> Awaitable[None]: ...


class OneLineFormatter(logging.Formatter):
    """Every record is one line: control characters in a message (a newline or an ANSI
    escape that came in with a request) are written escaped, so nobody can forge a line.
    Tracebacks, which we write ourselves, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


_CONTROLS = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS) if not text.isprintable() else text


def configure_logging(component: str, level: str | None = None) -> None:
    level = level or os.environ.get("RBEE_LOG", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)  # and httpx every request: a line per stream


def announce_ready(urls: list[str], **extra: Any) -> None:
    line = {"event": "ready", "url": urls[0] if urls else None, "urls": urls, "pid": os.getpid()}
    line.update(extra)
    sys.stdout.write(json.dumps(line) + "\n")  # one write: a reader sees the whole line
    sys.stdout.flush()


def announce_failed(error: RbeeError) -> None:
    line = {"event": "failed", "code": error.code, "message": error.message}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def run_daemon(
    serve: Serve,
    *,
    component: str,
    on_ready: Callable[[list[str]], None] = announce_ready,
    on_hangup: Callable[[], object] | None = None,
) -> int:
    """Run `serve` under trio with rbee's signal policy; the process exit code.

    SIGHUP calls `on_hangup` (reload token files and config) and stops nothing.
    """
    outcome = {"hard": False}
    raise_open_file_limit()

    async def main() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP received: reloading")
                            if on_hangup is not None:
                                on_hangup()
                        elif not stop.is_set():
                            log.info("%s received: stopping gracefully (again to force)", name)
                            stop.set()
                        else:
                            log.warning("%s received again: stopping now", name)
                            outcome["hard"] = True
                            nursery.cancel_scope.cancel()

                async def serve_then_finish(task_status: trio.TaskStatus[list[str]]) -> None:
                    await serve(stop=stop, task_status=task_status)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                urls = await nursery.start(serve_then_finish)
                log.info("%s listening on %s", component, " ".join(urls))
                on_ready(urls)

    failed = False
    try:
        trio.run(main)
    except* RbeeError as group:
        error = first_leaf(group)
        hint = error.hint if isinstance(error, RbeeError) else None
        log.error("%s could not start: %s%s", component, error, f" (hint: {hint})" if hint else "")
        if isinstance(error, RbeeError):  # one line our parent may pass on: our words, no input echoed
            announce_failed(error)
        failed = True
    except* OSError as group:
        # Typically the port is taken: say so in one line, not a traceback.
        first = first_leaf(group)
        hint = ""
        if getattr(first, "errno", None) == errno.EADDRINUSE:
            hint = " (hint: another process holds that port; pick another --port, or 0 for a free one)"
        log.error("%s could not start: %s%s", component, getattr(first, "strerror", None) or first, hint)
        failed = True
    return 1 if failed or outcome["hard"] else 0


def raise_open_file_limit() -> None:
    """Every connection is a file: take the hard limit, not the soft default (often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def exit_on_config_error(error: RbeeError, program: str) -> NoReturn:
    """A bad config at start-up: one line and the hint on stderr, exit 1."""
    print(f"{program}: error: {error.message}", file=sys.stderr)
    if error.hint:
        print(f"hint: {error.hint}", file=sys.stderr)
    raise SystemExit(1)


async def watch_stdin_lifeline(stop: trio.Event) -> None:
    """Set `stop` when stdin reaches EOF: the parent (an SSH session) is gone.

    A process started over SSH without a PTY gets no SIGHUP when the client
    dies, only EOF on stdin (STYLE, traps).
    """
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    log.warning("stdin closed: the parent is gone, stopping")
    stop.set()


def _flags_show_no_type() -> None:
    """Typer (0.29) labels every flag `<bool>` in `--help`, as if it took a value; a flag takes
    none, so every program's help shows no type there (the label of an option with a value stays)."""
    import typer.core

    option: Any = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "rbee", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.rbee = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_show_no_type()


def package_version() -> str:
    try:
        return metadata.version("rbee")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_timestamp() -> float | None:
    """When this copy of rbee was built (installed), from its metadata file."""
    try:
        dist = metadata.distribution("rbee")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "METADATA":
            try:
                return os.stat(str(file.locate())).st_mtime
            except OSError:
                return None
    return None

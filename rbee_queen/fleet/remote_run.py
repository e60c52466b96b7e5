"""`hive_start` and `hive_stop` over SSH (DESIGN §7).

`start` runs `rbee-hive --lifeline stdin` over an SSH session that the queen
keeps open (attached): when the queen stops, it asks each such hive to shut
down (`stop_all`); when the queen dies, the session ends, the hive reads EOF
on stdin and stops with its workers. `--detached` starts a hive that outlives
the session, for hosts where something else owns it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from rbee_common.auth import bearer
from rbee_common.client import map_transport_errors
from rbee_common.config import HiveEntry
from rbee_common.errors import HiveStartFailed, TransportError
from rbee_common.jobs import JobContext
from rbee_common.wire import HiveStarted, HiveStopped, InstallRecord
from rbee_queen.fleet import ssh
from rbee_queen.fleet.hives import hive_url

if TYPE_CHECKING:
    from rbee_queen.fleet.remote import Remote

log = logging.getLogger("rbee.queen.remote")


class Attached:
    """A hive whose SSH session this queen holds."""

    def __init__(self, hive_id: str, url: str) -> None:
        self.hive_id = hive_id
        self.url = url
        self.pid: int | None = None
        self.scope = trio.CancelScope()
        self.exited = trio.Event()
        self.log: deque[str] = deque(maxlen=20)


def _command(record: InstallRecord, queen_url: str, *, lifeline: bool) -> str:
    d = ssh.quote(record.install_dir)
    return (
        f"{d}/venv/bin/rbee-hive --config {d}/hive.toml --api-token-file {d}/hive.token "
        f"--queen-url {ssh.quote(queen_url)}" + (" --lifeline stdin" if lifeline else "")
    )


def _queen_url(remote: Remote, session: ssh.Session, say: Callable[..., None]) -> str:
    if remote.settings.advertise_url:
        return remote.settings.advertise_url
    port = (remote.queen_url or "").rpartition(":")[2] or str(remote.settings.port)
    if remote.settings.host in ("127.0.0.1", "localhost", "::1"):
        say(
            "This queen listens on loopback only: that hive's workers cannot heartbeat to it. Start the "
            "queen with --host <address> --api-token-file FILE.",
            level="warn",
        )
    address = session.local_address()
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


async def start(
    remote: Remote, hive_id: str, entry: HiveEntry, context: JobContext, *, detached: bool
) -> HiveStarted:
    def say(text: str, **fields: Any) -> None:
        context.narrate("hive_start", text, hive_id=hive_id, **fields)

    record = remote.require_installed(hive_id)
    url = hive_url(entry)
    running = remote.attached.get(hive_id)
    if (running is not None and not running.exited.is_set()) or await remote.healthy(url):
        say(f"Hive {hive_id} is already running at {url}")
        return HiveStarted(hive_id=hive_id, url=url, already_running=True, attached=running is not None)
    target = remote.target(hive_id, entry)
    if detached:
        async with ssh.connect(target, say) as session:
            command = _command(record, _queen_url(remote, session, say), lifeline=False)
            d = ssh.quote(record.install_dir)
            # every fd of the background group away from the session, or SSH waits for it to end
            background = f"(cd {d} && exec nohup setsid {command}) >> {d}/hive.log 2>&1 < /dev/null &"
            await session.run(background, limit_s=30)
        say(f"Started a detached hive on {hive_id}; waiting for {url}/health")
        with trio.move_on_after(remote.settings.hive_start_timeout_s):
            while not await remote.healthy(url):  # noqa: ASYNC110 (another machine: polling is all there is)
                await trio.sleep(0.2)
            say(f"Hive {hive_id} is up at {url} (detached: it outlives this queen)")
            return HiveStarted(hive_id=hive_id, url=url, attached=False)
        raise HiveStartFailed(
            f"The detached hive on {target.where} did not answer at {url} within "
            f"{remote.settings.hive_start_timeout_s:g} s.",
            details={"hive_id": hive_id},
            hint=f"Its log is {record.install_dir}/hive.log on {hive_id}.",
        )
    attached = Attached(hive_id, url)
    pid = await remote.nursery.start(_run_attached, remote, hive_id, entry, record, attached, say)
    say(f"Hive {hive_id} is up at {url} (pid {pid} on {entry.host}; attached to this queen)", pid=pid)
    return HiveStarted(hive_id=hive_id, url=url, attached=True, pid=pid)


async def _run_attached(
    remote: Remote,
    hive_id: str,
    entry: HiveEntry,
    record: InstallRecord,
    attached: Attached,
    say: Callable[..., None],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    target = remote.target(hive_id, entry)
    started = False
    try:
        with attached.scope:
            async with ssh.connect(target, say) as session:
                command = _command(record, _queen_url(remote, session, say), lifeline=True)
                say(f"Starting rbee-hive on {hive_id} over SSH (stdin lifeline)")
                async with session.process(f"exec {command}") as process:
                    code: int | None = None
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(_pump_stderr, process, attached)
                        pid: int | None = None
                        with trio.move_on_after(remote.settings.hive_start_timeout_s):
                            pid = await _read_ready(process)
                        if pid is not None:
                            attached.pid = pid
                            remote.attached[hive_id] = attached
                            started = True
                            task_status.started(pid)
                            code = await process.wait()
                        else:
                            with trio.move_on_after(1):  # its last words, if it is exiting
                                await process.wait()
                        pumps.cancel_scope.cancel()
                if not started:
                    raise HiveStartFailed(
                        f"rbee-hive on {target.where} did not become ready within "
                        f"{remote.settings.hive_start_timeout_s:g} s. Its last lines: "
                        + (" | ".join(list(attached.log)[-5:]) or "(none)"),
                        details={"hive_id": hive_id},
                        hint=f"Fix what they say; or reinstall: rbee-keeper hive install {hive_id}",
                    )
                log.warning(
                    "hive %s exited (status %s): %s", hive_id, code, " | ".join(list(attached.log)[-3:])
                )
    finally:
        attached.exited.set()
        if remote.attached.get(hive_id) is attached:
            del remote.attached[hive_id]


async def _read_ready(process: ssh.Process) -> int | None:
    while True:
        line = await process.readline()
        if not line:
            return None
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "ready":
                return int(event.get("pid") or 0)


async def _pump_stderr(process: ssh.Process, attached: Attached) -> None:
    hive_log = logging.getLogger(f"rbee.hive.{attached.hive_id}")
    while line := await process.readline("stderr"):
        attached.log.append(line.rstrip())
        hive_log.info("%s", line.rstrip())


async def stop(remote: Remote, hive_id: str, entry: HiveEntry, context: JobContext | None) -> HiveStopped:
    def say(text: str) -> None:
        if context is not None:
            context.narrate("hive_stop", text, hive_id=hive_id)
        log.info("%s", text)

    url = hive_url(entry)
    attached = remote.attached.get(hive_id)
    if attached is None and not await remote.healthy(url):
        say(f"Hive {hive_id} is not running")
        return HiveStopped(hive_id=hive_id, stopped=False, was_running=False)
    say(f"Asking hive {hive_id} to shut down (it stops its workers first)")
    try:
        with map_transport_errors(url):
            await remote.http.post(f"{url}/v1/shutdown", json={}, headers=bearer(remote.token(hive_id)),
                                   timeout=5.0)
    except TransportError:
        say(f"Hive {hive_id} did not answer over HTTP")
    grace = 15.0
    if attached is not None:
        with trio.move_on_after(grace):
            await attached.exited.wait()
        if not attached.exited.is_set():
            say(f"Hive {hive_id} still runs after {grace:g} s: closing its SSH session (stdin EOF)")
            attached.scope.cancel()
            await attached.exited.wait()
    else:
        with trio.move_on_after(grace):
            while await remote.healthy(url):  # noqa: ASYNC110 (another machine: polling is all there is)
                await trio.sleep(0.2)
    say(f"Hive {hive_id} stopped")
    return HiveStopped(hive_id=hive_id, stopped=True, was_running=True)


async def stop_all(remote: Remote) -> None:
    """The queen is stopping: stop every hive it holds a session to."""
    async with trio.open_nursery() as nursery:
        for hive_id in list(remote.attached):
            entry = remote.hives.get(hive_id)
            if entry is not None:
                nursery.start_soon(stop, remote, hive_id, entry, None)
    for attached in list(remote.attached.values()):
        attached.scope.cancel()

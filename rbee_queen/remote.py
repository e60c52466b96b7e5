"""Hives on other machines: install, start, stop and uninstall them over SSH (DESIGN §7).

`hive_install` checks the host (Python >= 3.11, the platform, free disk),
uploads the wheelhouse, makes a venv, installs rbee offline, checks
`rbee-hive --version` against the queen's, and writes the hive's token (0600)
and config. Only then is the install recorded on the queen's side
(`$XDG_STATE_HOME/rbee/hives/<id>/install.json` and `token`); a failed
install records nothing and removes the directory it created.

`hive_start` runs `rbee-hive --lifeline stdin` over an SSH session that the
queen keeps open (attached): when the queen stops, it asks each such hive to
shut down; when the queen dies, the session ends, the hive reads EOF on stdin
and stops with its workers. `--detached` starts a hive that outlives the
session, for hosts where something else owns it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from rbee_common import wheelhouse
from rbee_common.auth import bearer, cached_token_file, new_token, write_token_file
from rbee_common.config import HiveEntry, QueenSettings, state_dir
from rbee_common.daemon import package_version
from rbee_common.errors import ConfigError, NotFound, RemoteFailed
from rbee_common.jobs import JobContext
from rbee_common.wheelhouse import Manifest, check_platform, ensure
from rbee_queen import ssh
from rbee_queen.hives import hive_url

log = logging.getLogger("rbee.queen.remote")

MIN_PYTHON = (3, 11)

_PROBE = """\
import json, os, shutil, sys, sysconfig
d = os.path.abspath(os.path.expanduser(sys.argv[1]))
p = d
while not os.path.isdir(p):
    p = os.path.dirname(p)
print(json.dumps({"version": list(sys.version_info[:3]), "platform": sysconfig.get_platform(),
                  "dir": d, "existed": os.path.isdir(d), "free": shutil.disk_usage(p).free}))
"""


class InstallRecord(msgspec.Struct, frozen=True, kw_only=True):
    hive_id: str
    host: str
    install_dir: str
    """Absolute, on the host."""
    version: str
    python: str
    platform: str
    installed_at: float
    created_dir: bool = True
    """Whether the install made `install_dir` (then uninstall removes all of it)."""


class Installs:
    """What this queen installed where: one folder per hive under its state directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "hives"

    def _dir(self, hive_id: str) -> Path:
        return self.root / hive_id

    def record(self, hive_id: str) -> InstallRecord | None:
        try:
            return msgspec.json.decode((self._dir(hive_id) / "install.json").read_bytes(), type=InstallRecord)
        except (OSError, msgspec.DecodeError):
            return None

    def token(self, hive_id: str) -> str | None:
        path = self._dir(hive_id) / "token"
        return cached_token_file(path) if path.exists() else None

    def save(self, record: InstallRecord, token: str) -> None:
        folder = self._dir(record.hive_id)
        write_token_file(folder / "token", token)
        staging = folder / "install.json.tmp"
        staging.write_bytes(msgspec.json.encode(record))
        staging.replace(folder / "install.json")  # last: until here, nothing is recorded as installed

    def forget(self, hive_id: str) -> None:
        for name in ("install.json", "token"):
            with contextlib.suppress(FileNotFoundError):
                (self._dir(hive_id) / name).unlink()


class Attached:
    """A hive whose SSH session this queen holds."""

    def __init__(self, hive_id: str, url: str) -> None:
        self.hive_id = hive_id
        self.url = url
        self.pid: int | None = None
        self.scope = trio.CancelScope()
        self.exited = trio.Event()
        self.log: deque[str] = deque(maxlen=20)


def _q(value: str) -> str:
    return shlex.quote(value)


def _program(path: str) -> str:
    """A program path for the remote shell: quoted, with a leading `~/` left for the shell to expand."""
    return "~/" + _q(path[2:]) if path.startswith("~/") else _q(path)


class Remote:
    def __init__(
        self, settings: QueenSettings, hives: dict[str, HiveEntry], *, nursery: trio.Nursery,
        http: httpx.AsyncClient, installs: Installs | None = None,
    ) -> None:
        self.settings = settings
        self.hives = hives
        self.nursery = nursery
        self.http = http
        self.installs = installs or Installs()
        self.attached: dict[str, Attached] = {}
        self.queen_url: str | None = None
        """This queen's own URL, once it is listening."""

    # --- helpers ------------------------------------------------------------------

    def target(self, hive_id: str, entry: HiveEntry) -> ssh.Target:
        return ssh.Target(
            alias=hive_id, host=entry.host, port=entry.ssh_port, user=entry.ssh_user,
            identity_file=entry.identity_file, known_hosts=self.settings.known_hosts,
            accept_new=entry.host_key_policy == "accept-new", connect_timeout_s=entry.connect_timeout_s,
            attempts=entry.ssh_attempts,
        )

    def token(self, hive_id: str) -> str | None:
        """The token this hive wants (None: it has none, is not installed by us, or its file is bad).

        Asked on every heartbeat: the file is read again only when it changes.
        """
        entry = self.hives.get(hive_id)
        try:
            if entry is not None and entry.token_file:
                return cached_token_file(entry.token_file)
            return self.installs.token(hive_id)
        except ConfigError as error:
            log.warning("no usable token for hive %s: %s", hive_id, error.message)
            return None

    def _installed(self, hive_id: str) -> InstallRecord:
        record = self.installs.record(hive_id)
        if record is None:
            raise NotFound(
                f"Hive {hive_id} is not installed by this queen.", code="HIVE_NOT_INSTALLED",
                details={"hive_id": hive_id}, hint=f"Install it first: rbee-keeper hive install {hive_id}",
            )
        return record

    async def _healthy(self, url: str) -> bool:
        try:
            response = await self.http.get(f"{url}/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # --- ssh_test -----------------------------------------------------------------

    async def ssh_test(self, hive_id: str, entry: HiveEntry, context: JobContext) -> dict[str, Any]:
        def say(text: str, **fields: Any) -> None:
            context.narrate("ssh_test", text, hive_id=hive_id, **fields)

        target = self.target(hive_id, entry)
        say(f"Connecting to {target.where}")
        async with ssh.connect(target, say) as session:
            say("SSH preflight: connection OK")
            started = time.monotonic()
            echo = await session.run("echo test", limit_s=target.connect_timeout_s)
            latency_ms = (time.monotonic() - started) * 1000
            say(f"SSH command execution: `echo test` answered {echo.stdout.strip()!r}")
            network_ms = await self._network_ms(session, entry)
            say(f"SSH command round trip {latency_ms:.1f} ms (a session and a shell on the host); "
                f"network round trip {network_ms:.1f} ms (a TCP connect)",
                latency_ms=round(latency_ms, 2), network_ms=round(network_ms, 2))
            record = self.installs.record(hive_id)
            binary = _q(f"{record.install_dir}/venv/bin/rbee-hive") if record else "rbee-hive"
            found = (await session.run(f"command -v {binary}", check=False)).stdout.strip() or None
            say(f"rbee-hive on {hive_id}: " + (found or "not installed (rbee-keeper hive install "
                                                         f"{hive_id})"))
        return {"hive_id": hive_id, "ok": True, "echo": echo.stdout.strip(),
                "latency_ms": round(latency_ms, 2), "network_ms": round(network_ms, 2), "rbee_hive": found}

    async def _network_ms(self, session: ssh.Session, entry: HiveEntry) -> float:
        """The network's own round trip to the host: one TCP connect to the SSH port we reached."""
        host, port = session.peer()
        began = time.monotonic()
        with trio.fail_after(entry.connect_timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        elapsed = (time.monotonic() - began) * 1000
        await stream.aclose()
        return elapsed

    # --- install ------------------------------------------------------------------

    async def install(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, force: bool = False
    ) -> InstallRecord:
        def say(text: str, **fields: Any) -> None:
            context.narrate("hive_install", text, hive_id=hive_id, **fields)

        target = self.target(hive_id, entry)
        configured = entry.wheelhouse or self.settings.wheelhouse
        wheels_dir, manifest = await ensure(wheelhouse.locate(configured), say)
        files = wheelhouse.files(wheels_dir, manifest)
        total = wheelhouse.total_bytes(wheels_dir, manifest)
        token = self.token(hive_id) or new_token()  # a reinstall keeps the token a running hive knows
        say(f"Connecting to {target.where}")
        async with ssh.connect(target, say) as session:
            say("Connected; checking the remote Python")
            probe = await session.run(
                f"{_program(entry.python)} -c {_q(_PROBE)} {_q(entry.install_dir)}", check=False, limit_s=30)
            remote = self._probe(probe, hive_id, entry, target)
            version = ".".join(map(str, remote["version"]))
            say(f"Python {version} on {remote['platform']} at {entry.python}")
            check_platform(manifest, remote, target.where, hive_id)
            directory: str = remote["dir"]
            needed = total * 4  # the wheels, and the venv they unpack into
            if remote["free"] < needed:
                raise RemoteFailed(
                    f"The disk is full on {target.where}: {directory} needs {needed / 1e6:.0f} MB and "
                    f"{remote['free'] / 1e6:.0f} MB are free.", code="REMOTE_DISK_FULL",
                    details={"hive_id": hive_id, "needed_bytes": needed, "free_bytes": remote["free"]},
                    hint=f"Free space there, or set install_dir in [hives.{hive_id}] to a bigger disk.",
                )
            created = not remote["existed"]
            self.installs.forget(hive_id)  # the host changes from here: until the end, it is not installed
            try:
                return await self._install_into(
                    session, hive_id, entry, target, directory, files, total, manifest, remote, created, say,
                    context, token, force)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(30):
                    if created:
                        say(f"Install failed: removing {directory} from {hive_id}", level="warn")
                        with contextlib.suppress(RemoteFailed):
                            await session.run(f"rm -rf {_q(directory)}", check=False)
                raise

    def _probe(
        self, probe: ssh.Completed, hive_id: str, entry: HiveEntry, target: ssh.Target
    ) -> dict[str, Any]:
        if probe.code == 127 or "not found" in probe.stderr:
            raise RemoteFailed(
                f"No Python at `{entry.python}` on {target.where}.", code="REMOTE_PYTHON_MISSING",
                details={"hive_id": hive_id},
                hint=f"Install Python >= 3.11 there (apt install python3 python3-venv), or set python "
                     f"in [hives.{hive_id}] to its path.",
            )
        try:
            remote: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
            found = tuple(remote["version"])
        except (ValueError, IndexError, KeyError, TypeError):
            found = ()
            remote = {}
        if probe.code != 0 or not found or found < MIN_PYTHON:
            have = ".".join(map(str, found)) if found else "an unusable one"
            raise RemoteFailed(
                f"{target.where} has Python {have} at `{entry.python}`; rbee needs 3.11 or newer.",
                code="REMOTE_PYTHON_OLD", details={"hive_id": hive_id, "found": have},
                hint=f"Install Python >= 3.11 there, and set python in [hives.{hive_id}] to it.",
            )
        return remote

    async def _install_into(
        self, session: ssh.Session, hive_id: str, entry: HiveEntry, target: ssh.Target, directory: str,
        files: list[Path], total: int, manifest: Manifest, remote: dict[str, Any], created: bool,
        say: Callable[..., None], context: JobContext, token: str, force: bool,
    ) -> InstallRecord:
        d = _q(directory)
        await session.run(f"mkdir -p {d}/wheels {d}/data && chmod 700 {d}")
        say(f"Uploading {len(files)} wheels ({total / 1e6:.0f} MB) to {directory}/wheels")
        sent = 0
        began = time.monotonic()

        def on_file(file: Path) -> None:
            nonlocal sent
            sent += file.stat().st_size
            elapsed = time.monotonic() - began
            context.progress("upload", sent, total, rate=sent / elapsed if elapsed > 0 else None)

        await session.put(files, f"{directory}/wheels", on_file, again=force)
        say(f"Uploaded {sent / 1e6:.0f} MB in {time.monotonic() - began:.1f} s")
        say("Creating the venv")
        await session.run(
            f"test -x {d}/venv/bin/python || {_program(entry.python)} -m venv {d}/venv",
            limit_s=300, check=False)
        venv = await session.run(f"test -x {d}/venv/bin/python", check=False)
        if venv.code != 0:
            raise RemoteFailed(
                f"`{entry.python} -m venv` did not make a venv on {target.where}.", code="REMOTE_VENV_FAILED",
                details={"hive_id": hive_id},
                hint="Install the venv module there (apt install python3-venv).",
            )
        version = manifest.rbee_version
        say(f"Installing rbee {version} offline from the wheelhouse")
        pip = f"{d}/venv/bin/python -m pip install -q --disable-pip-version-check --no-index"
        installs = [f"{pip} --find-links {d}/wheels {_q(f'rbee=={version}')}"]
        if force:  # the same version number, other code (a checkout): pip would keep what is there
            say(f"--force: reinstalling rbee {version} over what is there")
            installs.append(f"{pip} --no-deps --force-reinstall {d}/wheels/{_q(manifest.rbee_wheel)}")
        installs += [f"{pip} --no-deps {d}/wheels/{_q(name)}" for name in manifest.no_deps]
        for command in installs:
            done = await session.run(command, limit_s=900, check=False)
            if done.code != 0:
                if "No space left" in done.stderr:
                    raise RemoteFailed(
                        f"The disk is full on {target.where} while installing into {directory}.",
                        code="REMOTE_DISK_FULL", details={"hive_id": hive_id},
                        hint=f"Free space there, or set install_dir in [hives.{hive_id}] to a bigger disk.",
                    )
                raise RemoteFailed(
                    f"pip failed on {target.where}: {ssh.last_line(done.stderr)}",
                    code="REMOTE_INSTALL_FAILED", details={"hive_id": hive_id},
                    hint="The wheelhouse may lack a wheel for it: rebuild it (rbee-keeper hive wheelhouse).",
                )
        check = await session.run(f"{d}/venv/bin/rbee-hive --version", check=False)
        reported = check.stdout.strip().rpartition(" ")[2]
        if check.code != 0 or reported != package_version():
            raise RemoteFailed(
                f"rbee-hive on {target.where} reports {reported or 'nothing'}; this queen is "
                f"{package_version()}.", code="HIVE_VERSION_MISMATCH", details={"hive_id": hive_id},
                hint="Reinstall: rbee-keeper hive install " + hive_id,
            )
        say(f"rbee-hive --version: {reported}, the same as this queen")
        await session.write_file(f"{directory}/hive.token", token.encode() + b"\n", mode=0o600)
        config = (f'[hive]\nhost = {json.dumps(ssh.real_host(entry.host))}\nport = {entry.hive_port}\n'
                  f'hive_id = {json.dumps(hive_id)}\ndata_dir = {json.dumps(directory + "/data")}\n')
        await session.write_file(f"{directory}/hive.toml", config.encode(), mode=0o600)
        say("Wrote the hive's token (0600) and config")
        record = InstallRecord(
            hive_id=hive_id, host=entry.host, install_dir=directory, version=version,
            python=".".join(map(str, remote["version"])), platform=remote["platform"],
            installed_at=time.time(), created_dir=created,
        )
        self.installs.save(record, token)
        say(f"Hive {hive_id} installed in {directory} on {target.where}")
        if hive_id in self.attached:
            say(f"Hive {hive_id} is running: restart it (hive stop, hive start) to run what was installed")
        return record

    # --- uninstall ----------------------------------------------------------------

    async def uninstall(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, purge: bool
    ) -> dict[str, Any]:
        def say(text: str) -> None:
            context.narrate("hive_uninstall", text, hive_id=hive_id)

        record = self._installed(hive_id)
        await self.stop(hive_id, entry, context)
        target = self.target(hive_id, entry)
        d = _q(record.install_dir)
        async with ssh.connect(target, say) as session:
            if record.created_dir and purge:
                await session.run(f"rm -rf {d}")
                say(f"Removed {record.install_dir} from {hive_id}")
            else:
                await session.run(f"rm -rf {d}/venv {d}/wheels {d}/hive.token {d}/hive.toml {d}/hive.log")
                say(f"Removed rbee from {record.install_dir} on {hive_id}; the models in "
                    f"{record.install_dir}/data are kept (--purge removes them)")
        self.installs.forget(hive_id)
        return {"hive_id": hive_id, "uninstalled": True, "purged": purge}

    # --- start and stop -------------------------------------------------------------

    def _command(self, record: InstallRecord, queen_url: str, *, lifeline: bool) -> str:
        d = _q(record.install_dir)
        return (f"{d}/venv/bin/rbee-hive --config {d}/hive.toml --api-token-file {d}/hive.token "
                f"--queen-url {_q(queen_url)}" + (" --lifeline stdin" if lifeline else ""))

    def _queen_url(self, session: ssh.Session, say: Callable[..., None]) -> str:
        if self.settings.advertise_url:
            return self.settings.advertise_url
        port = (self.queen_url or "").rpartition(":")[2] or str(self.settings.port)
        if self.settings.host in ("127.0.0.1", "localhost", "::1"):
            say("This queen listens on loopback only: that hive's workers cannot heartbeat to it. Start the "
                "queen with --host <address> --api-token-file FILE.", level="warn")
        address = session.local_address()
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{port}"

    async def start(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, detached: bool
    ) -> dict[str, Any]:
        def say(text: str, **fields: Any) -> None:
            context.narrate("hive_start", text, hive_id=hive_id, **fields)

        record = self._installed(hive_id)
        url = hive_url(entry)
        running = self.attached.get(hive_id)
        if (running is not None and not running.exited.is_set()) or await self._healthy(url):
            say(f"Hive {hive_id} is already running at {url}")
            return {"hive_id": hive_id, "url": url, "already_running": True,
                    "attached": running is not None}
        target = self.target(hive_id, entry)
        if detached:
            async with ssh.connect(target, say) as session:
                command = self._command(record, self._queen_url(session, say), lifeline=False)
                d = _q(record.install_dir)
                # every fd of the background group away from the session, or SSH waits for it to end
                background = f"(cd {d} && exec nohup setsid {command}) >> {d}/hive.log 2>&1 < /dev/null &"
                await session.run(background, limit_s=30)
            say(f"Started a detached hive on {hive_id}; waiting for {url}/health")
            with trio.move_on_after(self.settings.hive_start_timeout_s):
                while not await self._healthy(url):  # noqa: ASYNC110 (another machine: polling is all there is)
                    await trio.sleep(0.2)
                say(f"Hive {hive_id} is up at {url} (detached: it outlives this queen)")
                return {"hive_id": hive_id, "url": url, "attached": False}
            raise RemoteFailed(
                f"The detached hive on {target.where} did not answer at {url} within "
                f"{self.settings.hive_start_timeout_s:g} s.", code="HIVE_START_FAILED",
                details={"hive_id": hive_id}, hint=f"Its log is {record.install_dir}/hive.log on {hive_id}.",
            )
        attached = Attached(hive_id, url)
        pid = await self.nursery.start(self._run_attached, hive_id, entry, record, attached, say)
        say(f"Hive {hive_id} is up at {url} (pid {pid} on {entry.host}; attached to this queen)", pid=pid)
        return {"hive_id": hive_id, "url": url, "attached": True, "pid": pid}

    async def _run_attached(
        self, hive_id: str, entry: HiveEntry, record: InstallRecord, attached: Attached,
        say: Callable[..., None], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        target = self.target(hive_id, entry)
        started = False
        try:
            with attached.scope:
                async with ssh.connect(target, say) as session:
                    command = self._command(record, self._queen_url(session, say), lifeline=True)
                    say(f"Starting rbee-hive on {hive_id} over SSH (stdin lifeline)")
                    async with session.process(f"exec {command}") as process:
                        code: int | None = None
                        async with trio.open_nursery() as pumps:
                            pumps.start_soon(self._pump_stderr, process, attached)
                            pid: int | None = None
                            with trio.move_on_after(self.settings.hive_start_timeout_s):
                                pid = await self._read_ready(process)
                            if pid is not None:
                                attached.pid = pid
                                self.attached[hive_id] = attached
                                started = True
                                task_status.started(pid)
                                code = await process.wait()
                            else:
                                with trio.move_on_after(1):  # its last words, if it is exiting
                                    await process.wait()
                            pumps.cancel_scope.cancel()
                    if not started:
                        raise RemoteFailed(
                            f"rbee-hive on {target.where} did not become ready within "
                            f"{self.settings.hive_start_timeout_s:g} s. Its last lines: "
                            + (" | ".join(list(attached.log)[-5:]) or "(none)"),
                            code="HIVE_START_FAILED", details={"hive_id": hive_id},
                            hint=f"Fix what they say; or reinstall: rbee-keeper hive install {hive_id}",
                        )
                    log.warning("hive %s exited (status %s): %s", hive_id, code,
                                " | ".join(list(attached.log)[-3:]))
        finally:
            attached.exited.set()
            if self.attached.get(hive_id) is attached:
                del self.attached[hive_id]

    async def _read_ready(self, process: ssh.Process) -> int | None:
        while True:
            line = await process.readline()
            if not line:
                return None
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "ready":
                    return int(event.get("pid") or 0)

    async def _pump_stderr(self, process: ssh.Process, attached: Attached) -> None:
        hive_log = logging.getLogger(f"rbee.hive.{attached.hive_id}")
        while line := await process.readline("stderr"):
            attached.log.append(line.rstrip())
            hive_log.info("%s", line.rstrip())

    async def stop(self, hive_id: str, entry: HiveEntry, context: JobContext | None) -> dict[str, Any]:
        def say(text: str) -> None:
            if context is not None:
                context.narrate("hive_stop", text, hive_id=hive_id)
            log.info("%s", text)

        url = hive_url(entry)
        attached = self.attached.get(hive_id)
        if attached is None and not await self._healthy(url):
            say(f"Hive {hive_id} is not running")
            return {"hive_id": hive_id, "stopped": False, "was_running": False}
        say(f"Asking hive {hive_id} to shut down (it stops its workers first)")
        try:
            await self.http.post(f"{url}/v1/shutdown", headers=bearer(self.token(hive_id)), timeout=5.0)
        except httpx.HTTPError:
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
                while await self._healthy(url):  # noqa: ASYNC110 (another machine: polling is all there is)
                    await trio.sleep(0.2)
        say(f"Hive {hive_id} stopped")
        return {"hive_id": hive_id, "stopped": True, "was_running": True}

    async def stop_all(self) -> None:
        """The queen is stopping: stop every hive it holds a session to."""
        async with trio.open_nursery() as nursery:
            for hive_id in list(self.attached):
                entry = self.hives.get(hive_id)
                if entry is not None:
                    nursery.start_soon(self.stop, hive_id, entry, None)
        for attached in list(self.attached.values()):
            attached.scope.cancel()

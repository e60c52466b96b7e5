"""Hives on other machines: install, start, stop and uninstall them over SSH (DESIGN §7).

`Remote` holds what those jobs share (the hives' SSH targets and tokens, the
install records, the attached sessions) and runs `ssh_test` itself; each job
lives in its own module: `remote_install` (install, uninstall),
`remote_wheels` (the wheelhouse upload and offline pip install) and
`remote_run` (start, stop).

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

import logging
import time
from typing import Any

import httpx
import trio

from rbee_common.auth import cached_token_file
from rbee_common.client import map_transport_errors
from rbee_common.config import HiveEntry, QueenSettings
from rbee_common.errors import ConfigError, HiveNotInstalled, TransportError
from rbee_common.jobs import JobContext
from rbee_common.wire import HiveStarted, HiveStopped, HiveUninstalled, InstallRecord, SshChecked
from rbee_queen.fleet import remote_install, remote_run, ssh
from rbee_queen.fleet.remote_install import Installs
from rbee_queen.fleet.remote_run import Attached

log = logging.getLogger("rbee.queen.remote")


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

    def installed(self, hive_id: str) -> bool:
        """Installed by this queen (its record is there)."""
        return self.installs.record(hive_id) is not None

    def require_installed(self, hive_id: str) -> InstallRecord:
        record = self.installs.record(hive_id)
        if record is None:
            raise HiveNotInstalled(
                f"Hive {hive_id} is not installed by this queen.",
                details={"hive_id": hive_id}, hint=f"Install it first: rbee-keeper hive install {hive_id}",
            )
        return record

    async def healthy(self, url: str) -> bool:
        """Whether a hive answers at `url` (its /health, within 2 s)."""
        try:
            with map_transport_errors(url):
                response = await self.http.get(f"{url}/health", timeout=2.0)
        except TransportError:
            return False
        return response.status_code == 200

    # --- ssh_test -----------------------------------------------------------------

    async def ssh_test(self, hive_id: str, entry: HiveEntry, context: JobContext) -> SshChecked:
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
            binary = ssh.quote(f"{record.install_dir}/venv/bin/rbee-hive") if record else "rbee-hive"
            found = (await session.run(f"command -v {binary}", check=False)).stdout.strip() or None
            say(f"rbee-hive on {hive_id}: " + (found or "not installed (rbee-keeper hive install "
                                                         f"{hive_id})"))
        return SshChecked(hive_id=hive_id, ok=True, echo=echo.stdout.strip(), latency_ms=round(latency_ms, 2),
                          network_ms=round(network_ms, 2), rbee_hive=found)

    async def _network_ms(self, session: ssh.Session, entry: HiveEntry) -> float:
        """The network's own round trip to the host: one TCP connect to the SSH port we reached."""
        host, port = session.peer()
        began = time.monotonic()
        with trio.fail_after(entry.connect_timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        elapsed = (time.monotonic() - began) * 1000
        await stream.aclose()
        return elapsed

    # --- the jobs, one module each ------------------------------------------------------

    async def install(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, force: bool = False
    ) -> InstallRecord:
        return await remote_install.install(self, hive_id, entry, context, force=force)

    async def uninstall(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, purge: bool
    ) -> HiveUninstalled:
        return await remote_install.uninstall(self, hive_id, entry, context, purge=purge)

    async def start(
        self, hive_id: str, entry: HiveEntry, context: JobContext, *, detached: bool
    ) -> HiveStarted:
        return await remote_run.start(self, hive_id, entry, context, detached=detached)

    async def stop(self, hive_id: str, entry: HiveEntry, context: JobContext | None) -> HiveStopped:
        return await remote_run.stop(self, hive_id, entry, context)

    async def stop_all(self) -> None:
        """The queen is stopping: stop every hive it holds a session to."""
        await remote_run.stop_all(self)

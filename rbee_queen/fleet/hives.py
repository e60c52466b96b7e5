"""The hives as the queen reaches them: one `Hive` protocol, two transports.

`HttpHive` runs an operation as a job on the hive's HTTP API, relays the job's
events into the queen's job as they come, and decodes the result into the
type the operation declares. `InProcessHive` calls the `HiveService` that
lives in the queen's own process under `--local-hive` (the one sanctioned
import of `rbee_hive`, DESIGN §1). `HiveRouter` holds the mapping from hive id
to transport; nothing above it asks which kind a hive is (httpx's
`HTTPTransport` and `MockTransport` behind one `BaseTransport`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

import httpx
import msgspec
import trio

from rbee_common.auth import bearer
from rbee_common.client import JobClient, map_transport_errors
from rbee_common.config import HiveEntry
from rbee_common.daemon import package_version
from rbee_common.errors import (
    ConnectFailed,
    HiveInProcess,
    HiveNotFound,
    HiveUnreachable,
    RbeeError,
    RequestTimedOut,
    TransportError,
    error_from_response,
)
from rbee_common.jobs import JobContext, detached_context
from rbee_common.wire import Capabilities, HiveHealth, HiveOp, ModelGet, R
from rbee_hive.service import HiveService
from rbee_queen.fleet.ssh import real_host
from rbee_queen.heartbeats import Placement

_capabilities_decoder = msgspec.json.Decoder(Capabilities)


def hive_url(entry: HiveEntry) -> str:
    """Where the hive answers HTTP: its host as SSH reaches it (a ~/.ssh/config alias resolved)."""
    host = real_host(entry.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{entry.hive_port}"


class Hive(Protocol):
    """One hive, however the queen reaches it."""

    hive_id: str
    url: str
    """Its HTTP address, or `in-process`."""
    in_process: bool
    """Runs inside the queen (reported as `local` by `hive_list` and `hive_get`)."""

    async def run(self, operation: HiveOp[R], context: JobContext | None) -> R:
        """Run a hive operation; its events go to `context` (when given), its result comes back."""
        ...

    async def capabilities(self) -> Capabilities: ...

    async def health(self, timeout_s: float) -> HiveHealth:
        """Whether it answers; never raises for a hive that does not."""
        ...

    async def has_model(self, model: str) -> bool: ...

    async def model_bytes(self, model: str) -> int | None:
        """The size of its file of `model`, or None when it has none."""
        ...

    def credential(self) -> str | None:
        """The token the hive and its workers want from the queen (None: no token)."""
        ...

    def placement(self) -> Placement:
        """Where its workers may register from: its host and worker port range."""
        ...

    def ssh_entry(self) -> HiveEntry:
        """How the queen reaches its machine over SSH (`HiveInProcess` for one that has none)."""
        ...

    def installed(self) -> bool | None:
        """Installed by this queen over SSH (None: not a question for this hive)."""
        ...


class HttpHive:
    """A hive daemon reached over HTTP (its machine over SSH, for its lifecycle)."""

    in_process = False

    def __init__(
        self, hive_id: str, entry: HiveEntry, *, http: httpx.AsyncClient,
        token_for: Callable[[str], str | None], installed_for: Callable[[str], bool | None],
    ) -> None:
        self.hive_id = hive_id
        self.entry = entry
        self.url = hive_url(entry)
        self._http = http
        self._token_for = token_for
        self._installed_for = installed_for
        self._hint = f"Is it running? rbee-keeper hive status {hive_id}"

    async def run(self, operation: HiveOp[R], context: JobContext | None) -> R:
        client = JobClient(self.url, http=self._http, token=self.credential(), hint=self._hint)
        return await client.call(operation, on_event=context.emit if context is not None else None)

    async def capabilities(self) -> Capabilities:
        try:
            with map_transport_errors(f"hive {self.hive_id}", hint=self._hint):
                response = await self._http.get(f"{self.url}/v1/capabilities", timeout=5.0,
                                                headers=bearer(self.credential()))
        except TransportError as error:
            raise HiveUnreachable(error.message, hint=self._hint) from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)
        return _capabilities_decoder.decode(response.content)

    async def health(self, timeout_s: float) -> HiveHealth:
        problem: str | None = None
        version: str | None = None
        try:
            with map_transport_errors(f"hive {self.hive_id}"):
                response = await self._http.get(f"{self.url}/health", timeout=timeout_s)
        except ConnectFailed:
            problem = "not running (connection refused)"
        except RequestTimedOut:
            problem = f"no answer within {timeout_s:g} s"
        except TransportError:
            problem = "the connection failed"
        else:
            if response.status_code != 200:
                problem = f"unhealthy (HTTP {response.status_code})"
            else:
                with contextlib.suppress(ValueError, AttributeError):
                    version = response.json().get("version")
        return HiveHealth(hive_id=self.hive_id, url=self.url, reachable=problem is None, problem=problem,
                          version=version)

    async def has_model(self, model: str) -> bool:
        return await self.model_bytes(model) is not None

    async def model_bytes(self, model: str) -> int | None:
        try:
            entry = await self.run(ModelGet(model=model, hive_id=self.hive_id), None)
        except RbeeError:
            return None
        return entry.size_bytes

    def credential(self) -> str | None:
        return self._token_for(self.hive_id)

    def placement(self) -> Placement:
        return Placement(real_host(self.entry.host), self.entry.worker_port_min, self.entry.worker_port_max)

    def ssh_entry(self) -> HiveEntry:
        return self.entry

    def installed(self) -> bool | None:
        return self._installed_for(self.hive_id)


class InProcessHive:
    """The `localhost` hive inside the queen (--local-hive): each operation is a method call."""

    in_process = True
    url = "in-process"

    def __init__(self, hive_id: str, service: HiveService, *, token: Callable[[], str | None]) -> None:
        self.hive_id = hive_id
        self.service = service
        self._token = token

    async def run(self, operation: HiveOp[R], context: JobContext | None) -> R:
        value = await self.service.handle(operation, context or detached_context(operation, "queen"))
        return operation.check_result(value)

    async def capabilities(self) -> Capabilities:
        return await trio.to_thread.run_sync(self.service.capabilities)

    async def health(self, timeout_s: float) -> HiveHealth:
        return HiveHealth(hive_id=self.hive_id, url=self.url, reachable=True, version=package_version())

    async def has_model(self, model: str) -> bool:
        return self.service.catalog.find(model) is not None

    async def model_bytes(self, model: str) -> int | None:
        entry = self.service.catalog.find(model)
        return entry.size_bytes if entry is not None else None

    def credential(self) -> str | None:
        return self._token()  # its workers are the queen's own children: they use the queen's token

    def placement(self) -> Placement:
        settings = self.service.settings
        return Placement(settings.host, settings.worker_port_min, settings.worker_port_max)

    def ssh_entry(self) -> HiveEntry:
        raise HiveInProcess(
            f"Hive {self.hive_id} runs inside this queen (--local-hive); it has no SSH lifecycle.",
            hint="Restart the queen to restart it.",
        )

    def installed(self) -> bool | None:
        return None


class HiveRouter:
    """Hive id -> transport: an `HttpHive` per configured hive, and the in-process ones over them."""

    def __init__(
        self, entries: dict[str, HiveEntry], *, http: httpx.AsyncClient,
        token_for: Callable[[str], str | None] = lambda hive_id: None,
        installed_for: Callable[[str], bool | None] = lambda hive_id: None,
        in_process: Iterable[Hive] = (),
    ) -> None:
        self.entries = entries
        """The configured hives (the queen's config; read again in place by `reload`)."""
        self._http = http
        self._token_for = token_for
        self._installed_for = installed_for
        self._in_process = {hive.hive_id: hive for hive in in_process}
        self._built: dict[str, HiveEntry] = {}
        self.hives: dict[str, Hive] = {}
        self.reload: Callable[[], None] | None = None
        """Reads the hives from the config file again (into `entries`, in place)."""
        self._build()

    def _build(self) -> None:
        if self._built == self.entries and self.hives:
            return
        self._built = dict(self.entries)
        http: dict[str, Hive] = {
            hive_id: HttpHive(hive_id, entry, http=self._http, token_for=self._token_for,
                              installed_for=self._installed_for)
            for hive_id, entry in self._built.items()
        }
        self.hives = {**http, **self._in_process}

    def ids(self) -> list[str]:
        self._build()
        return list(self.hives)

    def all(self) -> list[Hive]:
        """Every hive, in the config's order."""
        self._build()
        return list(self.hives.values())

    def get(self, hive_id: str) -> Hive:
        self._build()
        hive = self.hives.get(hive_id)
        if hive is None and self.reload is not None:
            self.reload()  # `rbee-keeper hive add` may have added it since the queen started
            self._build()
            hive = self.hives.get(hive_id)
        if hive is None:
            raise _not_found()
        return hive

    def entry(self, hive_id: str) -> HiveEntry:
        """The hive's section of the config (the in-process one's too: `localhost` is always there)."""
        self.get(hive_id)
        entry = self.entries.get(hive_id)
        if entry is None:
            raise _not_found()
        return entry


def _not_found() -> HiveNotFound:
    return HiveNotFound(  # the other hives' names are not for whoever asked
        "No hive with that id is configured.", hint="See the configured hives with `rbee-keeper hive list`.")

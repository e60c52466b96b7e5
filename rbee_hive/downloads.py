"""Model downloads from Hugging Face (or any HF-compatible `HF_ENDPOINT`).

`huggingface_hub` resolves the repo (its files, sizes, LFS sha256 and the
revision), the URLs and the auth headers, honouring `HF_ENDPOINT` and
`HF_TOKEN`. The bytes move through httpx here, not `hf_hub_download`: a job
needs progress events, a cancellation point between chunks and a stall
timeout, and `hf_hub_download` is one blocking call with none of those.

A download lands in `<models>/.partial/<id>/` and resumes from there with a
`Range` request; only when every file is complete and its sha256 matches are
the files moved into the catalog and `meta.json` written (with each file's
sha256). Concurrent requests for one model share one transfer.

A model another hive of the fleet has is copied from that hive instead
(`copy`, with the `CopySource` the queen got from it: `rbee_hive/sharing.py`):
the same partial files, resume, progress and checks, against the sha256 of
the source's catalog entry.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
import msgspec
import trio

from rbee_common.client import map_transport_errors
from rbee_common.errors import (
    AccessDenied,
    DownloadCorrupt,
    DownloadFailed,
    DownloadStalled,
    InsufficientDisk,
    ModelNotFound,
    NotFound,
    RbeeError,
    RequestTimedOut,
    TransportError,
    UnsafeFileName,
)
from rbee_common.jobs import JobContext
from rbee_common.modelref import HfRef, parse_hf, quant_of, readable_id
from rbee_common.wire import (
    CatalogEntry,
    CopySource,
    ModelFormat,
)
from rbee_hive.catalog import Catalog, new_entry, selects
from rbee_hive.metrics import HiveMetrics

log = logging.getLogger("rbee.hive.downloads")
_MLX_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")







def check_file_name(name: str) -> None:
    """A file name from the Hub's API is a relative POSIX path with no way out of its folder.

    A mirror is not trusted: `../../x`, `/abs/x`, `a/../../b`, backslashes and
    control characters are refused before anything is written.
    """
    parts = name.split("/")
    if (
        not name or len(name) > 1024 or not name.isprintable() or "\\" in name or name.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnsafeFileName(
            "The Hub listed a file name that would write outside the model's folder; nothing was written.",
            hint="Check the mirror (HF_ENDPOINT): it answers with unsafe file names.",
        )


def inside(root: Path, path: Path) -> Path:
    """`path`, once it is certain to resolve inside `root` (symlinks included)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafeFileName(
            "A file of this model would land outside its folder; nothing was written.",
            hint="Check the mirror (HF_ENDPOINT) and the catalog folder for symlinks.",
        )
    return path


class RemoteFile(msgspec.Struct, frozen=True):
    name: str
    size: int
    sha256: str | None


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str
    reference: str
    repo: str
    revision: str
    files: list[RemoteFile]
    format: ModelFormat

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def _not_found(
    message: str,
    hint: str = "Check the name on the Hub; a private repo also needs HF_TOKEN in the hive's environment.",
    **details: Any,
) -> NotFound:
    return ModelNotFound(message, details=details, hint=hint)


def _access_denied() -> AccessDenied:
    return AccessDenied(
        "Access to that repository was denied (private or gated).",
        hint="Accept the model's terms on the Hub and set HF_TOKEN in the hive's environment.",
    )


def network_cause(error: BaseException) -> str:
    """What went wrong on the network, in words, from the error and the ones behind it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return f"its name does not resolve (DNS: {seen.strerror})"
        if isinstance(seen, ConnectionRefusedError):
            return "the connection was refused (nothing listens there)"
        if isinstance(seen, TimeoutError) or "timeout" in type(seen).__name__.lower():
            return "no answer in time"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed ({seen.reason or seen})"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {str(error)[:200]}"


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def resolve_plan(ref: str, hf: HfRef) -> Plan:
    """Blocking (run in a thread): ask the Hub what files the reference means."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(hf.repo, files_metadata=True, timeout=30)
    except GatedRepoError:
        raise _access_denied() from None
    except RepositoryNotFoundError:
        raise _not_found("No such model repository on the Hub (or it is private).") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise _access_denied() from None
        raise DownloadFailed(f"The Hub answered HTTP {status}.", hint="Try again later.") from None
    except Exception as error:  # noqa: BLE001 (huggingface_hub's own HTTP errors: refused, DNS, timeouts)
        raise DownloadFailed(
            f"Could not reach the Hub at {endpoint()}: {network_cause(error)}.",
            details={"endpoint": endpoint()},
            hint="Check the network and DNS; on a network without internet, point HF_ENDPOINT at a "
                 "mirror in the hive's environment, or copy the model from another hive "
                 "(rbee-keeper model download <model> --from-hive <hive>).",
        ) from None
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    ]
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    chosen: list[RemoteFile]
    if hf.select:
        chosen = [f for f in ggufs if selects(hf.select, f.name)]
    elif len(ggufs) > 1:
        chosen = [f for f in ggufs if quant_of(f.name) == "Q4_K_M"][:1]
    else:
        chosen = ggufs
    fmt: ModelFormat = "gguf"
    if not ggufs and not hf.select and any(f.name == "config.json" for f in files) and any(
        f.name.endswith(".safetensors") for f in files
    ):
        chosen, fmt = [f for f in files if f.name.endswith(_MLX_SUFFIXES)], "mlx"
    for file in chosen:
        check_file_name(file.name)
    if len(chosen) != 1 and fmt == "gguf":
        _no_single_file(hf, sorted(f.name for f in ggufs), several=bool(chosen))
    model_id = readable_id(hf.repo, chosen[0].name if fmt == "gguf" else None)
    return Plan(
        model_id=model_id, reference=ref, repo=hf.repo, revision=info.sha or "main",
        files=chosen, format=fmt,
    )


def _no_single_file(hf: HfRef, names: list[str], *, several: bool) -> NoReturn:
    """The reference picks no GGUF file of the repository, or several: say which there are."""
    if not names:
        raise _not_found("That repository has no GGUF file and is not an MLX model.")
    quants = sorted({q for q in map(quant_of, names) if q})
    example = ("Q4_K_M" if "Q4_K_M" in quants else quants[0]) if quants else names[0]
    offer = f"its quantizations: {', '.join(quants)}" if quants else f"its files: {', '.join(names[:20])}"
    if hf.select is None:
        said = f"{hf.repo} has {len(names)} GGUF files and none is Q4_K_M; say which, {offer}."
    elif several:
        said = f"'{hf.select}' matches several GGUF files of {hf.repo}; say which, {offer}."
    else:
        said = f"{hf.repo} has no GGUF file that matches '{hf.select}'; {offer}."
    raise _not_found(said, choices=names[:50],
                     hint=f"rbee-keeper model download hf:{hf.repo}:{example}")


class Transfer:
    def __init__(self, ref: str, first: str = "Resolving the model on the Hub") -> None:
        self.ref = ref
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self.notes: list[str] = [first]
        """What happened so far, narrated to every job that waits for it."""
        self.wake = trio.Event()
        self.finished = trio.Event()
        self.entry: CatalogEntry | None = None
        self.error: RbeeError | None = None
        self.waiters = 0
        self.scope = trio.CancelScope()

    def say(self, note: str) -> None:
        self.notes.append(note)
        self.wake.set()
        self.wake = trio.Event()

    def finish(self) -> None:
        self.finished.set()
        self.wake.set()

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-3)


class Downloader:
    def __init__(
        self, catalog: Catalog, nursery: trio.Nursery, *, stall_s: float, attempts: int, reserve_bytes: int
    ) -> None:
        self.catalog = catalog
        self.nursery = nursery
        self.stall_s = stall_s
        self.attempts = attempts
        self.reserve_bytes = reserve_bytes
        self.transfers: dict[str, Transfer] = {}
        self.locks: dict[str, trio.Lock] = {}
        """One per catalog id: two spellings of one Hub file never download it side by side."""
        self.metrics: HiveMetrics | None = None

    async def download(self, ref: str, context: JobContext) -> CatalogEntry:
        hf = parse_hf(ref)
        if hf is None:
            raise _not_found("Only hf:<org>/<repo>[:<file or quant>] references can be downloaded.")
        existing = self.catalog.find(ref)
        if existing is not None:
            context.narrate(
                "model_download", f"Model {existing.id} is already in the catalog", model=existing.id
            )
            return existing
        return await self._follow(ref, Transfer(ref), lambda t: self._transfer(t, hf), context)

    async def copy(self, source: CopySource, context: JobContext) -> CatalogEntry:
        """A model from another hive of the fleet (`model_download` with the queen's `source`)."""
        entry = source.entry
        existing = self.catalog.find(entry.id)
        if existing is not None:
            context.narrate("model_download", f"Model {existing.id} is already in the catalog",
                            model=existing.id)
            return existing
        first = f"Copying {entry.id} from hive {source.hive_id} (over the LAN, not from the Hub)"
        return await self._follow(entry.id, Transfer(entry.reference, first),
                                  lambda t: self._copy(t, source), context)

    async def _follow(
        self, key: str, fresh: Transfer, work: Callable[[Transfer], Awaitable[CatalogEntry]],
        context: JobContext,
    ) -> CatalogEntry:
        """Start `fresh` (or join the transfer of `key` under way) and narrate it to the end."""
        transfer = self.transfers.get(key)
        if transfer is None:
            transfer = self.transfers[key] = fresh
            self.nursery.start_soon(self._run, key, transfer, work)
        else:
            context.narrate("model_download", "Joining the download already in progress", model=key)
        transfer.waiters += 1
        seen = 0
        try:
            while True:
                for note in transfer.notes[seen:]:
                    context.narrate("model_download", note, model=key)
                seen = len(transfer.notes)
                if transfer.finished.is_set():
                    break
                if transfer.total is not None:
                    context.progress("download", transfer.done, transfer.total, rate=round(transfer.rate, 1))
                with trio.move_on_after(0.5):
                    await transfer.wake.wait()
            if transfer.error is not None:
                raise transfer.error
            if transfer.entry is None:
                raise DownloadFailed("The download ended without a model.")
            context.progress("download", transfer.done, transfer.total, rate=round(transfer.rate, 1))
            context.narrate("model_download", f"Model {transfer.entry.id} is in the catalog", model=key)
            return transfer.entry
        finally:
            transfer.waiters -= 1
            if transfer.waiters == 0 and not transfer.finished.is_set():
                transfer.scope.cancel()  # nobody waits for it any more; the partial file stays

    async def _run(
        self, key: str, transfer: Transfer, work: Callable[[Transfer], Awaitable[CatalogEntry]],
    ) -> None:
        try:
            with transfer.scope:
                transfer.entry = await work(transfer)
        except RbeeError as error:
            transfer.error = error
        except Exception as error:
            log.error("download of %s failed", key, exc_info=error)
            transfer.error = DownloadFailed(f"The download failed: {network_cause(error)}.",
                                            hint="See the hive's log; run it again: it resumes.")
        finally:
            if transfer.entry is None and transfer.error is None:
                transfer.error = DownloadFailed("The download was cancelled.")
            if self.metrics is not None:
                self.metrics.downloads.labels("failed" if transfer.error else "completed").inc()
                if transfer.error is not None:
                    self.metrics.download_failures.labels(transfer.error.code).inc()
            del self.transfers[key]
            transfer.finish()

    async def _transfer(self, transfer: Transfer, hf: HfRef) -> CatalogEntry:
        plan = await trio.to_thread.run_sync(resolve_plan, transfer.ref, hf)
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        def url(file: RemoteFile) -> str:
            return str(hf_hub_url(plan.repo, file.name, revision=plan.revision, endpoint=endpoint()))

        source = f"hf:{plan.repo}:{plan.files[0].name}" if plan.format == "gguf" else f"hf:{plan.repo}"
        file = plan.files[0].name if plan.format == "gguf" else None
        if any(e.id == plan.model_id and not _same_source(e, source) for e in self.catalog.list()):
            plan = msgspec.structs.replace(plan, model_id=readable_id(plan.repo, file, qualified=True))

        def register(path: Path, sums: dict[str, str]) -> CatalogEntry:
            return self.catalog.register(new_entry(
                model_id=plan.model_id, reference=plan.reference, provider="hf", fmt=plan.format,
                path=path, files=[f.name for f in plan.files], size=plan.total, source=source, sha256=sums,
            ))

        async with self.locks.setdefault(plan.model_id, trio.Lock()):  # one file, however it was asked for
            stored = next((e for e in self.catalog.list() if _same_source(e, source)), None)
            if stored is not None:
                transfer.say(f"{source} is in the catalog already, as {stored.id}")
                return stored
            return await self._pull(plan, transfer, url, build_hf_headers(), "the Hub", register)

    async def _copy(self, transfer: Transfer, source: CopySource) -> CatalogEntry:
        entry = source.entry
        sums = entry.sha256 or {}
        files = [RemoteFile(name, source.sizes[name], sums[name]) for name in entry.files]
        plan = Plan(model_id=entry.id, reference=entry.reference, repo="", revision="", files=files,
                    format=entry.format)
        origin = f"hive {source.hive_id}"

        def url(file: RemoteFile) -> str:
            return f"{source.url}/v1/models/{entry.id}/files/{quote(file.name)}"

        def register(path: Path, sums: dict[str, str]) -> CatalogEntry:
            return self.catalog.register(msgspec.structs.replace(
                entry, path=str(path), added_at=time.time(), sha256=sums, context_length=None))

        async with self.locks.setdefault(entry.id, trio.Lock()):  # not beside a download of it
            stored = self.catalog.find(entry.id)
            if stored is not None:
                return stored
            return await self._pull(plan, transfer, url, {"Authorization": f"Bearer {source.ticket}"}, origin,
                                    register)

    async def _pull(
        self, plan: Plan, transfer: Transfer, url: Callable[[RemoteFile], str], headers: dict[str, str],
        origin: str, register: Callable[[Path, dict[str, str]], CatalogEntry],
    ) -> CatalogEntry:
        """Fetch the plan's files into `.partial/` (resuming), check each against its sha256, move
        them into the catalog and `register` them (with every file's sha256)."""
        partial = inside(self.catalog.partial_root, self.catalog.partial_root / plan.model_id)
        partial.mkdir(parents=True, exist_ok=True)
        for file in plan.files:
            inside(partial, partial / (file.name + ".partial"))
        have = sum(_size(partial / (f.name + ".partial")) for f in plan.files)
        free = shutil.disk_usage(partial).free
        needed = plan.total - have + self.reserve_bytes
        if needed > free:
            raise InsufficientDisk(
                f"Not enough disk space: the download needs {_mb(plan.total - have)} MB more "
                f"(plus {_mb(self.reserve_bytes)} MB kept free) and {_mb(free)} MB are free.",
                details={"required_bytes": plan.total - have, "available_bytes": free,
                         "free_at_least_bytes": needed - free},
                hint=f"Free at least {_mb(needed - free)} MB on the hive's data disk.",
            )
        transfer.total, transfer.done = plan.total, have
        transfer.say(f"Downloading {len(plan.files)} file(s), {_mb(plan.total)} MB from {origin}" + (
            f", resuming at {_mb(have)} MB" if have else ""))
        timeout = httpx.Timeout(30.0, read=self.stall_s)
        sums: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as http:
            for file in plan.files:
                dest = partial / (file.name + ".partial")
                for check in range(2):  # a checksum mismatch deletes the file and downloads it once more
                    await self._fetch(http, url(file), headers, dest, file, transfer, origin)
                    sums[file.name] = await trio.to_thread.run_sync(_sha256, dest)
                    if not file.sha256 or sums[file.name] == file.sha256:
                        break
                    await trio.to_thread.run_sync(_remove, dest)
                    transfer.done -= file.size
                    if check:
                        raise DownloadCorrupt(
                            "The file did not match its checksum twice and was deleted.",
                            hint="Check the mirror (HF_ENDPOINT) or try later.",
                        )
                    transfer.say(f"{file.name} did not match its checksum; deleted, downloading it again")
        transfer.say("Checksums verified")
        final = inside(self.catalog.root, self.catalog.root / plan.model_id)
        for file in plan.files:
            target = inside(final, final / file.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / (file.name + ".partial"), target)
        shutil.rmtree(partial, ignore_errors=True)
        return register(final / plan.files[0].name if plan.format == "gguf" else final, sums)

    async def _fetch(
        self, http: httpx.AsyncClient, url: str, headers: dict[str, str], dest: Path, file: RemoteFile,
        transfer: Transfer, origin: str,
    ) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        problem: RbeeError = DownloadFailed("The download failed.")
        for attempt in range(self.attempts):
            if attempt:
                await trio.sleep(min(0.1 * 2 ** (attempt - 1), 5.0))
                transfer.say(f"{problem.message} Retrying (attempt {attempt + 1} of {self.attempts})")
            have = _size(dest)
            if have > file.size:
                _remove(dest)
                transfer.done -= have
                have = 0
            if have == file.size:
                return
            request_headers = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
            try:
                with map_transport_errors(origin):
                    async with http.stream("GET", url, headers=request_headers) as response:
                        if response.status_code in (401, 403):
                            raise _access_denied()
                        if response.status_code == 404:
                            raise _not_found("That file is not in the repository.")
                        if response.status_code not in (200, 206):
                            problem = DownloadFailed(f"{origin[0].upper()}{origin[1:]} answered HTTP "
                                                     f"{response.status_code}.")
                            continue
                        if response.status_code == 200 and have:  # the server ignored Range: start over
                            transfer.done -= have
                            have = 0
                        async with await trio.open_file(dest, "ab" if have else "wb") as out:
                            pending = bytearray()
                            received = have
                            try:
                                async for chunk in response.aiter_bytes():
                                    if received + len(chunk) > file.size:  # never more than the Hub announced
                                        chunk = chunk[: file.size - received]
                                        log.warning("%s sent more of %r than its %d announced bytes: "
                                                    "cut off", origin, file.name, file.size)
                                    pending += chunk
                                    received += len(chunk)
                                    transfer.done += len(chunk)
                                    if self.metrics is not None:
                                        self.metrics.download_bytes.inc(len(chunk))
                                    if received >= file.size:
                                        break
                                    if len(pending) >= 1 << 20:
                                        await out.write(bytes(pending))
                                        pending.clear()
                            finally:  # a cut connection keeps every byte that arrived
                                with trio.CancelScope(shield=True), trio.move_on_after(10.0):
                                    await out.write(bytes(pending))
                    if _size(dest) == file.size:
                        return
                    problem = DownloadFailed("The connection ended before the file was complete.")
            except RequestTimedOut:
                problem = DownloadStalled(
                    f"The download stalled: no data for {self.stall_s:g} s.",
                    hint="Check the network; the next try resumes where this one stopped.",
                )
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                raise InsufficientDisk(
                    "The disk filled up during the download.",
                    hint="Free space on the hive's data disk; the next try resumes where this one stopped.",
                ) from None
            except TransportError:
                problem = DownloadFailed(
                    f"The connection to {origin} broke.", hint="Run it again; it resumes where it stopped."
                )
            log.warning("download attempt %d of %s failed: %s", attempt + 1, file.name, problem.message)
        problem.details.setdefault("hint", "Run the download again; it resumes where it stopped.")
        raise problem


def _same_source(entry: CatalogEntry, source: str) -> bool:
    """Whether `entry` is the Hub file (or MLX repository) `source` names (`hf:org/repo[:file]`;
    the Hub does not tell `Org/Repo` from `org/repo`)."""
    return (entry.source or "").lower() == source.lower()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _mb(size: int) -> int:
    return round(size / 1e6)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

"""A hive's models for the other hives of the fleet: tickets, and the files over HTTP.

The queen asks a hive that has a model for a ticket (`model_share`): good for
that model's files alone, for an hour, minted here and known only here and to
the queen, which hands it to the hive that copies. That hive then reads
`GET /v1/models/<id>/files/<name>` with the ticket as its bearer token,
resumably (`Range: bytes=N-`), and checks each file against the sha256 the
grant carries. The hive's own token is accepted too; nothing else is: no
ticket, no file, with or without an API token configured.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from rbee_common.auth import TokenSource, matches, new_token, presented_token, refuse_token
from rbee_common.errors import InvalidRequest, ModelNotFound, NotFound
from rbee_common.wire import CatalogEntry, CopyGrant
from rbee_hive.catalog import Catalog

TICKET_S = 3600.0
"""How long a ticket is good for: a large copy, cut and resumed, fits in it."""
CHUNK = 1 << 20


class Tickets:
    """Tickets this hive gave the queen: ticket -> (catalog id, good until)."""

    def __init__(self) -> None:
        self._given: dict[str, tuple[str, float]] = {}

    def give(self, model_id: str) -> str:
        now = time.monotonic()
        self._given = {t: (m, until) for t, (m, until) in self._given.items() if until > now}
        ticket = new_token()
        self._given[ticket] = (model_id, now + TICKET_S)
        return ticket

    def allows(self, ticket: str, model_id: str) -> bool:
        now = time.monotonic()
        good = [t for t, (m, until) in self._given.items() if m == model_id and until > now]
        return matches(ticket, good) if good else False


def shareable(catalog: Catalog, ref: str) -> CatalogEntry:
    """The catalog entry of a model another hive may copy: one this hive downloaded."""
    entry = catalog.get(ref)
    if entry.provider != "hf":
        raise InvalidRequest(
            f"{entry.id} is not a downloaded model ({entry.provider}): only those are copied between hives.",
            details={"field": "model"},
            hint="Every hive has the built-in model; copy a file:// model's file yourself.",
        )
    return entry


def grant(catalog: Catalog, tickets: Tickets, ref: str) -> CopyGrant:
    """Blocking (it may hash the files of an entry written before entries kept their sha256)."""
    entry = shareable(catalog, ref)
    if not entry.sha256 or set(entry.sha256) != set(entry.files):
        folder = catalog.root / entry.id
        sums = {name: file_sha256(folder / name) for name in entry.files}
        entry = catalog.register(msgspec.structs.replace(entry, sha256=sums, context_length=None))
    folder = catalog.root / entry.id
    sizes = {name: (folder / name).stat().st_size for name in entry.files}
    return CopyGrant(entry=entry, sizes=sizes, ticket=tickets.give(entry.id), expires_s=TICKET_S)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def add_file_route(
    app: QuartTrio, catalog: Catalog, tickets: Tickets, token: TokenSource, rate: Callable[[], int],
) -> None:
    """`GET /v1/models/<id>/files/<name>` (install_auth leaves `/v1/models/` to it), at most
    `rate()` bytes a second a copy (0: no limit)."""

    @app.get("/v1/models/<model_id>/files/<path:name>")
    async def model_file(model_id: str, name: str) -> Response:
        presented = presented_token()
        own = token.current
        if not (tickets.allows(presented, model_id) or (own is not None and matches(presented, (own,)))):
            raise refuse_token(presented)
        entry = await trio.to_thread.run_sync(shareable, catalog, model_id)
        if entry.id != model_id or name not in entry.files:
            raise NotFound("That model has no such file.", details={"file": name})
        path = catalog.root / entry.id / name
        try:
            size = path.stat().st_size
        except OSError:
            raise ModelNotFound("That model's file is missing on this hive.") from None
        start = _range_start(request.headers.get("Range"), size)
        headers = {"Content-Length": str(size - start), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"

        async def body() -> AsyncIterator[bytes]:
            began, sent = trio.current_time(), 0
            async with await trio.open_file(path, "rb") as file:
                await file.seek(start)
                while chunk := await file.read(CHUNK):
                    yield chunk
                    sent += len(chunk)
                    if limit := rate():
                        await trio.sleep_until(began + sent / limit)

        return Response(body(), status=206 if start else 200, headers=headers)


def _range_start(header: str | None, size: int) -> int:
    """Where `Range: bytes=N-` starts (0 without one); only that form, as the copying hive sends."""
    if not header:
        return 0
    if not header.startswith("bytes=") or not header.endswith("-") or not header[6:-1].isdigit():
        raise InvalidRequest("Only `Range: bytes=<start>-` is served.", details={"field": "Range"})
    start = int(header[6:-1])
    if start >= size:
        raise InvalidRequest("The range starts past the end of the file.", details={"field": "Range"})
    return start

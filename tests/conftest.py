from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio

from rbee_common.config import HiveEntry, QueenSettings
from rbee_queen.config import LOCALHOST_HIVE, QueenConfig
from rbee_queen.serve import serve as queen_serve


class QueenHandle:
    def __init__(self, url: str, stop: trio.Event, http: httpx.AsyncClient) -> None:
        self.url = url
        self.stop = stop
        self.http = http


@pytest.fixture
async def start_queen(nursery: trio.Nursery) -> AsyncIterator[Callable[..., object]]:
    """Start a real queen on loopback, port 0, in the test's nursery."""
    clients: list[httpx.AsyncClient] = []
    stops: list[trio.Event] = []

    async def start(hives: dict[str, HiveEntry] | None = None, **settings: object) -> QueenHandle:
        config = QueenConfig(
            settings=QueenSettings(port=0, **settings),  # type: ignore[arg-type]
            hives={"localhost": LOCALHOST_HIVE, **(hives or {})},
        )
        stop = trio.Event()
        stops.append(stop)
        urls = await nursery.start(lambda task_status: queen_serve(config, stop=stop, task_status=task_status))
        http = httpx.AsyncClient(base_url=urls[0], timeout=httpx.Timeout(10.0, read=None))
        clients.append(http)
        return QueenHandle(urls[0], stop, http)

    yield start
    for stop in stops:
        stop.set()
    for client in clients:
        await client.aclose()


@pytest.fixture
async def queen(start_queen: Callable[..., object]) -> QueenHandle:
    handle = await start_queen()  # type: ignore[operator]
    assert isinstance(handle, QueenHandle)
    return handle


@pytest.fixture
async def stuck_hive(nursery: trio.Nursery) -> HiveEntry:
    """A machine that accepts TCP connections and never answers: a hung hive."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    port = listeners[0].socket.getsockname()[1]
    return HiveEntry(host="127.0.0.1", hive_port=port)

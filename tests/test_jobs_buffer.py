"""The bounded event buffer of one job (no I/O)."""

from __future__ import annotations

import trio

from rbee_common.jobs import Job
from rbee_common.wire import Status, Token


async def collect(job: Job, after: int | None = None) -> list[tuple[int | None, str]]:
    return [item async for item in job.follow(after)]


async def test_a_full_buffer_keeps_the_newest_events_and_the_terminator() -> None:
    job = Job(Status(), buffer=16)
    for index in range(100):
        job.emit(Token(t="x", i=index))
    job.finish("completed", "[DONE]")
    events = await collect(job)
    assert len(events) == 16
    assert events[-1] == (100, "[DONE]")
    assert events[0][0] == 85


async def test_follow_sees_events_emitted_later() -> None:
    job = Job(Status(), buffer=16)
    seen: list[tuple[int | None, str]] = []

    async def reader() -> None:
        seen.extend(await collect(job))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.01)
        job.emit(Token(t="a", i=0))
        await trio.sleep(0.01)
        job.finish("completed", "[DONE]")
    assert [seq for seq, _ in seen] == [0, 1]


async def test_nothing_is_emitted_after_the_terminator() -> None:
    job = Job(Status(), buffer=16)
    job.finish("cancelled", "[CANCELLED]")
    job.emit(Token(t="late", i=0))
    job.finish("completed", "[DONE]")
    assert await collect(job) == [(0, "[CANCELLED]")]
    assert job.state == "cancelled"

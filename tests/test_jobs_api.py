"""The job API of DESIGN §2 against a real queen on loopback (port 0)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import httpx
import pytest
import trio

from rbee_common.client import JobClient
from rbee_common.errors import JobCancelled, NotFound
from rbee_common.wire import Narration, QueenStatus, Result, SshTest, Status
from tests.conftest import QueenHandle

JOB_ID = re.compile(r"^job-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


async def read_stream(http: httpx.AsyncClient, job_id: str, headers: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(id, data) of every SSE event until the stream closes."""
    events: list[tuple[str, str]] = []
    current_id = ""
    async with http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                current_id = line[4:]
            elif line.startswith("data: "):
                events.append((current_id, line[6:]))
    return events


async def submit(http: httpx.AsyncClient, body: Any) -> str:
    response = await http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["sse_url"] == f"/v1/jobs/{created['job_id']}/stream"
    return str(created["job_id"])


async def test_status_job_streams_to_done(queen: QueenHandle) -> None:
    job_id = await submit(queen.http, {"operation": "status"})
    assert JOB_ID.match(job_id)
    events = await read_stream(queen.http, job_id)
    assert events[-1][1] == "[DONE]"
    payloads = [json.loads(data) for _, data in events[:-1]]
    assert {p["type"] for p in payloads} >= {"narration", "result"}
    result = next(p for p in payloads if p["type"] == "result")["value"]
    assert [h["hive_id"] for h in result["hives"]] == ["localhost"]
    assert result["workers"] == []
    assert [int(i) for i, _ in events] == list(range(len(events)))


async def test_late_stream_replays_every_event(queen: QueenHandle) -> None:
    job_id = await submit(queen.http, {"operation": "status"})
    first = await read_stream(queen.http, job_id)
    assert (await queen.http.get(f"/v1/jobs/{job_id}")).json()["state"] == "completed"
    second = await read_stream(queen.http, job_id)
    assert second == first


async def test_last_event_id_resumes_after_that_event(queen: QueenHandle) -> None:
    job_id = await submit(queen.http, {"operation": "status"})
    everything = await read_stream(queen.http, job_id)
    rest = await read_stream(queen.http, job_id, headers={"Last-Event-ID": everything[0][0]})
    assert rest == everything[1:]


async def test_job_status_endpoint(queen: QueenHandle) -> None:
    job_id = await submit(queen.http, {"operation": "status"})
    await read_stream(queen.http, job_id)
    info = (await queen.http.get(f"/v1/jobs/{job_id}")).json()
    assert info["job_id"] == job_id
    assert info["operation"] == "status"
    assert info["state"] == "completed"
    assert info["finished_at"] >= info["created_at"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b'{"operation": "nope-SECRET-4711"}', "VALIDATION_FAILED", "operation"),
        (b'{"hive_id": "SECRET-4711"}', "VALIDATION_FAILED", "operation"),
        (b'{"operation": "worker_get", "worker_id": "bad id SECRET-4711"}', "VALIDATION_FAILED", "worker_id"),
        (b'{"operation": "worker_spawn"}', "VALIDATION_FAILED", "model"),
        (b'{"operation": "status", SECRET-4711', "MALFORMED_JSON", None),
    ],
)
async def test_bad_submissions_name_the_problem_and_never_echo(
    queen: QueenHandle, body: bytes, code: str, field: str | None
) -> None:
    response = await queen.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["details"].get("field") == field
    assert "SECRET-4711" not in response.text
    assert "nope" not in response.text


async def test_unknown_operation_lists_the_valid_ones(queen: QueenHandle) -> None:
    response = await queen.http.post("/v1/jobs", json={"operation": "nope"})
    details = response.json()["error"]["details"]
    assert "status" in details["expected"] and "worker_spawn" in details["expected"]


async def test_body_over_one_mib_is_413(queen: QueenHandle) -> None:
    body = b'{"operation": "status", "pad": "' + b"SECRET-4711" * 100_000 + b'"}'
    assert len(body) > 1 << 20
    response = await queen.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert "SECRET-4711" not in response.text


async def test_body_just_under_the_limit_is_accepted(queen: QueenHandle) -> None:
    pad = "x" * ((1 << 20) - 100)
    response = await queen.http.post("/v1/jobs", json={"operation": "status", "pad": pad})
    assert response.status_code == 201


@pytest.mark.parametrize("job_id", ["job-00000000-0000-4000-8000-000000000000", "SECRET-4711"])
async def test_unknown_job_is_404_without_echo(queen: QueenHandle, job_id: str) -> None:
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/stream"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ):
        response = await queen.http.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "JOB_NOT_FOUND"
        assert job_id not in response.text


async def test_error_envelope_has_correlation_id_matching_header(queen: QueenHandle) -> None:
    json_type = {"Content-Type": "application/json"}
    first = await queen.http.post("/v1/jobs", content=b"{", headers=json_type)
    second = await queen.http.post("/v1/jobs", content=b"{", headers=json_type)
    ids = [r.json()["error"]["correlation_id"] for r in (first, second)]
    assert ids[0] != ids[1]
    assert first.headers["X-Correlation-Id"] == ids[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", ids[0])


async def test_a_failed_operation_ends_with_error_and_the_job_keeps_it(queen: QueenHandle) -> None:
    job_id = await submit(queen.http, {"operation": "ssh_test", "hive_id": "nowhere"})
    events = await read_stream(queen.http, job_id)
    assert events[-1][1].startswith("[ERROR] ")
    assert "No hive with that id" in events[-1][1]
    info = (await queen.http.get(f"/v1/jobs/{job_id}")).json()
    assert info["state"] == "failed"
    assert info["error"]["code"] == "HIVE_NOT_FOUND"


async def test_client_raises_the_servers_error_class(queen: QueenHandle) -> None:
    client = JobClient(queen.url, http=queen.http)
    with pytest.raises(NotFound) as caught:
        async with contextlib.aclosing(client.run(SshTest(hive_id="nowhere"))) as events:
            async for _ in events:
                pass
    assert caught.value.code == "HIVE_NOT_FOUND"
    assert "hives" not in caught.value.details and "localhost" not in str(caught.value.details)


async def test_client_yields_typed_events(queen: QueenHandle) -> None:
    client = JobClient(queen.url, http=queen.http)
    seen = []
    async with contextlib.aclosing(client.run(Status())) as events:
        async for event in events:
            seen.append(event)
    assert isinstance(seen[0], Narration)
    assert isinstance(seen[-1], Result)
    assert Status().decode_result(seen[-1].value).hives[0].hive_id == "localhost"


async def test_call_returns_the_declared_result_type(queen: QueenHandle) -> None:
    narrated: list[object] = []
    status = await JobClient(queen.url, http=queen.http).call(Status(), on_event=narrated.append)
    assert isinstance(status, QueenStatus) and status.hives[0].hive_id == "localhost"
    assert narrated and all(isinstance(event, Narration) for event in narrated)


async def test_delete_cancels_a_running_job(start_queen: Any, stuck_hive: Any) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60)
    job_id = await submit(queen.http, {"operation": "status"})
    with trio.fail_after(5):
        while (await queen.http.get(f"/v1/jobs/{job_id}")).json()["state"] != "running":
            await trio.sleep(0.01)
    response = await queen.http.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202
    with trio.fail_after(5):
        events = await read_stream(queen.http, job_id)
    assert events[-1][1] == "[CANCELLED]"
    assert (await queen.http.get(f"/v1/jobs/{job_id}")).json()["state"] == "cancelled"


async def test_client_stream_raises_on_cancelled_job(start_queen: Any, stuck_hive: Any) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60)
    client = JobClient(queen.url, http=queen.http)
    created = await client.submit(Status())

    async def cancel_soon() -> None:
        await trio.sleep(0.3)
        await client.cancel(created.job_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_soon)
        with pytest.raises(JobCancelled), trio.fail_after(5):
            async for _ in client.stream(created.job_id):
                pass


async def test_cancelling_the_caller_cancels_the_server_job(start_queen: Any, stuck_hive: Any) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60)
    client = JobClient(queen.url, http=queen.http)
    job_ids: list[str] = []
    with trio.move_on_after(0.5):
        async with contextlib.aclosing(client.run(Status(), on_created=lambda c: job_ids.append(c.job_id))) as events:
            async for _ in events:
                pass
    assert job_ids
    assert (await client.status(job_ids[0])).state == "cancelled"


async def test_live_jobs_are_bounded_with_429(start_queen: Any, stuck_hive: Any) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60, max_live_jobs=2)
    await submit(queen.http, {"operation": "status"})
    await submit(queen.http, {"operation": "status"})
    response = await queen.http.post("/v1/jobs", json={"operation": "status"})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "TOO_MANY_REQUESTS"
    assert int(response.headers["Retry-After"]) >= 1


async def test_finished_jobs_are_dropped_after_retention(start_queen: Any) -> None:
    queen = await start_queen(job_retention_s=0.2)
    job_id = await submit(queen.http, {"operation": "status"})
    await read_stream(queen.http, job_id)
    assert (await queen.http.get(f"/v1/jobs/{job_id}")).status_code == 200
    with trio.fail_after(5):
        while (await queen.http.get(f"/v1/jobs/{job_id}")).status_code != 404:
            await trio.sleep(0.05)


async def test_stop_ends_open_streams_with_a_terminator(start_queen: Any, stuck_hive: Any) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60)
    job_id = await submit(queen.http, {"operation": "status"})
    results: list[list[tuple[str, str]]] = []

    async def reader() -> None:
        results.append(await read_stream(queen.http, job_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.3)
        queen.stop.set()
    assert results[0][-1][1] == "[CANCELLED]"
    async with httpx.AsyncClient() as fresh:
        with trio.fail_after(5):
            while True:
                try:
                    await fresh.get(f"{queen.url}/health")
                except httpx.ConnectError:
                    break  # the server is down
                await trio.sleep(0.05)


async def test_health_and_build_info(queen: QueenHandle) -> None:
    assert (await queen.http.get("/health")).json()["status"] == "ok"
    info = (await queen.http.get("/v1/build-info")).json()
    assert info["program"] == "queen-rbee"
    assert info["version"]
    assert isinstance(info["features"], list)
    assert "build_timestamp" in info


async def test_a_job_takes_32_streams_and_answers_the_next_with_429(
    start_queen: Any, stuck_hive: Any,
) -> None:
    queen = await start_queen(hives={"stuck": stuck_hive}, hive_probe_timeout_s=60)
    job_id = await submit(queen.http, {"operation": "hive_status", "hive_id": "stuck"})  # runs until cancelled
    opened = 0
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(32):
            response = await streams.enter_async_context(queen.http.stream("GET", f"/v1/jobs/{job_id}/stream"))
            assert response.status_code == 200
            opened += 1
        refused = await queen.http.get(f"/v1/jobs/{job_id}/stream")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "TOO_MANY_REQUESTS"
        assert refused.headers["Retry-After"] == "1"
        await queen.http.delete(f"/v1/jobs/{job_id}")
    assert opened == 32
    # The streams were closed: there is room again (the job has ended; its buffer replays).
    assert [data for _, data in await read_stream(queen.http, job_id)][-1] == "[CANCELLED]"

from __future__ import annotations

import json

import httpx
from pytest_bdd import parsers, scenarios, then, when

from bdd.conftest import World
from harness.helpers import port_open

scenarios("sse_streaming.feature")


@then("the command exits 0 and prints the queen's status")
def exits_with_status(world: World) -> None:
    assert world.result is not None
    assert world.result.returncode == 0, world.result.stderr
    assert "hives" in world.result.stdout and "localhost" in world.result.stdout


@then("the queen the keeper started is shut down")
def queen_shut_down(world: World) -> None:
    assert world.result is not None and "Shutting down queen" in world.result.stderr
    assert not port_open(world.queen_url)


@then(parsers.parse('the job_id starts with "{prefix}"'))
def job_id_prefix(world: World, prefix: str) -> None:
    assert world.job_id.startswith(prefix)


@then(parsers.parse('the sse_url is "/v1/jobs/{{job_id}}/stream"'))
def sse_url_form(world: World) -> None:
    assert world.response is not None
    assert world.response.json()["sse_url"] == f"/v1/jobs/{world.job_id}/stream"


@then("the first event is a narration event")
def first_is_narration(world: World) -> None:
    assert json.loads(world.events[0])["type"] == "narration"


@then(parsers.parse('the stream ends with "{terminator}"'))
def stream_ends(world: World, terminator: str) -> None:
    assert world.events[-1] == terminator


@when("I open the SSE stream of a job that does not exist")
def open_missing(world: World) -> None:
    world.response = httpx.get(f"{world.queen_url}/v1/jobs/job-00000000-0000-4000-8000-000000000000/stream")


@then("the output shows, in this order:")
def output_in_order(world: World, datatable: list[list[str]]) -> None:
    assert world.result is not None
    output = world.result.stderr
    expected = [row[0] for row in datatable[1:]]
    positions = []
    for text in expected:
        assert text in output, f"missing {text!r} in:\n{output}"
        positions.append(output.index(text))
    assert positions == sorted(positions), output

from __future__ import annotations

import ast
import concurrent.futures
import re
import sys
import uuid
from pathlib import Path

import httpx
import trio
from anyio.from_thread import BlockingPortal
from pytest_bdd import parsers, scenarios, then, when

from bdd.conftest import World, error_bodies
from rbee_common.client import JobClient
from rbee_common.errors import RbeeError

scenarios("error_handling.feature")

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["rbee_common", "rbee_queen", "rbee_hive", "rbee_worker", "rbee_keeper"]


@then('no package contains a bare "except:" or an assert statement')
def no_shortcuts() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assert) or (isinstance(node, ast.ExceptHandler) and node.type is None):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@then('the error body has "code", "message" and "details"')
def structured(world: World) -> None:
    assert world.response is not None
    error = world.response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert isinstance(error["details"], dict)


@then("each error has a correlation_id that is a UUID")
def correlation_uuid(world: World) -> None:
    for error in error_bodies(world):
        uuid.UUID(error["correlation_id"])


@then("the two correlation_ids differ")
def correlation_differs(world: World) -> None:
    ids = [error["correlation_id"] for error in error_bodies(world)]
    assert len(set(ids)) == len(ids) == 2


def queen_log(world: World) -> str:
    assert world.queen is not None
    return world.queen.log()


@then("the queen's log has a line with that correlation_id")
def log_has_correlation(world: World) -> None:
    cid = error_bodies(world)[-1]["correlation_id"]
    assert any(cid in line for line in queen_log(world).splitlines())


@then(parsers.parse('the response does not contain "{secret}"'))
def no_secret(world: World, secret: str) -> None:
    assert world.response is not None
    assert secret not in world.response.text
    assert secret not in queen_log(world)


BAD_REQUESTS = {
    "validation": ("POST", "/v1/jobs", b'{"operation": "worker_get", "worker_id": "a b"}'),
    "malformed json": ("POST", "/v1/jobs", b"{"),
    "unknown job": ("GET", "/v1/jobs/job-00000000-0000-4000-8000-000000000000", None),
    "unknown route": ("GET", "/v1/nothing-here", None),
    "body too large": ("POST", "/v1/jobs", b'{"operation": "status", "x": "' + b"a" * (1 << 20) + b'"}'),
}


@when(parsers.parse('I send the bad request "{kind}"'))
def send_bad(world: World, kind: str) -> None:
    method, path, body = BAD_REQUESTS[kind]
    world.response = httpx.request(method, world.queen_url + path, content=body,
                                   headers={"Content-Type": "application/json"} if body else {})
    world.responses.append(world.response)


@when("I send every kind of bad request")
def send_all_bad(world: World) -> None:
    for kind in BAD_REQUESTS:
        send_bad(world, kind)


@then("no error message contains a path of the server or an IP address")
def no_paths(world: World) -> None:
    bodies = [r.text for r in world.responses]
    assert len(bodies) == len(BAD_REQUESTS)
    for text in bodies:
        assert str(ROOT) not in text and sys.prefix not in text and str(Path.home()) not in text
        assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text)


@when("I send 100 concurrent job submissions, half of them invalid")
def load(world: World) -> None:
    bodies = [b'{"operation": "status"}' if i % 2 else b'{"operation": "bogus"}' for i in range(100)]
    with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        world.responses = list(pool.map(
            lambda body: client.post(f"{world.queen_url}/v1/jobs", content=body,
                                 headers={"Content-Type": "application/json"}), bodies
        ))


@then("every valid one gets 201 and every invalid one a structured 400")
def load_results(world: World) -> None:
    for index, response in enumerate(world.responses):
        if index % 2:
            assert response.status_code == 201
        else:
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "VALIDATION_FAILED"


@then("the queen is still healthy")
def still_healthy(world: World) -> None:
    assert httpx.get(f"{world.queen_url}/health").json()["status"] == "ok"
    assert world.queen is not None and world.queen.process.poll() is None


@then("the error code is UPPER_SNAKE_CASE")
def upper_snake(world: World) -> None:
    assert world.response is not None
    assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", world.response.json()["error"]["code"])


@when("I follow the job with the job client")
def follow_with_client(world: World, portal: BlockingPortal) -> None:
    async def follow() -> None:
        async with httpx.AsyncClient() as http:
            client = JobClient(world.queen_url, http=http)
            with trio.fail_after(10):
                async for _ in client.stream(world.job_id):
                    pass

    try:
        portal.call(follow)
    except RbeeError as error:
        world.error = error


@then(parsers.parse('the job client raises the error "{code}"'))
def client_raised(world: World, code: str) -> None:
    assert isinstance(world.error, RbeeError)
    assert world.error.code == code


@then(parsers.parse('the job\'s status shows the error code "{code}"'))
def status_error(world: World, code: str) -> None:
    info = httpx.get(f"{world.queen_url}/v1/jobs/{world.job_id}").json()
    assert info["state"] == "failed" and info["error"]["code"] == code


@then("the queen's log has an error line with a timestamp, the component, the code and the correlation_id")
def audit_line(world: World) -> None:
    error = error_bodies(world)[-1]
    lines = [line for line in queen_log(world).splitlines() if error["correlation_id"] in line]
    assert lines
    line = lines[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)
    assert "component=queen" in line and f"code={error['code']}" in line


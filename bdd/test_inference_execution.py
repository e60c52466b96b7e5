from __future__ import annotations

import json
import threading
import time

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import COUNTING, Streaming, World
from harness.helpers import BIN, daemon, wait_for

scenarios("inference_execution.feature")

def worker_url(world: World) -> str:
    return str(world.extra["worker"].url)


def ready_state(world: World) -> dict[str, object]:
    value = httpx.get(f"{worker_url(world)}/v1/ready").json()
    assert isinstance(value, dict)
    return value


@given(parsers.re(r"(?P<count>\d+) long requests? occupying its slots"), converters={"count": int})
def long_requests(world: World, count: int) -> None:
    streams = [Streaming(worker_url(world), {**COUNTING, "request_id": f"req-long-{n}"}) for n in range(count)]

    def cancel_all() -> None:
        for n, stream in enumerate(streams):
            stream.disconnect.set()
            httpx.delete(f"{worker_url(world)}/v1/inference/req-long-{n}")
            stream.thread.join(30)

    world.extra["stack"].callback(cancel_all)
    for stream in streams:
        assert stream.first_token.wait(30) and stream.status == 200
    world.extra["long"] = streams


@when(parsers.parse("I send a chat inference request for {tokens:d} tokens and watch the worker's state"))
def chat_and_watch(world: World, tokens: int) -> None:
    body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": tokens,
            "temperature": 0}
    states: list[object] = []
    with httpx.stream("POST", f"{worker_url(world)}/v1/inference", json=body, timeout=60) as response:
        world.extra["content_type"] = response.headers["content-type"]
        world.events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                world.events.append(line[6:])
                if len(world.events) == 3:
                    states.append(ready_state(world)["state"])
    world.extra["states"] = states


@then("the response is an event stream")
def event_stream(world: World) -> None:
    assert world.extra["content_type"].startswith("text/event-stream")


@then(parsers.parse('it streams "started", tokens indexed from 0, "end" with counts, then "[DONE]"'))
def stream_shape(world: World) -> None:
    assert world.events[-1] == "[DONE]"
    events = [json.loads(e) for e in world.events[:-1]]
    assert events[0]["type"] == "started" and events[-1]["type"] == "end"
    tokens = events[1:-1]
    assert tokens and all(t["type"] == "token" for t in tokens)
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    assert events[-1]["tokens_out"] == len(tokens) and events[-1]["tokens_in"] > 0
    assert events[-1]["decode_ms"] > 0


@then(parsers.parse('the worker was "{during}" while streaming and is "{after}" after'))
def states_during_and_after(world: World, during: str, after: str) -> None:
    assert world.extra["states"] == [during]
    assert wait_for(lambda: ready_state(world)["state"] == after, timeout=2)


@when("I send another inference request")
def another_request(world: World) -> None:
    world.response = httpx.post(f"{worker_url(world)}/v1/inference", json={"prompt": "Hello", "max_tokens": 4})


@then(parsers.parse("the error details say {busy:d} of {total:d} slots are busy"))
def busy_details(world: World, busy: int, total: int) -> None:
    assert world.response is not None
    details = world.response.json()["error"]["details"]
    assert (details["slots_busy"], details["slots_total"]) == (busy, total)


@then(parsers.parse("the response asks to retry after {seconds:d} second"))
def retry_after(world: World, seconds: int) -> None:
    assert world.response is not None and world.response.headers["retry-after"] == str(seconds)


@when("I cancel the first long request with DELETE")
def cancel_first(world: World) -> None:
    world.response = httpx.delete(f"{worker_url(world)}/v1/inference/req-long-0")
    world.extra["cancelled_at"] = time.monotonic()


@then(parsers.parse('its stream ends with an "end" event whose stop_reason is "{reason}"'))
def ends_cancelled(world: World, reason: str) -> None:
    stream: Streaming = world.extra["long"][0]
    stream.thread.join(10)
    assert stream.events[-1] == "[DONE]"
    end = json.loads(stream.events[-2])
    assert end["type"] == "end" and end["stop_reason"] == reason


@then(parsers.parse('the worker is "{state}" again within {seconds:d} second'))
def ready_again(world: World, state: str, seconds: int) -> None:
    # The catalogue's bound: cancellation is checked between tokens (about 10 ms apart here), so a
    # slot still held after a second means the cancel was missed, not that the machine was slow.
    assert wait_for(lambda: ready_state(world)["state"] == state, timeout=seconds)
    assert ready_state(world)["slots_busy"] == 0


@when("the client of the first long request disconnects")
def disconnect_first(world: World) -> None:
    stream: Streaming = world.extra["long"][0]
    stream.disconnect.set()
    stream.thread.join(5)
    assert not stream.thread.is_alive()


@then("the worker's log says the client went away")
def log_says_gone(world: World) -> None:
    assert wait_for(lambda: "client went away" in world.extra["worker"].log(), timeout=2)


@then(parsers.parse("the DELETE answers {status:d}"))
def delete_answers(world: World, status: int) -> None:
    assert world.response is not None and world.response.status_code == status


@then(parsers.parse("a repeated DELETE answers {status:d} too"))
def delete_again(world: World, status: int) -> None:
    assert httpx.delete(f"{worker_url(world)}/v1/inference/req-long-0").status_code == status


@then(parsers.parse("a DELETE of a request that never existed answers {status:d}"))
def delete_unknown(world: World, status: int) -> None:
    assert httpx.delete(f"{worker_url(world)}/v1/inference/req-never-existed").status_code == status


@when(parsers.parse("{count:d} inference requests arrive at once"))
def arrive_at_once(world: World, count: int) -> None:
    barrier = threading.Barrier(count)
    body = {**COUNTING, "max_tokens": 1500}

    class AtOnce(Streaming):
        def _run(self) -> None:
            barrier.wait()
            super()._run()

    world.extra["racers"] = [AtOnce(worker_url(world), {**body, "request_id": f"req-race-{n}"})
                             for n in range(count)]
    world.extra["stack"].callback(lambda: [r.disconnect.set() for r in world.extra["racers"]])
    for racer in world.extra["racers"]:
        assert racer.first_token.wait(30)


@then(parsers.parse('exactly one of them streams and the other gets 503 "{code}"'))
def one_wins(world: World, code: str) -> None:
    racers: list[Streaming] = world.extra["racers"]
    assert sorted(r.status for r in racers) == [200, 503]
    (loser,) = [r for r in racers if r.status == 503]
    assert loser.error is not None and loser.error["code"] == code


@then(parsers.parse("the worker reports {busy:d} of {total:d} slots busy"))
def reports_slots(world: World, busy: int, total: int) -> None:
    ready = ready_state(world)
    assert (ready["slots_busy"], ready["slots_total"], ready["state"]) == (busy, total, "busy")


@given(parsers.parse('a worker with {slots:d} slot that wants the token "{token}"'))
def worker_with_token(world: World, slots: int, token: str) -> None:
    argv = [str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "CPU-0", "--threads", "1",
            "--slots", str(slots), "--port", "0"]
    world.extra["worker"] = world.extra["stack"].enter_context(daemon(argv, env={"RBEE_API_TOKEN": token}))


@when("I send an inference request without a token")
def request_without_token(world: World) -> None:
    world.response = httpx.post(f"{worker_url(world)}/v1/inference", json={"prompt": "Hello", "max_tokens": 2},
                                timeout=60)


@when(parsers.parse('I send an inference request with the token "{token}"'))
def request_with_token(world: World, token: str) -> None:
    world.response = httpx.post(f"{worker_url(world)}/v1/inference", json={"prompt": "Hello", "max_tokens": 2},
                                headers={"Authorization": f"Bearer {token}"}, timeout=60)

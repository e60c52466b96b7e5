from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import psutil
from pytest_bdd import parsers, scenarios, then, when

from bdd.conftest import World, active_workers
from harness.helpers import gone, wait_for

scenarios("queen_lifecycle.feature")

CLIENT = """
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
reply = client.chat.completions.create(model="smollm2-135m", max_tokens=10,
                                       messages=[{"role": "user", "content": "Say hello."}])
print(reply.choices[0].message.content)
"""


@when("a separate client process asks the queen for a chat completion and exits")
def client_process(world: World) -> None:
    world.result = subprocess.run([sys.executable, "-c", CLIENT, world.queen_url],
                                  capture_output=True, text=True, timeout=120)


@then("the client exited 0 and printed the answer")
def client_ok(world: World) -> None:
    assert world.result is not None and world.result.returncode == 0, world.result.stderr
    assert world.result.stdout.strip()


@then("the queen still answers /health")
def queen_health(world: World) -> None:
    assert httpx.get(f"{world.queen_url}/health").status_code == 200


@then("the queen still lists the worker the request started")
def still_listed(world: World) -> None:
    workers = active_workers(world)
    assert len(workers) == 1 and psutil.Process(int(workers[0]["pid"])).is_running()


@then("the keeper exited 0 without starting a queen")
def keeper_ok(world: World) -> None:
    assert world.result is not None and world.result.returncode == 0, world.result.stderr
    assert "waking queen" not in world.result.stderr
    assert "Shutting down queen" not in world.result.stderr


@when("the queen receives SIGTERM")
def sigterm_queen(world: World) -> None:
    assert world.queen is not None
    world.extra["pids"] = [int(w["pid"]) for w in world.extra["workers"]]
    world.queen.process.send_signal(signal.SIGTERM)
    world.extra["sent"] = time.monotonic()


@then(parsers.parse("the queen exits 0 within {seconds:d} seconds"))
def queen_exits(world: World, seconds: int) -> None:
    assert world.queen is not None and world.queen.process.wait(seconds) == 0
    # The workers' graceful stop is 5 s (DESIGN §6); the bound is that plus a margin, so exceeding it
    # means something was waited on past the cascade's deadline.
    assert time.monotonic() - world.extra["sent"] < seconds


@then("none of its workers is left")
def none_left(world: World) -> None:
    assert wait_for(lambda: all(gone(pid) for pid in world.extra["pids"]), timeout=2)



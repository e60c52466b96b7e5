from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World
from harness.helpers import BIN, daemon, free_port, job_result, port_free, stop_process, wait_for
from tests.test_worker import stream_events

scenarios("worker_lifecycle.feature")


def worker_command(model: str, *extra: str) -> list[str]:
    return [str(BIN / "llm-worker-rbee"), "--model", model, "--device", "CPU-0", "--threads", "1", *extra]


@when(parsers.parse('I start a worker for "{model}" on "{device}" that reports to the queen'))
def start_reporting_worker(world: World, model: str, device: str) -> None:
    # a port of the localhost hive's worker range: the queen takes heartbeats from nowhere else
    port = next(p for p in range(9300, 9400) if port_free(p))
    argv = [*worker_command(model, "--port", str(port), "--worker-id", "worker-bdd-1"), "--queen-url",
            world.queen_url, "--heartbeat-s", "0.3"]
    argv[argv.index("CPU-0")] = device
    world.extra["worker"] = world.extra["stack"].enter_context(daemon(argv))


@then("the worker prints one ready line with its worker_id and url")
def ready_line(world: World) -> None:
    ready = world.extra["worker"].ready
    assert ready["event"] == "ready" and ready["worker_id"] == "worker-bdd-1"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", str(ready["url"]))


@then("the worker answers on that url")
def answers(world: World) -> None:
    assert httpx.get(f"{world.extra['worker'].url}/health").status_code == 200


@then("the queen lists the worker with its url, model, backend and device")
def queen_lists(world: World) -> None:
    worker = world.extra["worker"]

    def listed() -> list[object]:
        value = job_result(world.queen_url, {"operation": "worker_list_active"})
        assert isinstance(value, list)
        return value

    assert wait_for(lambda: [e["state"] for e in listed()] == ["ready"], timeout=10)  # type: ignore[index]
    (entry,) = listed()
    assert isinstance(entry, dict)
    assert (entry["worker_id"], entry["url"], entry["model"], entry["backend"], entry["device"]) == (
        "worker-bdd-1", worker.url, "smollm2-135m", "llama-cpp", "CPU-0")


@when("I start a worker for the tiny MLX model on a fixed port")
def start_mlx_fixed_port(world: World, tiny_mlx_model: Path) -> None:
    port = free_port()
    world.extra["url"] = f"http://127.0.0.1:{port}"
    # Popen, not the daemon helper: we watch /v1/ready while it loads.
    log = open(world.tmp / "worker.log", "wb")  # noqa: SIM115 - closed by the stack
    world.extra["stack"].callback(log.close)
    process = subprocess.Popen(
        worker_command(str(tiny_mlx_model), "--port", str(port)),
        stdout=subprocess.PIPE, stderr=log, start_new_session=True,
    )
    world.extra["stack"].callback(stop_process, process)
    world.extra["process"] = process


@then(parsers.parse('/v1/ready answers "loading" before the worker announces it is ready'))
def loading_first(world: World) -> None:
    process: subprocess.Popen[bytes] = world.extra["process"]
    states: list[str] = []
    deadline = time.monotonic() + 30
    while not states and time.monotonic() < deadline:
        try:
            states.append(httpx.get(f"{world.extra['url']}/v1/ready", timeout=1).json()["state"])
        except httpx.TransportError:
            time.sleep(0.01)  # not bound yet
    assert states == ["loading"], states
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["event"] == "ready"


@then(parsers.parse('/v1/ready answers "ready" once it has announced it'))
def ready_after(world: World) -> None:
    assert httpx.get(f"{world.extra['url']}/v1/ready").json()["state"] == "ready"


@then(parsers.parse('/v1/ready answers "ready" with 0 of 1 slots busy'))
def ready_idle(world: World) -> None:
    ready = httpx.get(f"{world.extra['worker'].url}/v1/ready").json()
    assert (ready["state"], ready["slots_busy"], ready["slots_total"]) == ("ready", 0, 1)


@then("a chat inference request streams tokens")
def chat_streams(world: World) -> None:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    events = stream_events(world.extra["worker"].url, body)
    assert any(isinstance(e, dict) and e["type"] == "token" for e in events) and events[-1] == "[DONE]"


@given("a port that another process holds")
def held_port(world: World) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    world.extra["stack"].callback(sock.close)
    world.extra["port"] = sock.getsockname()[1]


def run_worker_to_exit(world: World, argv: list[str]) -> None:
    started = time.monotonic()
    world.result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    world.extra["took"] = time.monotonic() - started


@when("I start a worker on that port")
def start_on_held_port(world: World) -> None:
    run_worker_to_exit(world, worker_command("smollm2-135m", "--port", str(world.extra["port"])))


@given(parsers.parse('a file named "{name}" that is not a model'))
def broken_model(world: World, name: str) -> None:
    path = world.tmp / name
    path.write_bytes(b"GGUF but not really" * 100)
    world.extra["model_path"] = path


@when("I start a worker for that file")
def start_broken(world: World) -> None:
    run_worker_to_exit(world, worker_command(str(world.extra["model_path"]), "--port", "0"))


@then(parsers.parse("the worker exits with code {code:d} within {seconds:d} seconds"))
def exits_with(world: World, code: int, seconds: int) -> None:
    assert world.result is not None
    assert world.result.returncode == code, world.result.stderr
    # A deadline (the catalogue's 30 s for a start that fails), not a speed.
    assert world.extra["took"] < seconds


def one_error_line(world: World) -> str:
    assert world.result is not None
    assert "Traceback" not in world.result.stderr
    errors = [line for line in world.result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, world.result.stderr
    return errors[0]


@then("its log says in one line that the port is taken and how to fix it")
def port_taken_line(world: World) -> None:
    line = one_error_line(world)
    assert "Address already in use" in line and "--port" in line


@then("its log says in one line that llama.cpp could not load the model")
def load_failed_line(world: World) -> None:
    line = one_error_line(world)
    assert "llama.cpp could not load the model" in line and "hint:" in line

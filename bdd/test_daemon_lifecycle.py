from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

import psutil
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, job_value, start_hive
from harness.helpers import BIN, free_port, run_job

scenarios("daemon_lifecycle.feature")


def keeper_queen(world: World, args: str, env: dict[str, str] | None = None) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    world.queen_url = url
    started = time.monotonic()
    world.result = subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", url, *args.split()[1:]],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})},
    )
    world.extra["took"] = time.monotonic() - started
    world.extra["stack"].callback(
        lambda: subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, "queen", "stop"],
                               capture_output=True, timeout=30)
    )


def queen_process(world: World) -> psutil.Process:
    port = world.queen_url.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("queen-rbee" in part for part in cmdline) and port in cmdline:
            return process
    raise AssertionError("no queen process")


@when(parsers.parse('I run "{args}" with stdout and stderr captured by pipes'))
def run_captured(world: World, args: str) -> None:
    keeper_queen(world, args)


@then(parsers.parse("the command returns within {seconds:d} seconds with exit code {code:d}"))
def returns(world: World, seconds: int, code: int) -> None:
    assert world.result is not None and world.result.returncode == code, world.result.stderr
    # A deadline, not a speed: a command that waited on the daemon's pipes would never return.
    assert world.extra["took"] < seconds


@then("the queen keeps running without the pipes")
def queen_detached(world: World) -> None:
    process = queen_process(world)
    assert process.is_running()
    for fd in (1, 2):  # its stdout and stderr go to its log file, not to the keeper's pipes
        target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
        assert not target.startswith("pipe:"), target


@when(parsers.parse('I run "{args}" with SSH_AUTH_SOCK set to "{sock}"'))
def run_with_agent(world: World, args: str, sock: str) -> None:
    keeper_queen(world, args, env={"SSH_AUTH_SOCK": sock})
    assert world.result is not None and world.result.returncode == 0, world.result.stderr


@then(parsers.parse('the queen\'s environment has SSH_AUTH_SOCK "{sock}"'))
def agent_propagated(world: World, sock: str) -> None:
    assert queen_process(world).environ().get("SSH_AUTH_SOCK") == sock


def worker(world: World) -> dict[str, object]:
    value = job_value(world)
    assert isinstance(value, dict)
    return value


@then("the worker's pid is greater than 0 and belongs to a running process")
def valid_pid(world: World) -> None:
    pid = int(str(worker(world)["pid"]))
    assert pid > 0 and psutil.Process(pid).is_running()


@then("the worker runs the llm-worker-rbee next to the hive's Python")
def next_to_python(world: World) -> None:
    cmdline = psutil.Process(int(str(worker(world)["pid"]))).cmdline()
    assert str(BIN / "llm-worker-rbee") in cmdline


@when(parsers.parse("{count:d} workers are spawned at once"))
def spawn_at_once(world: World, count: int) -> None:
    url = world.extra["hive"].url
    body = {"operation": "worker_spawn", "model": "smollm2-135m", "device": "CPU-0", "threads": 1}
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        world.extra["spawns"] = list(pool.map(lambda _: run_job(url, body), range(count)))


@then(parsers.parse("all {count:d} spawns succeed with unique pids and ports"))
def unique(world: World, count: int) -> None:
    results = [[e["value"] for e in events if e["type"] == "result"] for events, _ in world.extra["spawns"]]
    assert [terminator for _, terminator in world.extra["spawns"]] == ["[DONE]"] * count
    workers = [r[0] for r in results]
    assert len({w["pid"] for w in workers}) == count and len({w["port"] for w in workers}) == count


@given("a running hive whose worker_binary is the absolute path of llm-worker-rbee")
def absolute(world: World) -> None:
    start_hive(world, f"worker_binary={BIN / 'llm-worker-rbee'}")


@given(parsers.parse('a running hive started in the scripts folder with worker_binary "{relative}"'))
def relative(world: World, relative: str) -> None:
    start_hive(world, f"worker_binary={relative}", cwd=BIN)


@given("a running hive whose worker_binary is a symlink to llm-worker-rbee")
def symlinked(world: World) -> None:
    link = world.tmp / "bin" / "worker-link"
    link.parent.mkdir()
    link.symlink_to(BIN / "llm-worker-rbee")
    world.extra["link"] = link
    start_hive(world, f"worker_binary={link}")


@then("the worker process runs the symlink's target")
def runs_target(world: World) -> None:
    pid = int(str(worker(world)["pid"]))
    cmdline = psutil.Process(pid).cmdline()
    assert str(world.extra["link"]) in cmdline
    assert Path(world.extra["link"]).resolve() == (BIN / "llm-worker-rbee").resolve()

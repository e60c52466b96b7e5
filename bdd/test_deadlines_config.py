"""Areas 340 (deadline propagation) and 360 (configuration and hot reload)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, queen_job, settings_env, start_queen
from harness.helpers import BIN, Daemon, daemon, job_result, wait_for
from rbee_common import deadlines
from rbee_common.config import load_config

scenarios("deadline_propagation.feature", "configuration_management.feature")

ROOT = Path(__file__).resolve().parent.parent


# --- 340: deadlines -------------------------------------------------------------------------


def synthetic_queen(world: World, rate: float, settings: str = "") -> None:
    config = world.tmp / "synthetic.toml"
    config.write_text(f"[hive]\nsynthetic_backend = true\nsynthetic_slots = 4\nsynthetic_tokens_per_s = {rate}\n")
    # On this test hive every spawn is synthetic, a cold start's too.
    start_queen(world, "--local-hive", "--config", str(config), env=settings_env(settings))


@given(parsers.parse("a running queen whose local hive serves synthetic workers at {rate:g} tokens/s"))
def queen_synthetic(world: World, rate: float) -> None:
    synthetic_queen(world, rate)


@given(parsers.parse('a running queen whose local hive serves synthetic workers at {rate:g} tokens/s and "{settings}"'))
def queen_synthetic_with(world: World, rate: float, settings: str) -> None:
    synthetic_queen(world, rate, settings)


@given("a synthetic worker spawned through the queen")
def synthetic_worker(world: World) -> None:
    queen_job(world, {"operation": "worker_spawn", "model": "synthetic", "backend": "synthetic"})
    assert world.extra["terminator"] == "[DONE]", world.extra["events"][-3:]


def deadline_in(world: World, seconds: float) -> str:
    value = deadlines.format_epoch(time.time() + seconds)
    world.extra["deadline"] = value
    return value


def chat_body(tokens: int, *, stream: bool) -> dict[str, Any]:
    return {"model": "synthetic", "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hello"}]}


@when(parsers.parse("I stream a chat completion of {tokens:d} tokens with X-Request-Deadline {seconds:d} seconds from now"))
def stream_with_deadline(world: World, tokens: int, seconds: int) -> None:
    headers = {deadlines.HEADER: deadline_in(world, seconds)}
    started = time.monotonic()
    with httpx.stream("POST", f"{world.queen_url}/v1/chat/completions", json=chat_body(tokens, stream=True),
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        world.events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    world.extra["took"] = time.monotonic() - started


@then(parsers.parse('the stream ends early with the error "{code}"'))
def stream_ends_with(world: World, code: str) -> None:
    assert world.events[-1] == "[DONE]"
    error = json.loads(world.events[-2])["error"]
    assert error["code"] == code and error["message"] == "Request exceeded deadline"
    tokens = [e for e in world.events if '"content":"w' in e]
    assert 0 < len(tokens) < 40  # some came, and not all: it was cut at the deadline


def worker_logs(world: World) -> str:
    folder = world.tmp / "state" / "rbee" / "workers"
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("*.log")))


@then(parsers.parse('the worker\'s log says "{text}" with that very deadline'))
def worker_log_deadline(world: World, text: str) -> None:
    deadline = world.extra["deadline"]
    assert wait_for(lambda: any(text in line and deadline in line for line in worker_logs(world).splitlines()),
                    timeout=5), worker_logs(world)[-2000:]


@then(parsers.parse("within {seconds:d} seconds the worker has no busy slot"))
def no_busy_slot(world: World, seconds: int) -> None:
    def idle() -> bool:
        workers = job_result(world.queen_url, {"operation": "worker_list"})
        assert isinstance(workers, list) and workers
        return all(int(w.get("slots_busy", 0)) == 0 for w in workers)

    assert wait_for(idle, timeout=seconds, interval=0.5)


@when(parsers.parse("I submit an infer job of {tokens:d} tokens with X-Request-Deadline {seconds:d} seconds from now"))
def infer_job_with_deadline(world: World, tokens: int, seconds: int) -> None:
    headers = {deadlines.HEADER: deadline_in(world, seconds)}
    created = httpx.post(f"{world.queen_url}/v1/jobs", headers=headers, timeout=10, json={
        "operation": "infer", "model": "synthetic", "prompt": "hello", "max_tokens": tokens})
    assert created.status_code == 201, created.text
    events: list[dict[str, Any]] = []
    terminator = ""
    with httpx.stream("GET", world.queen_url + created.json()["sse_url"], timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                if data.startswith("["):
                    terminator = data
                    break
                events.append(json.loads(data))
    world.extra["events"], world.extra["terminator"] = events, terminator


@then("the error details give that very deadline and the status 408")
def error_details_deadline(world: World) -> None:
    (failed,) = [e for e in world.extra["events"] if e["type"] == "narration" and e.get("error")]
    assert failed["error"]["details"]["deadline"] == world.extra["deadline"]
    assert failed["fields"]["status"] == 408


@when(parsers.parse("I ask for a chat completion of {tokens:d} tokens with X-Request-Deadline {seconds:d} "
                    "seconds from now and a {timeout:d} s client timeout"))
def ask_with_two_deadlines(world: World, tokens: int, seconds: int, timeout: int) -> None:
    headers = {deadlines.HEADER: deadline_in(world, seconds), deadlines.TIMEOUT_HEADER: str(timeout)}
    world.response = httpx.post(f"{world.queen_url}/v1/chat/completions", headers=headers,
                                json=chat_body(tokens, stream=False), timeout=60)


@when(parsers.parse("I ask for a chat completion of {tokens:d} tokens"))
def ask_plain(world: World, tokens: int) -> None:
    world.response = httpx.post(f"{world.queen_url}/v1/chat/completions", json=chat_body(tokens, stream=False),
                                timeout=60)


@then(parsers.parse('the OpenAI error code is "{code}"'))
def openai_error_code(world: World, code: str) -> None:
    assert world.response is not None
    assert world.response.json()["error"]["code"] == code


def daemon_log(process: Daemon) -> str:
    return process.log_path.read_text(errors="replace")


@then(parsers.parse('the queen log says "{text}"'))
def queen_log_says(world: World, text: str) -> None:
    assert world.queen is not None
    queen = world.queen
    assert wait_for(lambda: text in daemon_log(queen), timeout=5), daemon_log(queen)[-2000:]


# --- 360: configuration -------------------------------------------------------------------------


def write_config(world: World, settings: str) -> None:
    sections: dict[str, list[str]] = {}
    for pair in filter(None, (p.strip() for p in settings.split(","))):
        key, value = pair.split("=", 1)
        section, name = key.strip().split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {value.strip()}")
    text = "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())
    config = world.tmp / "rbee.toml"
    config.write_text(text + world.extra.get("hives_text", ""))
    world.extra["config"] = config


@given(parsers.parse('a config file with "{settings}"'))
def config_file(world: World, settings: str) -> None:
    write_config(world, settings)


@when(parsers.parse('the config file says "{settings}"'))
def config_says(world: World, settings: str) -> None:
    write_config(world, settings)


@when(parsers.parse('the config file gains the hive "{alias}" at "{host}"'))
def config_gains_hive(world: World, alias: str, host: str) -> None:
    config: Path = world.extra["config"]
    config.write_text(config.read_text() + f'\n[hives.{alias}]\nhost = "{host}"\n')


@when("the config file is not valid TOML")
def config_broken(world: World) -> None:
    config: Path = world.extra["config"]
    config.write_text(config.read_text() + "\n[queen\nmax_body_bytes = = 1\n")


def queen_argv(world: World) -> list[str]:
    return [str(BIN / "queen-rbee"), "--port", "0", "--config", str(world.extra["config"])]


@given("the queen runs with that config")
def queen_with_config(world: World) -> None:
    start_queen(world, "--config", str(world.extra["config"]))


@when(parsers.parse('the queen starts with that config and the API token "{token}"'))
def queen_with_token(world: World, token: str) -> None:
    path = world.tmp / "api.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    start_queen(world, "--config", str(world.extra["config"]), "--api-token-file", str(path))


@when(parsers.parse('the queen starts with that config and "{variable}={value}"'))
def queen_with_env(world: World, variable: str, value: str) -> None:
    start_queen(world, "--config", str(world.extra["config"]), env={variable: value})


@when("the queen starts with that config")
def queen_start_attempt(world: World) -> None:
    world.result = subprocess.run(queen_argv(world), capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)


@then(parsers.parse('it exits with code {code:d} and says "{text}"'))
def exits_with(world: World, code: int, text: str) -> None:
    assert world.result is not None
    assert world.result.returncode == code, world.result.stderr
    assert text in world.result.stderr


@then("it prints no traceback")
def no_traceback(world: World) -> None:
    assert world.result is not None
    assert "Traceback" not in world.result.stderr + world.result.stdout


@then(parsers.parse('the queen log says "{text}" with the config file'))
def queen_log_with_file(world: World, text: str) -> None:
    assert world.queen is not None
    log = daemon_log(world.queen)
    assert f"{text}{world.extra['config']}" in log, log[-2000:]


@then(parsers.parse('the queen log does not contain "{text}"'))
def queen_log_lacks(world: World, text: str) -> None:
    assert world.queen is not None
    assert text not in daemon_log(world.queen)


def post_body(url: str, size: int) -> httpx.Response:
    body = json.dumps({"operation": "status", "pad": "x" * size})[:size].ljust(size)
    return httpx.post(f"{url}/v1/jobs", content=body.encode(), headers={"Content-Type": "application/json"},
                      timeout=10)


@given(parsers.parse("a body of {size:d} bytes to /v1/jobs is refused with 413"))
@then(parsers.parse("a body of {size:d} bytes to /v1/jobs is refused with 413"))
def queen_refuses(world: World, size: int) -> None:
    assert post_body(world.queen_url, size).status_code == 413


@then(parsers.parse("a body of {size:d} bytes to /v1/jobs is not refused with 413"))
def queen_takes(world: World, size: int) -> None:
    def taken() -> bool:
        return post_body(world.queen_url, size).status_code != 413

    assert wait_for(taken, timeout=5, interval=0.2)


@when("the queen gets SIGHUP")
def queen_sighup(world: World) -> None:
    assert world.queen is not None
    world.extra["pid"] = world.queen.process.pid
    world.queen.process.send_signal(signal.SIGHUP)


@then(parsers.parse('the queen log has a line with "{first}" and "{second}"'))
def queen_log_both(world: World, first: str, second: str) -> None:
    assert world.queen is not None
    queen = world.queen

    def found() -> bool:
        return any(first in line and second in line for line in daemon_log(queen).splitlines())

    assert wait_for(found, timeout=5), daemon_log(queen)[-2000:]


@then("the queen's pid is the same")
def same_pid(world: World) -> None:
    assert world.queen is not None
    assert world.queen.process.poll() is None and world.queen.process.pid == world.extra["pid"]


@then(parsers.parse('the queen lists the hive "{alias}"'))
def queen_lists_hive(world: World, alias: str) -> None:
    hives = job_result(world.queen_url, {"operation": "hive_list"})
    assert isinstance(hives, list)
    assert alias in [hive["hive_id"] for hive in hives]


@then("the queen still answers /health")
def queen_health(world: World) -> None:
    assert httpx.get(f"{world.queen_url}/health", timeout=5).status_code == 200


@given("the hive runs with that config")
def hive_with_config(world: World) -> None:
    hive: Daemon = world.extra["stack"].enter_context(
        daemon([str(BIN / "rbee-hive"), "--port", "0", "--config", str(world.extra["config"])]))
    world.extra["hive"] = hive


@given(parsers.parse("a body of {size:d} bytes to the hive's /v1/jobs is refused with 413"))
def hive_refuses(world: World, size: int) -> None:
    assert post_body(world.extra["hive"].url, size).status_code == 413


@then(parsers.parse("a body of {size:d} bytes to the hive's /v1/jobs is not refused with 413"))
def hive_takes(world: World, size: int) -> None:
    url = world.extra["hive"].url
    assert wait_for(lambda: post_body(url, size).status_code != 413, timeout=5, interval=0.2)


@when("the hive gets SIGHUP")
def hive_sighup(world: World) -> None:
    world.extra["hive"].process.send_signal(signal.SIGHUP)


@then(parsers.parse('the hive log has a line with "{first}" and "{second}"'))
def hive_log_both(world: World, first: str, second: str) -> None:
    hive: Daemon = world.extra["hive"]

    def found() -> bool:
        return any(first in line and second in line for line in daemon_log(hive).splitlines())

    assert wait_for(found, timeout=5), daemon_log(hive)[-2000:]


@then("the config example in the README loads without error")
def readme_config_loads(world: World) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S) if "[queen]" in b or "[hive]" in b]
    assert blocks
    for index, block in enumerate(blocks):
        tomllib.loads(block)
        path = world.tmp / f"example-{index}.toml"
        path.write_text(block)
        load_config(str(path))  # the schema: unknown keys and bad values raise


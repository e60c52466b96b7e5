"""Area 350: Prometheus metrics on the queen, its hive and the workers.

One queen (with a token and `--local-hive`, whose workers are synthetic) serves every
scenario of the module: metrics are counters that only grow, so each scenario compares
scrapes taken before and after what it does.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import types
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World
from harness.fake_hf import FakeHub
from harness.helpers import (
    BIN,
    Daemon,
    daemon,
    isolated_env,
    job_result,
    metric_total,
    parse_metrics,
    wait_for,
)
from rbee_hive.devices import detect_devices
from rbee_hive.metrics import HiveMetrics

scenarios("metrics_observability.feature")

TOKEN = "metrics-scenario-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = "not-the-token-but-long-enough-42"
CONVERT = {"count": int, "mb": int, "rate": int, "seconds": int}
"""The numbers in steps (the steps with quoted names match with regular expressions: a quoted name
never swallows the words after it)."""


@pytest.fixture(scope="module")
def met_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    with FakeHub(tmp_path_factory.mktemp("met-hub")) as running:
        yield running


@pytest.fixture(scope="module")
def met_queen(tmp_path_factory: pytest.TempPathFactory, met_hub: FakeHub) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("met-queen")
    env = isolated_env(root)
    config = root / "queen.toml"
    config.write_text("[hive]\nsynthetic_backend = true\nsynthetic_tokens_per_s = 200\n"
                      "worker_check_s = 0.5\nmetrics_public = true\n")
    env.update({"RBEE_API_TOKEN": TOKEN, "HF_ENDPOINT": met_hub.url})
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)],
                env=env) as running:
        yield running


def page(url: str, headers: dict[str, str] | None = None) -> str:
    response = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


parse = parse_metrics
total = metric_total


def rose(world: World, name: str, **labels: str) -> float:
    before, after = world.extra["before"], world.extra["after"]
    return total(after, name, **labels) - total(before, name, **labels)


def chat(queen: Daemon, model: str, content: str = "Say something.", max_tokens: int = 4) -> None:
    response = httpx.post(f"{queen.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    assert response.status_code == 200, response.text


def worker_of(queen: Daemon, model: str) -> dict[str, Any]:
    workers = job_result(queen.url, {"operation": "worker_list_active", "model": model}, headers=AUTH)
    assert isinstance(workers, list) and workers, workers
    worker = workers[0]
    assert isinstance(worker, dict)
    return worker


# --- given / when ------------------------------------------------------------------------------


@given(parsers.re(r'a synthetic worker of "(?P<model>[^"]+)" started by a chat request'), converters=CONVERT)
def synthetic_worker(world: World, met_queen: Daemon, model: str) -> None:
    chat(met_queen, model)
    world.extra["worker"] = worker_of(met_queen, model)


@when("I scrape the queen")
def scrape_queen(world: World, met_queen: Daemon) -> None:
    world.extra["page"] = page(met_queen.url, AUTH)
    world.extra["before"] = parse(world.extra["page"])


@when("I scrape the queen again")
def scrape_again(world: World, met_queen: Daemon) -> None:
    world.extra["after"] = parse(page(met_queen.url, AUTH))


@when("I scrape the queen and the worker")
def scrape_both(world: World, met_queen: Daemon) -> None:
    world.extra["page"] = page(met_queen.url, AUTH)
    world.extra["worker_page"] = page(str(world.extra["worker"]["url"]))  # its hive made it public


@when(parsers.re(r'I send (?P<count>\d+) chat requests for "(?P<model>[^"]+)"'), converters=CONVERT)
def send_chats(met_queen: Daemon, count: int, model: str) -> None:
    for _ in range(count):
        chat(met_queen, model)


@when(parsers.re(r'I send a chat request for "(?P<model>[^"]+)" whose prompt holds "(?P<text>[^"]+)"'), converters=CONVERT)
def send_private_chat(world: World, met_queen: Daemon, model: str, text: str) -> None:
    chat(met_queen, model, content=f"Remember {text} for me.")
    world.extra["prompt"] = text


@when("I submit a job with an unknown operation")
def unknown_operation(world: World, met_queen: Daemon) -> None:
    response = httpx.post(f"{met_queen.url}/v1/jobs", headers=AUTH, json={"operation": "no_such_operation"})
    assert response.status_code == 400, response.text
    world.response = response


@when("I send a request with the wrong token")
def wrong_token(met_queen: Daemon) -> None:
    response = httpx.get(f"{met_queen.url}/v1/jobs", headers={"Authorization": f"Bearer {WRONG}"})
    assert response.status_code == 401


@when("I stop that worker through the queen")
def stop_worker(world: World, met_queen: Daemon) -> None:
    worker = world.extra["worker"]
    job_result(met_queen.url, {"operation": "worker_stop", "worker_id": worker["worker_id"]}, headers=AUTH)
    world.extra["after"] = parse(page(met_queen.url, AUTH))


@when(parsers.parse("that worker's process is stopped with SIGSTOP"))
def sigstop(world: World) -> None:
    os.kill(int(world.extra["worker"]["pid"]), signal.SIGSTOP)  # alive, but its HTTP answers nothing: the hive's checks fail


@when("that worker's process is killed with SIGKILL")
def sigkill(world: World) -> None:
    os.kill(int(world.extra["worker"]["pid"]), signal.SIGKILL)


@given(parsers.re(r'the hub serves "(?P<repo>[^"]+)" with a (?P<mb>\d+) MB file at (?P<rate>\d+) MB/s'), converters=CONVERT)
def hub_serves(met_hub: FakeHub, repo: str, mb: int, rate: int) -> None:
    met_hub.add_file(repo, "tiny.Q4_K_M.gguf", os.urandom(mb * 1000 * 1000))
    met_hub.rate = rate * 1e6


@when(parsers.re(r'I start downloading "(?P<reference>[^"]+)" on the local hive'), converters=CONVERT)
def start_download(world: World, met_queen: Daemon, reference: str) -> None:
    response = httpx.post(f"{met_queen.url}/v1/jobs", headers=AUTH,
                          json={"operation": "model_download", "model": reference})
    assert response.status_code == 201, response.text
    world.job_id = response.json()["job_id"]


@when("the download job is done")
def download_done(world: World, met_queen: Daemon) -> None:
    with httpx.stream("GET", f"{met_queen.url}/v1/jobs/{world.job_id}/stream", headers=AUTH,
                      timeout=httpx.Timeout(10, read=60)) as stream:
        last = [line for line in stream.iter_lines() if line.startswith("data: ")][-1]
    assert last == "data: [DONE]", last


# --- then ----------------------------------------------------------------------------------------


@then("both pages parse as Prometheus text")
def both_parse(world: World) -> None:
    queen, worker = parse(world.extra["page"]), parse(world.extra["worker_page"])
    assert total(queen, "rbee_queen_http_requests_total") > 0
    assert total(worker, "rbee_worker_inferences_total", outcome="completed") >= 1


@then("the queen's page holds the in-process hive's series too")
def hive_series(world: World) -> None:
    assert total(parse(world.extra["page"]), "rbee_hive_worker_spawns_total", outcome="completed") >= 1


@then("/metrics on the queen without the token is refused with 401")
def refused_without_token(met_queen: Daemon) -> None:
    assert httpx.get(f"{met_queen.url}/metrics").status_code == 401


@then(parsers.parse("the queen's log says \"{text}\""))
def queen_log_says(met_queen: Daemon, text: str) -> None:
    assert text in met_queen.log()


@then("every metric family has a HELP and a TYPE line")
def help_and_type(world: World) -> None:
    text = world.extra["page"]
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(families) > 20
    for family in families.values():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"# HELP {exposed} " in text and family.documentation, family.name
        assert f"# TYPE {exposed} {family.type}" in text, family.name


@then(parsers.re(r'every name is snake_case under "(?P<queen>[^"]+)" or "(?P<hive>[^"]+)"'), converters=CONVERT)
def snake_case(world: World, queen: str, hive: str) -> None:
    for family in text_string_to_metric_families(world.extra["page"]):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name), family.name
        assert family.name.startswith((queen, hive)), family.name


@then("counters end in \"_total\", and durations and sizes carry their unit")
def units(world: World) -> None:
    text = world.extra["page"]
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert f"# TYPE {family.name}_total counter" in text
        if "duration" in family.name or "wait" in family.name or "first_token" in family.name:
            assert family.name.endswith("_seconds"), family.name
        if "memory" in family.name or "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name


@then(parsers.re(r'"(?P<name>[^"]+)" has a series for each of loading, ready, busy and draining'), converters=CONVERT)
def every_state(world: World, name: str) -> None:
    states = {dict(labels)["state"] for (sample, labels) in world.extra["before"] if sample == name}
    assert states == {"loading", "ready", "busy", "draining"}


@then(parsers.re(r'the "(?P<state>[^"]+)" workers number at least (?P<count>\d+)'), converters=CONVERT)
def workers_at_least(world: World, state: str, count: int) -> None:
    assert total(world.extra["before"], "rbee_queen_workers", state=state) >= count


@then(parsers.re(r'the "(?P<state>[^"]+)" workers number one fewer'), converters=CONVERT)
def workers_one_fewer(world: World, state: str) -> None:
    assert rose(world, "rbee_queen_workers", state=state) == -1


@then(parsers.re(r'the latency histogram of "(?P<route>[^"]+)" has the buckets 0\.001, 0\.01, 0\.1, 1 and 10'), converters=CONVERT)
def buckets(world: World, route: str) -> None:
    edges = {float(dict(labels)["le"]) for (sample, labels) in world.extra["after"]
             if sample == "rbee_queen_http_request_duration_seconds_bucket" and dict(labels)["route"] == route}
    assert {0.001, 0.01, 0.1, 1.0, 10.0} <= edges
    world.extra["route"] = route


@then(parsers.parse("its count rose by {count:d}"))
def count_rose(world: World, count: int) -> None:
    route = world.extra["route"]
    assert rose(world, "rbee_queen_http_request_duration_seconds_count", route=route) == count


@then(parsers.re(r'"(?P<name>[^"]+)" for the job.s error code rose by (?P<count>\d+)'), converters=CONVERT)
def error_code_rose(world: World, name: str, count: int) -> None:
    assert world.response is not None
    code = world.response.json()["error"]["code"]
    assert rose(world, name, code=code) == count


@then(parsers.re(r'"(?P<name>[^"]+)" for "(?P<route>[^"]+)" with status (?P<status>\S+) rose by (?P<count>\d+)'), converters=CONVERT)
def route_status_rose(world: World, name: str, route: str, status: str, count: int) -> None:
    assert rose(world, name, route=route, status=status) == count


@then(parsers.re(r'"(?P<name>[^"]+)" with reason "(?P<reason>[^"]+)" rose by (?P<count>\d+)'), converters=CONVERT)
def reason_rose(world: World, name: str, reason: str, count: int) -> None:
    assert rose(world, name, reason=reason) == count


@then(parsers.re(r'"(?P<name>[^"]+)" of "(?P<device>[^"]+)" is this machine.s RAM'), converters=CONVERT)
def ram_total(world: World, name: str, device: str) -> None:
    assert total(world.extra["before"], name, device=device, kind="cpu") == psutil.virtual_memory().total


@then(parsers.re(r'"(?P<name>[^"]+)" of "(?P<device>[^"]+)" is more than 0'), converters=CONVERT)
def more_than_zero(world: World, name: str, device: str) -> None:
    assert total(world.extra["before"], name, device=device) > 0


@then(parsers.re(r'a GPU that NVML reports shows as "(?P<device>[^"]+)" of kind "(?P<kind>[^"]+)" with its total and free VRAM'), converters=CONVERT)
def nvml_gpu(monkeypatch: pytest.MonkeyPatch, device: str, kind: str) -> None:
    # This machine has no GPU: NVML itself (nvidia-ml-py's `pynvml`, not ours) is replaced by a
    # stand-in that reports one 24 GB card; our reading of it and the series are the real code.
    class NVMLError(Exception):
        pass

    memory = types.SimpleNamespace(total=24_000_000_000, free=20_000_000_000)
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: b"Stand-in RTX", nvmlDeviceGetMemoryInfo=lambda handle: memory,
        nvmlDeviceGetCudaComputeCapability=lambda handle: (8, 9))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    metrics = HiveMetrics()
    metrics.watch(detect_devices, list, dict)
    samples = parse(metrics.render().decode())
    assert total(samples, "rbee_hive_device_memory_total_bytes", device=device, kind=kind) == 24_000_000_000
    assert total(samples, "rbee_hive_device_memory_free_bytes", device=device, kind=kind) == 20_000_000_000


@then("while it runs, the download's progress ratio is between 0 and 1")
def progress_between(met_queen: Daemon) -> None:
    seen: list[float] = []

    def under_way() -> bool:
        ratio = total(parse(page(met_queen.url, AUTH)), "rbee_hive_download_progress_ratio",
                      model="hf:met-org/tiny-GGUF")
        seen.append(ratio)
        return 0 < ratio < 1

    assert wait_for(under_way, timeout=10, interval=0.1), seen


@then(parsers.re(r'"(?P<name>[^"]+)" rose by (?P<mb>\d+) MB'), converters=CONVERT)
def bytes_rose(world: World, name: str, mb: int) -> None:
    assert rose(world, name) == mb * 1000 * 1000


@then(parsers.re(r'"(?P<name>[^"]+)" with outcome "(?P<outcome>[^"]+)" rose by (?P<count>\d+)'), converters=CONVERT)
def outcome_rose(world: World, name: str, outcome: str, count: int) -> None:
    assert rose(world, name, outcome=outcome) == count


@then("no download progress series is left")
def no_progress(world: World) -> None:
    assert not [key for key in world.extra["after"] if key[0] == "rbee_hive_download_progress_ratio"]


@then(parsers.re(r'within (?P<seconds>\d+) seconds "(?P<name>[^"]+)" with result "(?P<result>[^"]+)" rises'), converters=CONVERT)
def result_rises(world: World, met_queen: Daemon, seconds: int, name: str, result: str) -> None:
    start = total(parse(page(met_queen.url, AUTH)), name, result=result)
    assert wait_for(lambda: total(parse(page(met_queen.url, AUTH)), name, result=result) > start,
                    timeout=seconds, interval=0.2)


@then(parsers.re(r'within (?P<seconds>\d+) seconds "(?P<name>[^"]+)" of "(?P<model>[^"]+)" rose by (?P<count>\d+)'), converters=CONVERT)
def model_rose_within(world: World, met_queen: Daemon, seconds: int, name: str, model: str, count: int) -> None:
    start = total(world.extra["before"], name, model=model)
    assert wait_for(lambda: total(parse(page(met_queen.url, AUTH)), name, model=model) == start + count,
                    timeout=seconds, interval=0.2)


@then(parsers.re(r'"(?P<name>[^"]+)" of "(?P<model>[^"]+)" with outcome "(?P<outcome>[^"]+)" rose by (?P<count>\d+)'), converters=CONVERT)
def model_outcome_rose(world: World, name: str, model: str, outcome: str, count: int) -> None:
    assert rose(world, name, model=model, outcome=outcome) == count


@then(parsers.re(r'"(?P<name>[^"]+)" of "(?P<model>[^"]+)" rose by (?P<count>\d+)'), converters=CONVERT)
def model_rose(world: World, name: str, model: str, count: int) -> None:
    assert rose(world, name, model=model) == count


@then("the answer's X-Correlation-Id is in the queen's log")
def correlation_in_log(world: World, met_queen: Daemon) -> None:
    assert world.response is not None
    cid = world.response.headers["X-Correlation-Id"]
    assert wait_for(lambda: f"correlation_id={cid}" in met_queen.log(), timeout=5)
    world.extra["cid"] = cid


@then("no label on the queen's /metrics holds that correlation id")
def correlation_not_in_labels(world: World, met_queen: Daemon) -> None:
    cid = world.extra["cid"]
    labels = [value for (_, have) in parse(page(met_queen.url, AUTH)) for _, value in have]
    assert labels and not [value for value in labels if cid in value]


@then("neither the wrong token, the queen's token nor the prompt is on the queen's or the worker's /metrics")
def no_secrets(world: World, met_queen: Daemon) -> None:
    pages = [page(met_queen.url, AUTH), page(str(world.extra["worker"]["url"]))]
    for text in pages:
        for secret in (WRONG, TOKEN, world.extra["prompt"]):
            assert secret not in text


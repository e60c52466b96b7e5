from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, hive_job, hub, job_value, models_dir, spawn_worker
from harness.helpers import requantize

scenarios("model_provisioner.feature")

REPO, FILE = "test-org/tiny-GGUF", "tiny.Q4_K_M.gguf"


@given(parsers.parse("the hub sends at most {mb:d} MB per second"))
def rate(world: World, mb: int) -> None:
    hub(world).rate = mb * 1e6


@given(parsers.parse('the repo "{repo}" is gated behind the token "{token}"'))
def gated(world: World, repo: str, token: str) -> None:
    hub(world).gate(repo, token)


@given(parsers.parse("the hub stops sending after {mb:d} MB"))
def stalls(world: World, mb: int) -> None:
    hub(world).stall_after = mb * 1000 * 1000


@given(parsers.parse("the hub cuts every connection after {mb:d} MB"))
def cut_always(world: World, mb: int) -> None:
    hub(world).cut_always_after = mb * 1000 * 1000


@given("the hub corrupts every file it serves")
def corrupt_always(world: World) -> None:
    hub(world).corrupt_always = True


@then("the hub served the file twice")
def served_twice(world: World) -> None:
    assert len(hub(world).file_requests) == 2, hub(world).file_requests


@given("the hub corrupts the next file it serves")
def corrupt(world: World) -> None:
    hub(world).corrupt_once = True


@then(parsers.parse("it streamed rising progress events in bytes up to {done:d} of {total:d}, with a rate"))
def rising_progress(world: World, done: int, total: int) -> None:
    progress = [e for e in world.extra["events"] if e["type"] == "progress"]
    assert len(progress) >= 2
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert (progress[-1]["done"], progress[-1]["total"]) == (done, total)
    assert all(p.get("unit", "bytes") == "bytes" and p["rate"] > 0 for p in progress[1:])


@then("the result's path holds the complete file")
def complete_file(world: World) -> None:
    stored = Path(job_value(world)["path"]).read_bytes()
    original = (hub(world).root / REPO / FILE).read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(original).digest()


@then(parsers.parse('the stream ended with "{terminator}"'))
def ended(world: World, terminator: str) -> None:
    assert world.extra["terminator"] == terminator


@then("the model is not in the catalog")
def not_in_catalog(world: World) -> None:
    hive_job(world, {"operation": "model_list"})
    assert [m["id"] for m in job_value(world)] == ["smollm2-135m"]


@then(parsers.parse("the second request resumed at byte {offset:d}"))
def resumed(world: World, offset: int) -> None:
    assert [r for _, r in hub(world).file_requests] == [None, f"bytes={offset}-"]


@then("the hub sent every byte once")
def sent_once(world: World) -> None:
    assert hub(world).bytes_sent == (hub(world).root / REPO / FILE).stat().st_size


def last_worker(world: World) -> dict[str, object]:
    worker = world.extra["workers"][-1]
    assert isinstance(worker, dict)
    return worker


def worker_ready(world: World) -> dict[str, object]:
    value = httpx.get(f"{last_worker(world)['url']}/v1/ready").json()
    assert isinstance(value, dict)
    return value


@then(parsers.parse('the worker runs on backend "{backend}"'))
def runs_on(world: World, backend: str) -> None:
    assert last_worker(world)["backend"] == backend and worker_ready(world)["backend"] == backend


@then(parsers.parse('the worker reports vocab_size {vocab:d}, eos_token_id {eos:d} and quantization "{quant}"'))
def reports_metadata(world: World, vocab: int, eos: int, quant: str) -> None:
    info = worker_ready(world)["model_info"]
    assert isinstance(info, dict)
    assert (info["vocab_size"], info["eos_token_id"], info["quantization"]) == (vocab, eos, quant)


@given(parsers.parse('SmolLM2 requantized to "{quant}" with llama.cpp'))
def requantized(world: World, quant: str) -> None:
    target = requantize(models_dir(world) / f"smollm2.{quant}.gguf", quant)
    world.extra.setdefault("quantized", {})[quant] = target


@when(parsers.parse('I spawn a worker of the requantized file on "{device}"'))
def spawn_requantized(world: World, device: str) -> None:
    (path,) = world.extra["quantized"].values()
    spawn_worker(world, f"file://{path}", device)


@then(parsers.parse('the worker reports quantization "{quant}"'))
def reports_quant(world: World, quant: str) -> None:
    info = worker_ready(world)["model_info"]
    assert isinstance(info, dict) and info["quantization"] == quant


@then(parsers.parse('the worker completes "{prompt}" with "{word}"'))
def completes(world: World, prompt: str, word: str) -> None:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    response = httpx.post(f"{last_worker(world)['url']}/v1/inference", json=body, timeout=60)
    assert word in response.text


@then(parsers.parse("their sizes grow in the order {order}"))
def sizes_grow(world: World, order: str) -> None:
    sizes = [world.extra["quantized"][q.strip()].stat().st_size for q in order.split(",")]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)

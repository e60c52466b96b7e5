"""rbee-hive as a real process: devices, worker spawn/list/stop, preflight, lifecycles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.helpers import (
    BIN,
    Daemon,
    daemon,
    gone,
    job_result,
    nvml_standin,
    port_open,
    requantize,
    run_job,
    stop_process,
    wait_for,
)
from rbee_common.sizing import gguf_metadata, kv_bytes_per_token
from rbee_worker.models import resolve_model


def hive_argv(*extra: str) -> list[str]:
    return [str(BIN / "rbee-hive"), "--port", "0", *extra]


@pytest.fixture
def hive(isolated_dirs: Path) -> Iterator[Daemon]:
    # NVML hidden (harness/standins/pynvml.py): the GPU-less answers below hold on a GPU machine too
    with daemon(hive_argv(), env=nvml_standin("absent")) as running:
        yield running


def models_dir(isolated_dirs: Path) -> Path:
    """A folder inside the hive's catalog root, where `file://` models are allowed."""
    folder = isolated_dirs / "data" / "rbee" / "models" / "local"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def spawn(url: str, **fields: object) -> tuple[list[dict[str, object]], str]:
    return run_job(url, {"operation": "worker_spawn", "model": "smollm2-135m", "device": "CPU-0",
                         "threads": 1, **fields})


def spawn_ok(url: str, **fields: object) -> dict[str, object]:
    events, terminator = spawn(url, **fields)
    assert terminator == "[DONE]", events[-3:]
    (worker,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(worker, dict)
    return worker


def job_error(events: list[dict[str, object]]) -> dict[str, object]:
    errors = [e["error"] for e in events if e["type"] == "narration" and e.get("error")]
    assert errors, events
    error = errors[-1]
    assert isinstance(error, dict)
    return error



def test_capabilities_without_nvml_list_this_cpu_and_no_gpu(hive: Daemon) -> None:
    caps = httpx.get(f"{hive.url}/v1/capabilities").json()
    (cpu,) = [d for d in caps["devices"] if d["id"] == "CPU-0"]
    assert cpu["cores"] == psutil.cpu_count(logical=False)
    assert cpu["memory_total_bytes"] == psutil.virtual_memory().total
    assert not [d for d in caps["devices"] if d["id"].startswith("GPU-")]
    assert "llama-cpp" in caps["backends"]
    assert caps["disk_free_bytes"] > 0 and caps["models"] >= 1 and caps["workers"] == 0


def test_spawn_list_infer_stop(hive: Daemon) -> None:
    events, terminator = spawn(hive.url)
    assert terminator == "[DONE]", events
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and all(e["what"] == "worker_load" for e in progress)
    narrated = " ".join(str(e["human"]) for e in events if e["type"] == "narration")
    assert "Preflight passed" in narrated and "is ready at" in narrated
    # One copy of the weights (and compute slack) plus the KV cache of 4 slots x 8,192 tokens: the
    # context the built-in model was trained for, chosen by the hive, which says so.
    (preflight,) = [e for e in events if e.get("action") == "worker_preflight"]
    model = resolve_model("smollm2-135m").path
    cache = 4 * 8192 * kv_bytes_per_token(gguf_metadata(model))
    assert preflight["fields"]["slots"] == 4 and preflight["fields"]["ctx"] == 8192
    assert "4 slot(s) of 8192 tokens (the model's trained context)" in preflight["human"]
    prompt_cache = preflight["fields"]["cache_ram_mib"] << 20  # a quarter of the RAM left, at most 8 GiB
    assert 0 < prompt_cache <= 8 << 30 and f"a prompt cache of {prompt_cache >> 20} MiB" in preflight["human"]
    assert preflight["fields"]["required_bytes"] == int(Path(model).stat().st_size * 1.2) + cache + prompt_cache
    (worker,) = job_result(hive.url, {"operation": "worker_list"})  # type: ignore[misc]
    assert worker["state"] == "ready" and psutil.pid_exists(worker["pid"])
    assert worker["slots_total"] == 4
    assert 9300 <= worker["port"] <= 9399 and port_open(worker["port"])
    assert psutil.Process(worker["pid"]).ppid() == hive.process.pid
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    answer = httpx.post(f"{worker['url']}/v1/inference", json=body, timeout=30)
    assert answer.status_code == 200 and '"type":"end"' in answer.text
    assert job_result(hive.url, {"operation": "worker_get", "worker_id": worker["worker_id"]}) == worker
    stopped = job_result(hive.url, {"operation": "worker_stop", "worker_id": worker["worker_id"]})
    assert isinstance(stopped, dict) and stopped["worker_id"] == worker["worker_id"]
    assert gone(worker["pid"]) and not port_open(worker["port"])
    assert job_result(hive.url, {"operation": "worker_list"}) == []


def test_a_worker_that_dies_is_removed_and_logged(hive: Daemon) -> None:
    spawn_ok(hive.url)
    (worker,) = job_result(hive.url, {"operation": "worker_list"})  # type: ignore[misc]
    os.kill(worker["pid"], signal.SIGKILL)
    assert wait_for(lambda: job_result(hive.url, {"operation": "worker_list"}) == [], timeout=3)
    assert f"worker {worker['worker_id']} (pid {worker['pid']}) died" in hive.log()


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"model": "hf:nobody/nothing"}, "MODEL_NOT_FOUND", "rbee-keeper model download hf:nobody/nothing"),
        ({"model": "file:///no/such/model.gguf"}, "MODEL_PATH_NOT_ALLOWED", "model_roots"),
        ({"device": "GPU-0"}, "DEVICE_NOT_FOUND", "CPU-0"),
        ({"backend": "mlx"}, "BACKEND_UNAVAILABLE", "llama-cpp"),
        ({"threads": 64}, "INSUFFICIENT_CPU", "fewer threads"),
    ],
)
def test_preflight_errors_name_the_problem_and_the_fix(
    hive: Daemon, fields: dict[str, object], code: str, words: str
) -> None:
    events, terminator = spawn(hive.url, **fields)
    assert terminator.startswith("[ERROR]")
    error = job_error(events)
    assert error["code"] == code
    assert words in str(error["message"]) + str(error.get("details", {}).get("hint", ""))  # type: ignore[union-attr]
    assert job_result(hive.url, {"operation": "worker_list"}) == []


def test_file_models_outside_the_model_roots_are_refused_alike(hive: Daemon, isolated_dirs: Path) -> None:
    outside = isolated_dirs / "secret.gguf"
    outside.write_bytes(b"GGUF" + bytes(100))
    link = models_dir(isolated_dirs) / "link.gguf"
    link.symlink_to(outside)  # inside by name, outside once resolved
    answers = []
    for ref in (f"file://{outside}", f"file://{isolated_dirs}/absent.gguf", "file:///etc/hostname",
                f"file://{link}"):
        error = job_error(spawn(hive.url, model=ref)[0])
        answers.append((error["code"], error["message"]))
        assert str(isolated_dirs) not in json.dumps(error)
    assert len(set(answers)) == 1 and answers[0][0] == "MODEL_PATH_NOT_ALLOWED"
    assert job_result(hive.url, {"operation": "worker_list"}) == []


def test_insufficient_ram_gives_the_numbers(hive: Daemon, isolated_dirs: Path) -> None:
    huge = models_dir(isolated_dirs) / "huge.gguf"
    with open(huge, "wb") as file:  # sparse: no disk used, but 1.2x its size is more than this RAM
        file.truncate(psutil.virtual_memory().total)
    events, _ = spawn(hive.url, model=f"file://{huge}")
    error = job_error(events)
    assert error["code"] == "INSUFFICIENT_RAM"
    details = error["details"]
    assert isinstance(details, dict)
    assert details["required_bytes"] == int(psutil.virtual_memory().total * 1.2)
    assert 0 < details["available_bytes"] < details["required_bytes"]


def test_cpu_threads_are_a_budget(isolated_dirs: Path) -> None:
    config = isolated_dirs / "config.toml"
    config.write_text("[hive]\nevict_idle = false\n")  # no room made: the budget alone
    with daemon(hive_argv("--config", str(config)), env=nvml_standin("absent")) as hive:
        _threads_are_a_budget(hive, isolated_dirs)


def _threads_are_a_budget(hive: Daemon, isolated_dirs: Path) -> None:
    assert spawn(hive.url)[1] == "[DONE]"  # 1 of 2 cores
    events, _ = spawn(hive.url, threads=2)
    assert job_error(events)["code"] == "INSUFFICIENT_CPU"
    assert spawn(hive.url)[1] == "[DONE]"  # the other core
    workers = job_result(hive.url, {"operation": "worker_list"})
    assert isinstance(workers, list) and sorted(w["threads"] for w in workers) == [1, 1], hive.log() + "".join(
        p.read_text()[-800:] for p in (isolated_dirs / "state").rglob("*.log"))
    assert len({w["port"] for w in workers}) == 2


def test_an_idle_worker_makes_room_for_the_next_model_and_a_busy_one_never(
    hive: Daemon, isolated_dirs: Path,
) -> None:
    """As Ollama unloads an idle model for the next: the least recently used idle worker that holds
    what the spawn lacks is stopped, and the spawn says so; a worker with a request is not."""
    other = requantize(models_dir(isolated_dirs) / "smollm2.Q8_0.gguf", "Q8_0")
    first = spawn_ok(hive.url, threads=2)  # every core
    events, terminator = spawn(hive.url, model=f"file://{other}", threads=2)
    assert terminator == "[DONE]", events[-3:]
    said = " ".join(str(e.get("human", "")) for e in events)
    assert f"Stopping idle worker {first['worker_id']} (smollm2-135m, idle for" in said, said
    assert "to make room for file://" in said and "CPU threads" in said
    (second,) = job_result(hive.url, {"operation": "worker_list"})  # type: ignore[misc]
    assert second["model"] != "smollm2-135m" and gone(int(first["pid"]))  # type: ignore[arg-type]

    # a worker holding a request keeps its cores: the next spawn is refused
    url = str(second["url"])  # (a hive without a token: its workers want none)
    streaming = threading.Thread(target=lambda: httpx.post(f"{url}/v1/inference", timeout=120, json={
        "messages": [{"role": "user", "content": "Count to 1000: 1, 2,"}], "max_tokens": 400}))
    streaming.start()
    assert wait_for(lambda: httpx.get(f"{url}/v1/ready", timeout=5).json()["slots_busy"] == 1, timeout=20)
    events, terminator = spawn(hive.url, threads=2)
    assert terminator.startswith("[ERROR]") and job_error(events)["code"] == "INSUFFICIENT_CPU"
    assert not any("Stopping idle worker" in str(e.get("human", "")) for e in events)
    assert not gone(int(second["pid"]))  # type: ignore[arg-type]
    streaming.join(120)


def test_a_request_for_a_second_model_is_answered_at_once_through_the_queen(isolated_dirs: Path) -> None:
    """On 2 cores with one model's worker idle, an OpenAI request for another model: the idle worker
    makes room (narrated on the job), with no wait for the idle timeout."""
    other = requantize(models_dir(isolated_dirs) / "smollm2.Q8_0.gguf", "Q8_0")
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=nvml_standin("absent")) as queen:
        assert job_result(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m"})
        began = time.monotonic()
        events, terminator = run_job(queen.url, {"operation": "infer", "model": f"file://{other}",
                                                 "prompt": "Hello,", "max_tokens": 4})
        assert terminator == "[DONE]", events[-3:]
        said = " ".join(str(e.get("human", "")) for e in events)
        assert "Stopping idle worker" in said and "(smollm2-135m, idle for" in said, said
        print(f"second model answered {time.monotonic() - began:.1f} s after it was asked for")
        body = {"model": f"file://{other}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text


def test_a_broken_model_is_one_line_and_a_correlation_id_the_log_explains(
    hive: Daemon, isolated_dirs: Path
) -> None:
    broken = models_dir(isolated_dirs) / "broken.gguf"
    broken.write_bytes(b"not a gguf" * 1000)
    events, _ = spawn(hive.url, model=f"file://{broken}")
    error = job_error(events)
    assert error["code"] == "WORKER_START_FAILED"
    assert "llama.cpp could not load the model" in str(error["message"]) and "\n" not in str(error["message"])
    # no stderr, no paths of the hive's machine: those are in the hive's log, under the correlation id
    shown = json.dumps(error)
    assert "last_log_lines" not in shown and str(isolated_dirs) not in shown and "Traceback" not in shown
    cid = str(error["correlation_id"])
    assert wait_for(lambda: cid in hive.log())
    logged = hive.log()[hive.log().index(cid):]
    assert "could not load the model" in logged and "workers/worker-" in logged
    assert job_result(hive.url, {"operation": "worker_list"}) == []


def test_a_worker_not_ready_in_time_is_killed(isolated_dirs: Path) -> None:
    env = {"RBEE_HIVE__WORKER_READY_TIMEOUT_S": "0.05"}
    with daemon(hive_argv(), env=env) as hive:
        events, _ = spawn(hive.url)
        error = job_error(events)
        assert error["code"] == "WORKER_READY_TIMEOUT"
        (started,) = [e for e in events if e.get("action") == "worker_spawn"]
        assert gone(started["fields"]["pid"])  # type: ignore[index]
        assert "killing worker" in hive.log()


def test_a_missing_worker_program_is_named(isolated_dirs: Path) -> None:
    env = {"RBEE_HIVE__WORKER_BINARY": "/opt/nowhere/llm-worker-rbee"}
    with daemon(hive_argv(), env=env) as hive:
        error = job_error(spawn(hive.url)[0])
        assert error["code"] == "WORKER_BINARY_NOT_FOUND"
        assert "/opt/nowhere/llm-worker-rbee" in str(error["message"])


def test_infer_sent_to_a_hive_is_a_routing_bug(hive: Daemon) -> None:
    events, _ = run_job(hive.url, {"operation": "infer", "model": "smollm2-135m", "prompt": "hi"})
    error = job_error(events)
    assert error["code"] == "WRONG_DAEMON" and "routing bug" in str(error["message"])


def test_sigkill_of_the_hive_takes_its_workers_within_5s(isolated_dirs: Path) -> None:
    with daemon(hive_argv()) as hive:
        spawn_ok(hive.url)
        spawn_ok(hive.url)
        workers = job_result(hive.url, {"operation": "worker_list"})
        assert isinstance(workers, list) and len(workers) == 2
        os.kill(hive.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: all(gone(w["pid"]) for w in workers), timeout=5)
        assert time.monotonic() - killed < 5  # DESIGN §6: "no more than a few seconds"


def test_sigterm_stops_everything_with_exit_0_within_6s(isolated_dirs: Path) -> None:
    with daemon(hive_argv()) as hive:
        spawn_ok(hive.url)
        spawn_ok(hive.url)
        workers = job_result(hive.url, {"operation": "worker_list"})
        assert isinstance(workers, list)
        # one worker busy with a long request: it must drain or be killed, never orphaned
        stream = httpx.Client().send(
            httpx.Client().build_request("POST", f"{workers[0]['url']}/v1/inference",
                                         json={"prompt": "Count to 1000: 1, 2,", "max_tokens": 1500}),
            stream=True,
        )
        sent = time.monotonic()
        hive.process.send_signal(signal.SIGTERM)
        assert hive.process.wait(6) == 0
        assert time.monotonic() - sent < 6  # the 5 s graceful stop (DESIGN §6) and a margin
        assert all(gone(w["pid"]) for w in workers)
        stream.close()
        assert "All workers stopped" in hive.log()


def test_stdin_eof_stops_the_hive_and_its_workers(isolated_dirs: Path) -> None:
    """A hive started over SSH (`--lifeline stdin`): the session ends, everything goes."""
    process = subprocess.Popen(
        hive_argv("--lifeline", "stdin"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        url = json.loads(process.stdout.readline())["url"]
        worker = spawn_ok(url)
        process.stdin.close()
        assert process.wait(timeout=6) == 0
        assert gone(int(str(worker["pid"])))
    finally:
        stop_process(process)


def test_a_worker_outlives_the_spawning_thread(hive: Daemon) -> None:
    """PR_SET_PDEATHSIG follows the thread that forked: trio retires idle worker threads
    after 10 s, so a worker forked from one would be killed then (it was, once)."""
    worker = spawn_ok(hive.url)
    time.sleep(12)
    assert not gone(int(str(worker["pid"])))
    assert httpx.get(f"{worker['url']}/health").status_code == 200

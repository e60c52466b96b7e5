"""Workers heartbeat the queen; the queen's registry is built from those beats alone."""

from __future__ import annotations

from pathlib import Path

import httpx

from harness.helpers import BIN, daemon, free_port, job_result, port_free, stop_process, wait_for
from tests.test_worker import worker_argv


def active_workers(queen_url: str) -> list[dict[str, object]]:
    value = job_result(queen_url, {"operation": "worker_list_active"})
    assert isinstance(value, list)
    return value


def test_queen_lists_a_worker_from_its_heartbeats_and_drops_it_when_silent(isolated_dirs: Path) -> None:
    env = {"RBEE_QUEEN__WORKER_STALE_S": "1.5"}
    config = isolated_dirs / "queen.toml"
    config.write_text('[hives.lab-1]\nhost = "127.0.0.1"\n')  # the queen takes beats from its own hives only
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)], env=env) as queen:
        port = next(p for p in range(9300, 9400) if port_free(p))  # a worker port of lab-1's range
        argv = worker_argv("--port", str(port), "--worker-id", "w-beat", "--hive-id", "lab-1",
                           "--queen-url", queen.url, "--heartbeat-s", "0.3")
        with daemon(argv) as worker:
            assert wait_for(lambda: [w["state"] for w in active_workers(queen.url)] == ["ready"], timeout=10)
            (seen,) = active_workers(queen.url)
            assert seen["worker_id"] == "w-beat" and seen["hive_id"] == "lab-1"
            assert seen["url"] == worker.url and seen["pid"] == worker.process.pid
            assert seen["model"] == "smollm2-135m" and seen["backend"] == "llama-cpp"
            assert seen["device"] == "CPU-0" and seen["slots_total"] == 4  # the CPU default at --ctx 2048
            stop_process(worker.process)
        assert wait_for(lambda: active_workers(queen.url) == [], timeout=5)


def test_a_missing_queen_is_logged_and_the_worker_keeps_serving(isolated_dirs: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    with daemon(worker_argv("--port", "0", "--queen-url", nobody, "--heartbeat-s", "0.2")) as worker:
        assert wait_for(lambda: "heartbeat to the queen failed" in worker.log(), timeout=5)
        body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        response = httpx.post(f"{worker.url}/v1/inference", json=body, timeout=30)
        assert response.status_code == 200 and "[DONE]" in response.text
        assert worker.process.poll() is None


def test_a_bad_heartbeat_is_refused_with_the_field(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as queen:
        beat = {"worker_id": "../etc", "hive_id": "h", "url": "http://127.0.0.1:1", "model": "m",
                "backend": "mlx", "device": "CPU-0", "state": "ready", "slots_total": 1, "slots_busy": 0,
                "pid": 5}
        response = httpx.post(f"{queen.url}/v1/worker-heartbeat", json=beat)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["details"]["field"] == "worker_id" and "../etc" not in response.text
        assert active_workers(queen.url) == []

"""GPUs as they are, on any machine: the hive reads a stand-in for NVML (nvidia-ml-py, not ours)
that reports the cards each test needs, and this machine's llama-cpp-python, built without GPU
offload (CPU and RPC: `python -m rbee_common.llama_build`), is the build a GPU worker must refuse.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.helpers import BIN, Daemon, daemon, job_result, nvml_standin, run_job
from rbee_common.gpus import llama_gpu_offload, shares
from rbee_queen.placement import Option, need_bytes, plan_beyond_one_device
from tests.test_hive import job_error

TWO_CARDS = "Stand-in A: 8000 MB, 6000 MB free; Stand-in B: 8000 MB, 2000 MB free"

cpu_only_build = pytest.mark.skipif(bool(llama_gpu_offload()),
                                    reason="this llama-cpp-python has CUDA: no CPU-only build to refuse")


def hive(isolated_dirs: Path, cards: str, config: str = "") -> Daemon:
    path = isolated_dirs / "config.toml"
    path.write_text(f"[hive]\n{config}\n")
    return daemon([str(BIN / "rbee-hive"), "--port", "0", "--config", str(path)], env=nvml_standin(cards))


@pytest.fixture
def gpu_hive(isolated_dirs: Path) -> Iterator[Daemon]:
    with hive(isolated_dirs, TWO_CARDS) as running:
        yield running


@pytest.fixture
def synthetic_gpu_hive(isolated_dirs: Path) -> Iterator[Daemon]:
    """Synthetic workers (a test double for the model's text) need no llama.cpp: what the hive gives
    a GPU worker, its environment and its arguments, shows whatever the build."""
    with hive(isolated_dirs, TWO_CARDS, "synthetic_backend = true") as running:
        yield running


@cpu_only_build
def test_a_gpu_worker_on_a_cpu_only_build_is_refused_with_the_fix(gpu_hive: Daemon) -> None:
    caps = httpx.get(f"{gpu_hive.url}/v1/capabilities", timeout=10).json()
    gpus = [d for d in caps["devices"] if d["id"].startswith("GPU-")]
    assert [g["id"] for g in gpus] == ["GPU-0", "GPU-1"]
    assert all("without GPU offload" in g["unusable"] and "-DGGML_CUDA=on" in g["unusable"] for g in gpus)

    events, terminator = run_job(gpu_hive.url, {"operation": "worker_spawn", "model": "smollm2-135m",
                                                "device": "GPU-0"})
    assert terminator.startswith("[ERROR]")
    error = job_error(events)
    assert error["code"] == "BACKEND_UNAVAILABLE"
    assert "would run on the CPU" in str(error["message"])
    hint = str(error.get("details", {}).get("hint", ""))  # type: ignore[union-attr]
    assert 'CMAKE_ARGS="-DGGML_CUDA=on' in hint and "CPU-0" in hint
    assert job_result(gpu_hive.url, {"operation": "worker_list"}) == []


@cpu_only_build
def test_a_worker_started_by_hand_on_a_gpu_refuses_a_cpu_only_build(isolated_dirs: Path) -> None:
    done = subprocess.run([str(BIN / "llm-worker-rbee"), "--model", "smollm2-135m", "--device", "GPU-0",
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "built without GPU offload" in done.stderr and "-DGGML_CUDA=on" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_split_too_big_for_the_cards_together_gives_each_card_and_the_numbers(isolated_dirs: Path) -> None:
    with hive(isolated_dirs, "Small A: 1000 MB, 60 MB free; Small B: 1000 MB, 40 MB free") as small:
        events, terminator = run_job(small.url, {"operation": "worker_spawn", "model": "smollm2-135m",
                                                 "device": "GPU-0,GPU-1", "ctx": 2048})
    assert terminator.startswith("[ERROR]")
    error = job_error(events)
    assert error["code"] == "INSUFFICIENT_VRAM", error
    assert "GPU-0,GPU-1" in str(error["message"]) and "100 MB are available" in str(error["message"])


def worker_process(hive: Daemon, device: str) -> tuple[dict[str, str], list[str], list[dict[str, object]]]:
    """Spawn a worker on `device`: its environment and arguments as the kernel has them, and the
    spawn's events."""
    events, terminator = run_job(hive.url, {"operation": "worker_spawn", "model": "anything",
                                            "device": device, "backend": "synthetic"})
    assert terminator == "[DONE]", events[-3:]
    (worker,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(worker, dict)
    pid = worker["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return env, argv, events


def test_a_gpu_worker_sees_its_card_numbered_as_nvml_numbers_it(synthetic_gpu_hive: Daemon) -> None:
    env, argv, _ = worker_process(synthetic_gpu_hive, "GPU-1")
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # not CUDA's fastest-first
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "--tensor-split" not in argv


def test_a_two_gpu_worker_splits_the_layers_by_free_vram(synthetic_gpu_hive: Daemon) -> None:
    env, argv, events = worker_process(synthetic_gpu_hive, "GPU-0,GPU-1")
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert argv[argv.index("--tensor-split") + 1] == "0.75,0.25"  # 6000 and 2000 MB free
    said = " ".join(str(e.get("human", "")) for e in events)
    assert "the layers split 75% on GPU-0 / 25% on GPU-1" in said, said


def test_shares_follow_free_memory_and_sum_to_one() -> None:
    assert shares([6_000, 2_000]) == [0.75, 0.25]
    assert shares([1, 1, 1]) == [0.333, 0.333, 0.334]
    assert shares([0, 0]) == [0.5, 0.5]
    assert abs(sum(shares([7, 3, 5, 11])) - 1) < 1e-9


GB = 1_000_000_000


def option(hive: str, device: str, free_gb: float, model_gb: float | None = None) -> Option:
    return Option(hive, device, device == "CPU-0", int(free_gb * GB), model_gb is not None,
                  int(model_gb * GB) if model_gb else None)


def test_a_model_no_gpu_holds_gets_the_fewest_gpus_of_a_hive_that_hold_it_together() -> None:
    options = [option("h1", "CPU-0", 4, 20), option("h1", "GPU-0", 10, 20), option("h1", "GPU-1", 16, 20),
               option("h1", "GPU-2", 4, 20)]
    need = need_bytes(options)
    assert need == 24 * GB  # 1.2 x the file
    plan = plan_beyond_one_device(options, need)
    assert plan is not None and (plan.hive_id, plan.device, plan.helpers) == ("h1", "GPU-0,GPU-1", ())
    assert "no single GPU" in plan.why


def test_a_model_no_hive_holds_is_split_over_the_fewest_hives_by_free_memory() -> None:
    options = [option("h1", "CPU-0", 12, 20), option("h2", "CPU-0", 6), option("h3", "CPU-0", 14),
               option("h3", "GPU-0", 2)]
    plan = plan_beyond_one_device(options, need_bytes(options) or 0)
    assert plan is not None
    assert (plan.hive_id, plan.device, plan.helpers) == ("h1", "CPU-0", ("h3",))  # 12 + 14 >= 24
    assert "no single hive" in plan.why
    assert plan_beyond_one_device(options, 40 * GB) is None  # all of them hold 34

"""More workers for a busy model: the queen's decision, its placement, its limit, and the way back.

The fleet tests here are one queen with its local hive and two `rbee-hive` processes on loopback
(HTTP hives, as a remote one is reached), all with synthetic workers (no model: a test double for
the model's text) so that a burst is long enough to queue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from harness.helpers import (
    BIN,
    Daemon,
    active_workers,
    loopback_fleet,
    metric_samples,
    metric_total,
    run_job,
    wait_for,
)
from rbee_queen.placement import Option, place
from rbee_queen.replicas import wanted

# --- the decision and the placement, as functions ------------------------------------------------


def test_a_line_asks_for_enough_workers_to_give_each_request_a_slot_within_the_limit() -> None:
    assert wanted(9, workers=1, starting=0, slots=4, limit=0) == 3
    assert wanted(9, workers=1, starting=2, slots=4, limit=0) == 1  # two on their way already
    assert wanted(9, workers=1, starting=0, slots=4, limit=2) == 1  # the per-model limit
    assert wanted(9, workers=2, starting=0, slots=4, limit=2) == 0
    assert wanted(0, workers=1, starting=0, slots=4, limit=0) == 0


def test_placement_prefers_the_file_then_a_gpu_then_free_memory_and_never_doubles_up() -> None:
    options = [
        Option("a", "CPU-0", True, 64 << 30, False),
        Option("b", "GPU-0", False, 8 << 30, False),
        Option("c", "GPU-0", False, 4 << 30, True),  # has the model's file
        Option("d", "GPU-0", False, 24 << 30, False),
        Option("e", "CPU-0", True, 32 << 30, False),
        Option("e", "GPU-1", False, 2 << 30, False),
    ]
    picks = place(options, 3, taken={("d", "GPU-0")}, cpu_hives=set())
    assert [(p.hive_id, p.device) for p in picks] == [("c", "GPU-0"), ("b", "GPU-0"), ("e", "GPU-1")]
    # CPUs after the GPUs, and one CPU worker a hive: `a`'s cores are taken by another model
    picks = place(options, 10, taken=set(), cpu_hives={"a"})
    assert [(p.hive_id, p.device) for p in picks][-1] == ("e", "CPU-0")
    assert ("a", "CPU-0") not in [(p.hive_id, p.device) for p in picks]


# --- a fleet of three hives ----------------------------------------------------------------------


@contextlib.contextmanager
def three_hives(
    tmp_path: Path, queen: str, *, rate: float = 8.0, idle: float = 0, models: str = "",
) -> Iterator[Daemon]:
    """A queen with its local hive and hives `h1` and `h2` over HTTP, each with synthetic workers of
    two slots, idle `idle` seconds before their hive stops them (0: never)."""
    hive = f"synthetic_backend = true\nsynthetic_slots = 2\nsynthetic_tokens_per_s = {rate}\n" \
           f"worker_idle_timeout_s = {idle}\n"
    with loopback_fleet(tmp_path, 2, hive=hive, queen=queen, models=models) as fleet:
        yield fleet


def workers(queen: Daemon) -> list[dict[str, object]]:
    return active_workers(queen.url)


def replicas_metric(queen: Daemon, event: str) -> float:
    return metric_total(metric_samples(queen.url), "rbee_queen_replicas_total", event=event)


def burst(queen: Daemon, count: int, tokens: int) -> list[int]:
    """`count` requests at once; their status codes."""
    codes: list[int] = []

    def one() -> None:
        answer = httpx.post(f"{queen.url}/v1/chat/completions", timeout=120, json={
            "model": "synthetic", "max_tokens": tokens, "messages": [{"role": "user", "content": "go"}]})
        codes.append(answer.status_code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    return codes


def test_a_queue_starts_workers_on_the_other_hives_and_they_stop_when_idle(tmp_path: Path) -> None:
    """One worker of two slots, 12 requests of 2 s each at once: the line waits past
    `scale_after_s`, and the queen starts a worker on each other hive (one a hive: one CPU each);
    every request is answered. Idle for `replica_idle_s`, the two it added stop; the first stays."""
    with three_hives(tmp_path, "scale_after_s = 0.5\nreplica_idle_s = 2") as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "synthetic",
                                                 "backend": "synthetic"})
        assert terminator == "[DONE]", events[-3:]
        (first,) = workers(queen)
        assert burst(queen, 12, 16) == [200] * 12
        assert replicas_metric(queen, "started") == 2
        hives = sorted(str(w["hive_id"]) for w in workers(queen))
        assert hives == ["h1", "h2", "localhost"], hives
        log = queen.log_path.read_text()
        assert "for synthetic waited" in log and "starting a second worker on" in log, log[-2000:]
        assert wait_for(lambda: [w["worker_id"] for w in workers(queen)] == [first["worker_id"]], timeout=20)
        assert wait_for(lambda: replicas_metric(queen, "stopped") == 2, timeout=20)  # its hive stopped them


def test_the_per_model_limit_holds_however_long_the_line(tmp_path: Path) -> None:
    """With `max_workers_per_model = 2`, the same burst adds one worker, not two."""
    with three_hives(tmp_path, "scale_after_s = 0.5\nmax_workers_per_model = 2\nreplica_idle_s = 600") as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": "synthetic",
                                                 "backend": "synthetic"})
        assert terminator == "[DONE]", events[-3:]
        assert burst(queen, 12, 16) == [200] * 12
        assert replicas_metric(queen, "started") == 1
        assert len(workers(queen)) == 2


def test_worker_spawn_with_replicas_places_them_over_the_fleet(tmp_path: Path) -> None:
    """`rbee-keeper worker spawn --replicas 3`: three workers of the model, one on each hive (each
    has one device); asking again for 2 starts nothing."""
    with three_hives(tmp_path, "") as queen:
        def keeper(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", queen.url, "worker", "spawn",
                                   "--model", "synthetic", *args], capture_output=True, text=True, timeout=120)

        done = keeper("--replicas", "3")
        assert done.returncode == 0, done.stderr
        assert sorted(str(w["hive_id"]) for w in workers(queen)) == ["h1", "h2", "localhost"]
        assert "starting a third worker on" in done.stdout + done.stderr
        again = keeper("--replicas", "2")
        assert again.returncode == 0 and "has 3 worker(s) already" in again.stdout + again.stderr
        assert len(workers(queen)) == 3


def test_min_workers_are_started_and_started_again_after_a_crash(tmp_path: Path) -> None:
    """`[models.synthetic] min_workers = 2`: the queen starts two workers by itself, and a third
    when one of them is killed; its hive does not stop them for being idle."""
    with three_hives(tmp_path, "", idle=1, models="[models.synthetic]\nmin_workers = 2\n") as queen:
        assert wait_for(lambda: len(workers(queen)) == 2, timeout=30)
        victim = workers(queen)[0]
        os.kill(int(str(victim["pid"])), signal.SIGKILL)
        assert wait_for(lambda: len(workers(queen)) == 2
                        and victim["worker_id"] not in [w["worker_id"] for w in workers(queen)], timeout=40)
        threading.Event().wait(3)  # three idle timeouts of their hives: none stops (and none restarts)
        assert len(workers(queen)) == 2 and replicas_metric(queen, "started") == 3, (
            workers(queen), queen.log_path.read_text()[-3000:])

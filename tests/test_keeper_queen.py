"""rbee-keeper against real queens: status (ephemeral), queen start/stop/status/info."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from harness.helpers import BIN, daemon, free_port, port_open, run_job, wait_for


def keeper(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", url, *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )


def queens_on(port: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "queen-rbee" in cmdline and f"--port {port}" in cmdline and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_status_starts_a_queen_and_stops_it_again(isolated_dirs: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result = keeper("-v", "status", url=url)
    assert result.returncode == 0, result.stderr
    assert "localhost" in result.stdout and "hives" in result.stdout
    order = [
        "queen is asleep, waking queen", "queen is awake and healthy", "Job created: job-",
        "SSE URL: /v1/jobs/job-", "Shutting down queen",
    ]
    positions = [result.stderr.index(text) for text in order]
    assert positions == sorted(positions)
    assert not port_open(port)
    assert queens_on(port) == []


def test_status_leaves_a_running_queen_alone(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as queen:
        result = keeper("status", url=queen.url)
        assert result.returncode == 0, result.stderr
        assert "waking queen" not in result.stderr
        assert "Shutting down" not in result.stderr
        assert queen.process.poll() is None


def test_queen_start_status_info_stop(isolated_dirs: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        assert keeper("queen", "status", url=url).returncode == 1
        started = keeper("queen", "start", url=url)
        assert started.returncode == 0, started.stderr
        assert (isolated_dirs / "state" / "rbee" / f"queen-{port}.pid").exists()
        assert (isolated_dirs / "state" / "rbee" / f"queen-{port}.log").exists()
        status = keeper("queen", "status", url=url)
        assert status.returncode == 0 and "running and healthy" in status.stdout
        info = keeper("queen", "info", url=url)
        assert info.returncode == 0 and "queen-rbee" in info.stdout and "version" in info.stdout
        again = keeper("queen", "start", url=url)
        assert again.returncode == 0 and "already running" in again.stderr
        assert len(queens_on(port)) == 1
        stopped = keeper("queen", "stop", url=url)
        assert stopped.returncode == 0 and "Queen shutdown via HTTP" in stopped.stderr
        assert wait_for(lambda: not queens_on(port), timeout=5)
        assert keeper("queen", "status", url=url).returncode == 1
    finally:
        for process in queens_on(port):
            process.kill()


def test_queen_stop_falls_back_to_sigterm(isolated_dirs: Path) -> None:
    # The pid file names a live queen that does not answer on the URL's port:
    # the HTTP shutdown fails, so the keeper must signal the process.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as queen:
        pid_path = isolated_dirs / "state" / "rbee" / f"queen-{port}.pid"
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{queen.process.pid}\n")
        stopped = keeper("queen", "stop", url=url)
        assert stopped.returncode == 0
        assert "HTTP shutdown failed, sending SIGTERM" in stopped.stderr
        assert queen.process.wait(timeout=5) == 0


def test_queen_info_without_queen_is_one_line_error(isolated_dirs: Path) -> None:
    result = keeper("queen", "info", url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("error: Cannot connect")
    assert "hint:" in result.stderr and "Traceback" not in result.stderr


def test_bad_queen_url_is_explained(isolated_dirs: Path) -> None:
    result = keeper("queen", "start", url="ftp://nowhere")
    assert result.returncode == 1
    assert "http://HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def test_status_shows_a_worker_idle_as_soon_as_its_answer_ends(isolated_dirs: Path) -> None:
    """A 7-s answer (synthetic, 10 tokens/s) outlasts a heartbeat period (5 s), so a heartbeat said
    "1 busy" mid-answer; the worker says "0 busy" the moment it is idle, so `status` right after
    the answer agrees with `worker list`."""
    config = isolated_dirs / "rbee.toml"
    config.write_text("[hive]\nsynthetic_backend = true\nsynthetic_slots = 4\nsynthetic_tokens_per_s = 10\n")
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)]) as queen:
        events, terminator = run_job(queen.url, {"operation": "infer", "model": "synthetic", "prompt": "Hi",
                                                 "max_tokens": 70})
        assert terminator == "[DONE]", events[-3:]
        result = keeper("status", url=queen.url)
        assert result.returncode == 0, result.stderr
        (line,) = [row for row in result.stdout.splitlines() if "synthetic" in row]
        assert "0/4 busy" in line, result.stdout


def test_a_queen_url_where_none_answers_names_the_usual_one(isolated_dirs: Path) -> None:
    """A mistyped --queen-url port starts a new, empty queen for the command, and says so, naming
    the queen that does answer at the usual address."""
    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as usual:
        (isolated_dirs / "config" / "rbee").mkdir(parents=True, exist_ok=True)
        (isolated_dirs / "config" / "rbee" / "config.toml").write_text(f'[keeper]\nqueen_url = "{usual.url}"\n')
        typo = f"http://127.0.0.1:{free_port()}"
        result = keeper("status", url=typo)
        assert result.returncode == 0, result.stderr
        assert f"No queen answers at {typo}, but one does at {usual.url}" in result.stderr
        assert "--queen-url" in result.stderr
        assert keeper("status", url=usual.url).stderr.count("No queen answers") == 0

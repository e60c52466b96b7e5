"""queen-rbee as a real process: readiness, signals, shutdown, bad start-up."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness.helpers import BIN, daemon, free_port


def stuck_listener() -> tuple[socket.socket, int]:
    """A TCP port that accepts connections and never answers: a hung hive."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, sock.getsockname()[1]


def test_sigterm_ends_open_stream_with_terminator_and_exits_0_fast(isolated_dirs: Path) -> None:
    listener, port = stuck_listener()
    config = isolated_dirs / "queen.toml"
    config.write_text(f'[queen]\nhive_probe_timeout_s = 60\n[hives.stuck]\nhost = "127.0.0.1"\nhive_port = {port}\n')
    try:
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)]) as queen:
            created = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"}).json()
            lines: list[str] = []
            opened = threading.Event()

            def read() -> None:
                with httpx.stream("GET", queen.url + created["sse_url"], timeout=None) as response:
                    opened.set()
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])

            reader = threading.Thread(target=read)
            reader.start()
            assert opened.wait(5)
            time.sleep(0.3)
            sent = time.monotonic()
            queen.process.send_signal(signal.SIGTERM)
            code = queen.process.wait(timeout=5)
            took = time.monotonic() - sent
            reader.join(5)
            assert code == 0
            # An open stream must not hold the stop until the 5 s grace: well under it, with a margin
            # for a loaded machine, or the stream was waited on.
            assert took < 2.0, f"queen took {took:.2f}s to exit"
            assert lines[-1] == "[CANCELLED]"
    finally:
        listener.close()


def test_http_shutdown_exits_0(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as queen:
        response = httpx.post(f"{queen.url}/v1/shutdown", json={})
        assert response.status_code == 202
        assert queen.process.wait(timeout=5) == 0


def test_port_in_use_is_one_line_error(isolated_dirs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(BIN / "queen-rbee"), "--port", str(port)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert "could not start" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_names_key_and_file(isolated_dirs: Path) -> None:
    config = isolated_dirs / "bad.toml"
    config.write_text("[queen]\nprot = 1\n")
    result = subprocess.run(
        [str(BIN / "queen-rbee"), "--port", str(free_port()), "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "queen.prot" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["queen-rbee", "rbee-hive", "llm-worker-rbee", "rbee-keeper"])
def test_every_program_says_its_version_and_its_help_quietly(isolated_dirs: Path, program: str) -> None:
    result = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{program} ")
    helped = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr  # no third-party warnings


def test_status_reports_a_running_hive_as_reachable(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "rbee-hive"), "--port", "0"]) as hive:
        port = hive.url.rsplit(":", 1)[1]
        config = isolated_dirs / "queen.toml"
        # localhost's hive is put on a port nothing listens on, rather than assuming 9000 is free here
        config.write_text(f'[hives.lab]\nhost = "127.0.0.1"\nhive_port = {port}\n'
                          f'[hives.localhost]\nhost = "127.0.0.1"\nhive_port = {free_port()}\n')
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)]) as queen:
            created = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"}).json()
            with httpx.stream("GET", queen.url + created["sse_url"], timeout=10) as response:
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            result = json.loads(data[-2])["value"]
            hives = {h["hive_id"]: h for h in result["hives"]}
            assert hives["lab"]["reachable"] is True
            assert hives["localhost"]["reachable"] is False


def test_hive_stops_when_its_stdin_closes(isolated_dirs: Path) -> None:
    process = subprocess.Popen(
        [str(BIN / "rbee-hive"), "--port", "0", "--lifeline", "stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        assert httpx.get(f"{ready['url']}/health").json()["status"] == "ok"
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=3) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_hive_rejects_infer_as_a_routing_bug(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "rbee-hive"), "--port", "0"]) as hive:
        created = httpx.post(f"{hive.url}/v1/jobs", json={"operation": "infer", "model": "m", "prompt": "hi"}).json()
        info = None
        for _ in range(100):
            info = httpx.get(f"{hive.url}/v1/jobs/{created['job_id']}").json()
            if info["state"] != "running":
                break
            time.sleep(0.02)
        assert info is not None and info["state"] == "failed"
        assert info["error"]["code"] == "WRONG_DAEMON"
        assert "routing bug" in info["error"]["message"]

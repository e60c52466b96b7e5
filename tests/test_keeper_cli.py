"""rbee-keeper: argument parsing (typer's CliRunner) and whole flows through real processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from harness.helpers import BIN, free_port, job_result, wait_for
from rbee_common.config import load_config
from rbee_keeper.__main__ import cli

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["infer"], "Missing argument"),
        (["infer", "hi", "--temperature", "3"], "--temperature"),
        (["infer", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["worker", "spawn"], "--model"),
        (["nonsense"], "No such command"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], words: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    assert words in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["worker", "spawn", "--model", "smollm2-135m", "--device", "GPU-x"], "device"),
        (["worker", "spawn", "--model", "smollm2-135m", "--hive", "../etc"], "hive_id"),
        (["model", "download", "hf:bad repo"], "model"),
        (["hive", "add", "lab-9", "--host", "10.231.0.9", "--host-key-policy", "trust-all"], "host_key_policy"),
        (["hive", "add", "lab-9", "--host", "10.231.0.9", "--identity-file", "/no/such/key"], "SSH key not found"),
        # values that would reach a remote shell (security review): refused before anything is written
        (["hive", "add", "lab-9", "--host", "10.231.0.9", "--python", "python3;touch /tmp/pwned"], "python"),
        (["hive", "add", "lab-9", "--host", "10.231.0.9", "--python", "$(touch /tmp/pwned)"], "python"),
        (["hive", "add", "lab-9", "--host", "h;touch /tmp/pwned"], "host"),
        (["hive", "add", "lab-9", "--host", "-oProxyCommand=touch /tmp/pwned"], "host"),
        (["hive", "add", "lab-9", "--host", "10.231.0.9", "--user", "root;id"], "ssh_user"),
    ],
)
def test_invalid_values_are_one_line_errors_before_any_network(
    isolated_dirs: Path, args: list[str], words: str
) -> None:
    result = runner.invoke(cli, ["--queen-url", f"http://127.0.0.1:{free_port()}", *args])
    assert result.exit_code == 1
    assert "error:" in result.output and words in result.output and "Traceback" not in result.output
    assert "regex" not in result.output and "\\Z" not in result.output  # words, never a pattern
    assert not (isolated_dirs / "config" / "rbee" / "config.toml").exists()  # nothing written


def test_a_mistyped_device_is_answered_in_words(isolated_dirs: Path) -> None:
    result = runner.invoke(cli, ["--queen-url", f"http://127.0.0.1:{free_port()}", "worker", "spawn",
                                 "--model", "smollm2-135m", "--device", "gpu0"])
    assert result.exit_code == 1
    assert "Expected a device: CPU-0, METAL-0, GPU-<n>" in result.output and "device" in result.output


def test_help_lists_the_commands() -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("infer", "status", "queen", "worker", "model"):
        assert command in result.output


def keeper(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, *args],
                          capture_output=True, text=True, timeout=timeout)


def ours(port: int) -> list[psutil.Process]:
    """This test's queen (by its port) and workers (by this test's XDG state dir, which they inherit);
    other queens and workers on the machine are not this test's business."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "queen-rbee" in cmdline and str(port) in cmdline:
            found.append(process)
        elif "llm-worker-rbee" in cmdline:
            with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to read
                if process.environ().get("XDG_STATE_HOME") == os.environ["XDG_STATE_HOME"]:
                    found.append(process)
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_infer_with_no_queen_answers_and_leaves_nothing_running(isolated_dirs: Path) -> None:
    port = free_port()
    result = keeper(f"http://127.0.0.1:{port}", "infer", "Why is the sky blue?", "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 5  # the answer, and only the answer
    assert "queen" not in result.stdout and "worker" not in result.stdout
    assert "waking queen" in result.stderr and "starting one on hive localhost" in result.stderr
    assert result.stdout.endswith("\n")  # the answer's line ends before the queen's goodbye
    assert wait_for(lambda: ours(port) == [], timeout=5)


def test_queen_start_status_spawn_infer_stop(isolated_dirs: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        assert keeper(url, "queen", "start").returncode == 0
        status = keeper(url, "status")
        assert status.returncode == 0 and "healthy" in status.stdout and "waking" not in status.stderr
        spawned = keeper(url, "worker", "spawn", "--model", "smollm2-135m", "--device", "CPU-0", "--threads", "1")
        assert spawned.returncode == 0, spawned.stderr
        assert "Preflight passed" in spawned.stderr and "worker_load" in spawned.stderr
        worker_id = spawned.stdout.split()[0]
        answer = keeper(url, "infer", "Say hello.", "--max-tokens", "10")
        assert answer.returncode == 0 and answer.stdout.strip()
        assert "starting one" not in answer.stderr  # it used the worker we spawned
        assert [w["worker_id"] for w in job_result(url, {"operation": "worker_list_active"})] == [worker_id]  # type: ignore[union-attr]
        listed = keeper(url, "worker", "list")
        assert worker_id in listed.stdout and "ready" in listed.stdout
        row = next(line.split() for line in listed.stdout.splitlines() if worker_id in line)
        assert row[4:6] == ["0/4", "8192"], listed.stdout  # the context the hive chose, and said
        assert "4 slot(s) of 8192 tokens (the model's trained context)" in spawned.stderr
    finally:
        stopped = keeper(url, "queen", "stop")
    assert stopped.returncode == 0
    assert wait_for(lambda: ours(port) == [], timeout=6)


def test_an_unknown_model_names_it_and_the_fix(isolated_dirs: Path) -> None:
    port = free_port()
    result = keeper(f"http://127.0.0.1:{port}", "infer", "hi", "--model", "no-such-model")
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and "rbee-keeper model list" in result.stderr
    assert "rbee-keeper model download" in result.stderr and "Traceback" not in result.stderr
    assert "✗" not in result.stderr and result.stderr.count("error:") == 1, result.stderr  # said once
    assert wait_for(lambda: ours(port) == [], timeout=5)


def test_ctrl_c_during_infer_exits_130_and_frees_the_slot(isolated_dirs: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        assert keeper(url, "queen", "start").returncode == 0
        spawned = keeper(url, "worker", "spawn", "--model", "smollm2-135m", "--threads", "1")
        worker_url = spawned.stdout.split()[3]
        process = subprocess.Popen(
            [str(BIN / "rbee-keeper"), "--queen-url", url, "infer", "--max-tokens", "1500", "--temperature", "0",
             "Write the numbers from 1 to 1000, separated by commas."],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # As from a terminal: a test run started in the background (`cmd &` in a script) has
            # SIGINT ignored, and an ignored signal stays ignored in every program it starts.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert wait_for(lambda: httpx.get(f"{worker_url}/v1/ready").json()["slots_busy"] == 1, timeout=20)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"rbee-keeper did not exit within 30 s of SIGINT; it said:\n{err[-3000:]}")
        assert code == 130
        assert wait_for(lambda: httpx.get(f"{worker_url}/v1/ready").json()["slots_busy"] == 0, timeout=1)
    finally:
        keeper(url, "queen", "stop")
    assert wait_for(lambda: ours(port) == [], timeout=6)




def test_hive_add_remove_and_import_ssh_edit_the_config_and_keep_the_rest(isolated_dirs: Path) -> None:
    config = isolated_dirs / "config" / "rbee" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("# my fleet\n[queen]\nport = 8600\n")
    assert runner.invoke(cli, ["hive", "add", "gpu-1", "--host", "10.231.0.9", "--user", "bee"]).exit_code == 0
    again = runner.invoke(cli, ["hive", "add", "gpu-1", "--host", "10.231.0.9"])
    assert again.exit_code == 1 and "already configured" in again.output
    ssh = isolated_dirs / "ssh_config"
    ssh.write_text("Host gpu-1 gpu-2\n  HostName 10.231.0.7\n  Port 2222\nHost *\n  User nobody\n")
    imported = runner.invoke(cli, ["hive", "import-ssh", str(ssh)])
    assert imported.exit_code == 0 and "added 1 hive(s): gpu-2" in imported.output and "gpu-1" in imported.output
    listed = runner.invoke(cli, ["hive", "list"]).output
    assert "10.231.0.9" in listed and "2222" in listed and "localhost" in listed
    assert runner.invoke(cli, ["hive", "remove", "gpu-2"]).exit_code == 0
    text = config.read_text()
    assert text.startswith("# my fleet\n[queen]\nport = 8600\n") and "gpu-2" not in text and "[hives.gpu-1]" in text
    assert runner.invoke(cli, ["hive", "remove", "gpu-2"]).exit_code == 1


def test_hive_add_host_key_policy_then_hive_get_shows_it(isolated_dirs: Path) -> None:
    added = runner.invoke(cli, ["hive", "add", "lab-3", "--host", "10.231.0.3", "--host-key-policy", "accept-new"])
    assert added.exit_code == 0, added.output
    shown = runner.invoke(cli, ["hive", "get", "lab-3"])
    assert shown.exit_code == 0
    assert re.search(r"^host_key_policy\s+accept-new$", shown.output, re.M), shown.output


def test_hive_add_writes_every_option_it_takes(isolated_dirs: Path) -> None:
    key = isolated_dirs / "id_test"
    key.write_text("not a real key, only a file that exists\n")
    added = runner.invoke(cli, [
        "hive", "add", "lab-4", "--host", "10.231.0.4", "--user", "bee", "--ssh-port", "2200",
        "--identity-file", str(key), "--hive-port", "9100", "--install-dir", "/opt/rbee hive",
        "--python", "/usr/bin/python3.11", "--host-key-policy", "accept-new"])
    assert added.exit_code == 0, added.output
    entry = load_config(None).hives["lab-4"]
    assert (entry.host, entry.ssh_user, entry.ssh_port, entry.identity_file, entry.hive_port, entry.install_dir,
            entry.python, entry.host_key_policy) == (
        "10.231.0.4", "bee", 2200, str(key.resolve()), 9100, "/opt/rbee hive", "/usr/bin/python3.11", "accept-new")


def test_hive_install_localhost_explains_local_hive_and_says_no_without_a_terminal(isolated_dirs: Path) -> None:
    from harness.helpers import daemon

    with daemon([str(BIN / "queen-rbee"), "--port", "0"]) as queen:
        result = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", queen.url, "hive", "install", "localhost"],
                                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "--local-hive" in result.stderr and "ms" in result.stderr
    assert "the answer is no" in result.stderr


def test_model_download_shows_a_progress_bar_and_lists_the_model(isolated_dirs: Path) -> None:
    from harness.fake_hf import FakeHub

    url = f"http://127.0.0.1:{free_port()}"
    with FakeHub(isolated_dirs / "hub") as hub:
        hub.add_file("test-org/tiny-GGUF", "tiny.Q4_K_M.gguf", b"\0" * 5_000_000)
        hub.rate = 5e6  # about a second: the bar redraws
        env = {**os.environ, "HF_ENDPOINT": hub.url}
        try:
            assert subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, "queen", "start"],
                                  capture_output=True, timeout=60, env=env).returncode == 0
            result = subprocess.run(
                [str(BIN / "rbee-keeper"), "--queen-url", url, "model", "download", "hf:test-org/tiny-GGUF"],
                capture_output=True, text=True, timeout=60, env=env,
            )
            assert result.returncode == 0, result.stderr
            assert "download [####################] 100% 5.0/5.0 MB" in result.stderr
            assert result.stdout.startswith("tiny-q4_k_m  5 MB  ")
            listed = keeper(url, "model", "list")
            assert "tiny-q4_k_m" in listed.stdout and "smollm2-135m" in listed.stdout
        finally:
            keeper(url, "queen", "stop")
    assert wait_for(lambda: ours(int(url.rsplit(":", 1)[1])) == [], timeout=6)

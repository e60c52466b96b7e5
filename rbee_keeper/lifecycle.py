"""Starting, finding and stopping the queen process from the keeper.

`queen start` runs queen-rbee as a detached daemon (its own session, pid and
log under the XDG state dir); `queen stop` asks it over HTTP and falls back to
SIGTERM. `ephemeral_queen` is seed 002's mode: if no queen answers, start one
for this command and stop it again at the end, but never stop a queen that
was already running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from rbee_common.auth import TOKEN_ENV, bearer
from rbee_common.client import map_transport_errors
from rbee_common.config import state_dir
from rbee_common.errors import ConfigError, ServiceUnavailable, TransportError

HEALTH_TIMEOUT_S = 0.5
Say = Callable[[str], None]


def queen_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            "The queen URL must look like http://HOST:PORT.",
            hint="Pass --queen-url, or set keeper.queen_url in the config.",
        )
    return parts.hostname, parts.port or 8500


def pid_file(url: str) -> Path:
    return state_dir() / f"queen-{queen_address(url)[1]}.pid"


def log_file(url: str) -> Path:
    return state_dir() / f"queen-{queen_address(url)[1]}.log"


def client_token() -> str | None:
    """The token this keeper presents to the queen: $RBEE_API_TOKEN (None: none)."""
    return os.environ.get(TOKEN_ENV) or None


def is_healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when a queen answers `/health` with ok within `timeout`."""
    try:
        with map_transport_errors(url):
            response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except TransportError:
        return False
    return response.status_code == 200 and b'"ok"' in response.content


def _queen_command(host: str, port: int, config: str | None, local_hive: bool) -> list[str]:
    script = Path(sys.executable).with_name("queen-rbee")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rbee_queen"]
    command += ["--host", host, "--port", str(port)]
    if local_hive:
        command.append("--local-hive")
    if config:
        command += ["--config", config]
    return command


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_queen(
    url: str, *, config: str | None = None, timeout: float = 30.0, local_hive: bool = False
) -> subprocess.Popen[bytes]:
    """Start a detached queen for `url`; its process, once it answers /health."""
    host, port = queen_address(url)
    state_dir().mkdir(parents=True, exist_ok=True)
    log_path = log_file(url)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            _queen_command(host, port, config, local_hive),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a daemon: not killed with the keeper's terminal
        )
    pid_file(url).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return process
        if process.poll() is not None:
            pid_file(url).unlink(missing_ok=True)
            raise ServiceUnavailable(
                f"queen-rbee exited during start-up (code {process.returncode}).",
                hint=f"Its log ({log_path}) ends with:\n{_tail(log_path)}",
            )
        time.sleep(0.1)
    process.kill()
    process.wait()
    pid_file(url).unlink(missing_ok=True)
    raise ServiceUnavailable(
        f"queen-rbee did not become healthy within {timeout:g} s.",
        hint=f"See its log: {log_path}",
    )


def _queen_pid(url: str) -> int | None:
    """The pid in the pid file, if that process is still a queen."""
    try:
        pid = int(pid_file(url).read_text().strip())
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if ("queen-rbee" in cmdline or "rbee_queen" in cmdline) else None


def _wait_gone(pid: int | None, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pid is not None and psutil.pid_exists(pid) and _is_running(pid)
        if not alive and not is_healthy(url, timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def stop_queen(url: str, *, say: Say, timeout: float = 10.0) -> bool:
    """Stop the queen at `url`; False when none was running."""
    pid = _queen_pid(url)
    try:
        with map_transport_errors(url):
            response = httpx.post(f"{url.rstrip('/')}/v1/shutdown", json={}, timeout=2.0,
                                  headers=bearer(client_token()))
        asked = response.status_code < 400
    except TransportError:
        asked = False
    if asked:
        say("Queen shutdown via HTTP")
    elif pid is not None:
        say("HTTP shutdown failed, sending SIGTERM")
        _terminate(pid)
    else:
        pid_file(url).unlink(missing_ok=True)
        return False
    if not _wait_gone(pid, url, timeout) and pid is not None:
        say("Queen did not stop in time, killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, url, 2.0)
    pid_file(url).unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def ephemeral_queen(
    url: str, *, say: Say, config: str | None = None, keep: bool = False, timeout: float = 30.0,
    local_hive: bool = True, verbose: bool = False, usual: str | None = None,
) -> Iterator[bool]:
    """Make sure a queen answers at `url` for the duration; yields whether we started it. `usual`:
    the queen's address without --queen-url; one answering there while none does at `url` (a typo
    in the port?) is said before a new, empty queen starts."""
    if is_healthy(url):
        yield False
        if verbose:
            say("Queen was already running, not shutting down")
        return
    if usual is not None and usual != url and is_healthy(usual):
        say(f"No queen answers at {url}, but one does at {usual} (your usual queen, with its hives and "
            f"models); check --queen-url or RBEE_QUEEN_URL. Starting a new, empty queen at {url}.")
    say(f"queen is asleep, waking queen (none answers at {url}: one starts there for this command)")
    process = start_queen(url, config=config, timeout=timeout, local_hive=local_hive)
    say("queen is awake and healthy")
    try:
        yield True
    finally:
        if keep:
            say(f"Leaving the queen running at {url} (stop it with `rbee-keeper queen stop`)")
        else:
            say("Shutting down queen")
            stop_queen(url, say=say)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5.0)  # reap it: no zombie left behind

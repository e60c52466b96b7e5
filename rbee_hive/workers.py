"""The hive's workers: spawn with preflight, supervise, stop (DESIGN §4, §6).

Every worker is a child of the hive, started from the trio thread (so Linux's
PR_SET_PDEATHSIG follows the hive), with a lifeline pipe whose write end only
the hive holds: if the hive dies, the worker reads EOF and exits. A
supervisor task per worker reaps it and removes it from the registry when it
exits, whoever stopped it.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import httpx
import msgspec
import psutil
import trio

from rbee_common.auth import TOKEN_ENV, bearer, new_token, token_sha256
from rbee_common.builtin import BUILTIN_MODELS, builtin_model_path
from rbee_common.child import Child, spawn_child
from rbee_common.config import HiveSettings
from rbee_common.errors import Forbidden, NotFound, RbeeError, ServiceUnavailable, Unprocessable
from rbee_common.jobs import JobContext
from rbee_common.sizing import GgufError, auto_slots, gguf_metadata, kv_bytes_per_token, worker_bytes
from rbee_common.wire import WorkerSpawn
from rbee_hive.catalog import Catalog, CatalogEntry, check_reference
from rbee_hive.devices import available_backends, detect_devices, physical_cores

log = logging.getLogger("rbee.hive.workers")
WorkerPhase = Literal["starting", "ready", "busy", "stopping"]


class HiveWorker(msgspec.Struct, kw_only=True):
    worker_id: str
    model: str
    device: str
    backend: str
    threads: int
    pid: int
    port: int
    url: str
    state: WorkerPhase
    slots_total: int = 1
    slots_busy: int = 0
    idle_s: float = 0.0
    started_at: float
    token_sha256: str | None = None
    """SHA-256 of the worker's own API token: the queen checks a heartbeat's token against it."""


class Preflight(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model_arg: str
    backend: str
    threads: int
    required_bytes: int
    available_bytes: int
    memory: str
    slots: int = 1


class InsufficientResources(Unprocessable):
    code = "INSUFFICIENT_RESOURCES"


class WorkerStartFailed(ServiceUnavailable):
    code = "WORKER_START_FAILED"


class _Running:
    def __init__(
        self, info: HiveWorker, process: Child, lifeline: int, model_path: str, token: str | None
    ) -> None:
        self.info = info
        self.token = token
        """The worker's own API token: the hive presents it; the worker never sees the hive's."""
        self.process = process
        self.lifeline = lifeline
        self.model_path = model_path
        self.exited = trio.Event()
        self.failed_checks = 0


def tail(path: Path, lines: int = 10) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def worker_command(settings: HiveSettings) -> list[str]:
    if settings.worker_binary:
        return [settings.worker_binary]
    beside = Path(sys.executable).parent / "llm-worker-rbee"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "rbee_worker"]


class Workers:
    def __init__(
        self, settings: HiveSettings, catalog: Catalog, nursery: trio.Nursery, *, log_dir: Path,
        token: str | None = None,
    ) -> None:
        self.settings = settings
        self.token = token
        """The hive's own token: with one, every worker gets a token of its own (never this one)."""
        self.catalog = catalog
        self.nursery = nursery
        self.log_dir = log_dir
        self.running: dict[str, _Running] = {}
        self._reserved_ports: set[int] = set()
        self.on_idle_stop: Callable[[HiveWorker], None] = lambda worker: None
        """A worker the hive stops by itself (idle timeout): the audit log."""

    def http(self, timeout: float = 5.0) -> httpx.AsyncClient:
        """A client for talking to our workers (each request carries that worker's token).

        No kept-alive connections: checks are seconds apart, and an idle connection would
        hold a stopping worker's HTTP shutdown."""
        return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))

    # --- queries --------------------------------------------------------------

    def list(self) -> list[HiveWorker]:
        return [r.info for r in sorted(self.running.values(), key=lambda r: r.info.started_at)]

    def get(self, worker_id: str) -> HiveWorker:
        running = self.running.get(worker_id)
        if running is None:
            raise NotFound("No worker with that id on this hive.", code="WORKER_NOT_FOUND",
                           hint="List them with `worker_list`.")
        return running.info

    def uses_model(self, entry: CatalogEntry) -> bool:
        return any(r.model_path == entry.path or r.info.model == entry.id for r in self.running.values())

    def cpu_budget(self) -> tuple[int, int]:
        """(threads all CPU workers may use, threads they use now)."""
        total = self.settings.cpu_threads or physical_cores()
        used = sum(r.info.threads for r in self.running.values()
                   if r.info.device == "CPU-0" and r.info.backend != "synthetic")
        return total, used

    def spin_wait(self, device: str, threads: int) -> str:
        """`short` for a CPU worker that takes every core: the hive, the queen or anything else that
        runs would deschedule one of its threads, and llama.cpp's spinning threads would all wait."""
        if self.settings.worker_spin_wait != "auto":
            return self.settings.worker_spin_wait
        return "short" if device == "CPU-0" and threads >= physical_cores() else "full"

    # --- spawn ----------------------------------------------------------------

    def _model(self, ref: str) -> tuple[str, str, str, int]:
        """(name reported by the worker, path or built-in name, format, size in bytes)."""
        check_reference(ref)
        entry = self.catalog.find(ref)
        if entry is not None:
            model_arg = entry.id if entry.provider == "builtin" else entry.path
            return entry.id, model_arg, entry.format, entry.size_bytes
        if ref.startswith("file://"):
            path = self.confined(Path(ref.removeprefix("file://")))
            if path.is_file() and path.suffix == ".gguf":
                return ref, str(path), "gguf", path.stat().st_size
            if path.is_dir() and (path / "config.json").is_file():
                size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
                return ref, str(path), "mlx", size
        raise NotFound(
            "That model is not on this hive.", code="MODEL_NOT_FOUND",
            hint="Download it first (`model_download`), or give file:///abs/path.gguf.",
        )

    def model_roots(self) -> builtins.list[Path]:
        roots = [self.catalog.root, *(Path(root).expanduser() for root in self.settings.model_roots)]
        builtin = builtin_model_path("smollm2-135m")
        return roots + ([builtin.parent] if builtin is not None else [])

    def confined(self, path: Path) -> Path:
        """A `file://` path, once it resolves (symlinks followed) inside a model root.

        Checked before the path is opened, and answered the same whether it
        exists or not: a client cannot use a hive to open or probe other files.
        """
        resolved = path.resolve() if path.is_absolute() else None
        roots = [root.resolve() for root in self.model_roots()]
        if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
            raise Forbidden(
                "file:// models must be inside this hive's model folders.", code="MODEL_PATH_NOT_ALLOWED",
                hint="Put the file in the hive's catalog folder, or add its folder to [hive] model_roots "
                     "on the hive.",
            )
        return resolved

    def preflight(self, op: WorkerSpawn) -> Preflight:
        """Check the model, device, backend, memory and threads."""
        command = worker_command(self.settings)
        if not Path(command[0]).exists():
            raise WorkerStartFailed(
                f"The worker program was not found at {command[0]}.", code="WORKER_BINARY_NOT_FOUND",
                hint="Install rbee on this machine, or fix [hive] worker_binary.",
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if op.backend == "synthetic" or (op.backend == "auto" and self.settings.synthetic_backend):
            return self._synthetic(op)
        name, model_arg, fmt, size = self._model(op.model)
        devices = {d.id: d for d in detect_devices()}
        device = devices.get(op.device)
        if device is None:
            raise NotFound(
                "This hive has no such device.", code="DEVICE_NOT_FOUND",
                details={"devices": sorted(devices)}, hint=f"Use one of: {', '.join(sorted(devices))}.",
            )
        backends = available_backends()
        backend = op.backend if op.backend != "auto" else ("mlx" if fmt == "mlx" else "llama-cpp")
        problem = None
        if backend not in backends:
            problem = f"The {backend} backend is not installed on this hive."
        elif backend == "mlx" and op.device.startswith("GPU-"):
            problem = "MLX runs on METAL-0 or CPU-0, not on CUDA GPUs."
        elif (backend == "mlx") != (fmt == "mlx"):
            problem = f"The {backend} backend cannot serve a {fmt.upper()} model."
        if problem:
            raise ServiceUnavailable(
                problem, code="BACKEND_UNAVAILABLE", details={"available_backends": backends},
                hint=f"Available here: {', '.join(backends) or 'none'}.",
            )
        ctx = self.settings.worker_ctx
        slots = self.settings.worker_slots or auto_slots(device=op.device, backend=backend, ctx=ctx)
        kv_per_token = 0
        if fmt == "gguf":
            try:
                path = builtin_model_path(model_arg) if model_arg in BUILTIN_MODELS else Path(model_arg)
                kv_per_token = kv_bytes_per_token(gguf_metadata(path or model_arg))
            except (OSError, GgufError):
                kv_per_token = 0  # llama.cpp will say what is wrong with the file
        needed = worker_bytes(size, kv_per_token=kv_per_token, slots=slots, ctx=ctx)
        kind = "VRAM" if device.kind == "cuda" else "RAM"
        free = device.memory_free_bytes if device.kind == "cuda" else psutil.virtual_memory().available
        if needed > free:
            cache = f" and a cache of {slots} x {ctx} tokens" if kv_per_token else ""
            raise InsufficientResources(
                f"Not enough {kind} on {op.device}: the model needs {needed / 1e6:.0f} MB "
                f"(its {size / 1e6:.0f} MB once{cache}) and {free / 1e6:.0f} MB are available.",
                code=f"INSUFFICIENT_{kind}",
                details={"required_bytes": needed, "available_bytes": free, "device": op.device,
                         "model": name},
                hint="Stop a worker, pick a smaller quantization, use another device, or lower "
                     "[hive] worker_slots or worker_ctx.",
            )
        threads = op.threads or 1
        if op.device == "CPU-0":
            total, used = self.cpu_budget()
            free_threads = total - used
            threads = op.threads or free_threads
            if threads < 1 or threads > free_threads:
                raise InsufficientResources(
                    f"CPU workers may use {total} threads together; {used} are taken, "
                    f"{max(free_threads, 0)} are free.",
                    code="INSUFFICIENT_CPU",
                    details={"threads_total": total, "threads_used": used, "threads_requested": threads},
                    hint="Stop a CPU worker, or ask for fewer threads.",
                )
        return Preflight(name=name, model_arg=model_arg, backend=backend, threads=threads,
                         required_bytes=needed, available_bytes=free, memory=kind, slots=slots)

    def _synthetic(self, op: WorkerSpawn) -> Preflight:
        """The synthetic backend (benchmarks and tests): no model to find, no memory to check."""
        if not self.settings.synthetic_backend:
            raise ServiceUnavailable(
                "The synthetic backend is for benchmarks and tests, and is off on this hive.",
                code="BACKEND_UNAVAILABLE", details={"available_backends": available_backends()},
                hint="Set [hive] synthetic_backend = true on a test hive.",
            )
        check_reference(op.model)
        return Preflight(name=op.model, model_arg=op.model, backend="synthetic", threads=1,
                         required_bytes=0, available_bytes=psutil.virtual_memory().available, memory="RAM",
                         slots=self.settings.synthetic_slots)

    def _free_port(self, skip: set[int]) -> int:
        used = {r.info.port for r in self.running.values()} | self._reserved_ports | skip
        for port in range(self.settings.worker_port_min, self.settings.worker_port_max + 1):
            if port in used:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((self.settings.host, port))
                except OSError:
                    continue
            return port
        raise InsufficientResources(
            "No free port in the worker port range.", code="NO_FREE_PORT",
            details={"port_min": self.settings.worker_port_min, "port_max": self.settings.worker_port_max},
            hint="Stop a worker or widen [hive] worker_port_min/worker_port_max.",
        )

    async def spawn(self, op: WorkerSpawn, context: JobContext) -> HiveWorker:
        checked = await trio.to_thread.run_sync(self.preflight, op)
        name, backend, threads = checked.name, checked.backend, checked.threads
        context.narrate(
            "worker_preflight",
            f"Preflight passed: {name} on {op.device} with {backend}, {threads} thread(s), "
            f"{checked.slots} slot(s); it needs "
            f"{checked.required_bytes / 1e6:.0f} MB of the {checked.available_bytes / 1e6:.0f} MB "
            f"{checked.memory} available",
            model=name, device=op.device, backend=backend, threads=threads, slots=checked.slots,
            required_bytes=checked.required_bytes, available_bytes=checked.available_bytes,
        )
        worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        tried: set[int] = set()
        for _attempt in range(3):  # a port taken between our check and the worker's bind: next one
            port = self._free_port(tried)
            tried.add(port)
            self._reserved_ports.add(port)
            try:
                result = await self._start(op, context, worker_id, checked, port)
            finally:
                self._reserved_ports.discard(port)
            if result is not None:
                return result
            context.narrate("worker_spawn", f"Port {port} was taken; trying another", level="warn")
        raise WorkerStartFailed(
            "No port in the range could be bound.", hint="Free ports in the worker range."
        )

    async def _start(
        self, op: WorkerSpawn, context: JobContext, worker_id: str, checked: Preflight, port: int,
    ) -> HiveWorker | None:
        name, model_arg, backend, threads = checked.name, checked.model_arg, checked.backend, checked.threads
        command = worker_command(self.settings)
        log_path = self.log_dir / f"{worker_id}.log"
        token = op.worker_token or (new_token() if self.token else None)
        read_end, write_end = os.pipe()
        argv = [
            *command, "--model", model_arg, "--model-name", name, "--device", op.device, "--backend", backend,
            "--host", self.settings.host, "--port", str(port), "--worker-id", worker_id,
            "--hive-id", self.settings.hive_id, "--threads", str(threads), "--lifeline-fd", str(read_end),
            "--heartbeat-s", f"{self.settings.worker_heartbeat_s:g}",
            "--slots", str(checked.slots), "--ctx", str(self.settings.worker_ctx),
            "--spin-wait", self.spin_wait(op.device, threads),
            # drain a little less than we wait, so a busy worker finishes before our SIGKILL
            "--drain-s", f"{max(self.settings.worker_stop_grace_s - 1.0, 0.5):g}",
            *(["--queen-url", self.settings.queen_url] if self.settings.queen_url else []),
        ]
        if backend == "synthetic":
            argv += ["--synthetic-tokens-per-s", f"{self.settings.synthetic_tokens_per_s:g}"]
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # from trio's own thread, so that PR_SET_PDEATHSIG follows the hive (see child.py)
            # the token goes in the environment, not argv: `ps` shows argv to every user
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
            if token:
                env[TOKEN_ENV] = token
            process = spawn_child(argv, stderr=log_fd, pass_fds=(read_end,), env=env)
        except OSError as error:
            os.close(write_end)
            raise WorkerStartFailed(f"The worker could not be started: {error.strerror}.") from None
        finally:
            os.close(read_end)
            os.close(log_fd)
        context.narrate(
            "worker_spawn", f"Started {worker_id} (pid {process.pid}) on port {port}; loading the model",
            worker_id=worker_id, pid=process.pid, port=port,
        )
        info = HiveWorker(
            worker_id=worker_id, model=name, device=op.device, backend=backend, threads=threads,
            pid=process.pid, port=port, url=f"http://{self.settings.host}:{port}", state="starting",
            slots_total=checked.slots,
            started_at=time.time(),
            token_sha256=token_sha256(token) if token else None,
        )
        running = _Running(info, process, write_end, model_arg, token)
        self.running[worker_id] = running
        self.nursery.start_soon(self._supervise, running)
        started = time.monotonic()
        ready: dict[str, object] | None = None
        timed_out = True
        try:
            with trio.move_on_after(self.settings.worker_ready_timeout_s):
                ready = await self._read_ready(process, context, started)
                timed_out = False
        except BaseException:
            await self._kill(running, "the spawn job was cancelled")
            raise
        failure = ready if ready is not None and ready.get("event") == "failed" else None
        if ready is None or failure is not None:
            if not timed_out:  # stdout closed or it said why: it is exiting; let the supervisor reap it
                with trio.move_on_after(5):
                    await running.exited.wait()
            exited = running.exited.is_set()
            if not exited:
                await self._kill(running, "not ready in time")
            await process.stdout.aclose()
            last = tail(log_path)
            if exited and any("Address already in use" in line for line in last):
                return None
            said = failure.get("message") if failure is not None else None
            reason = (f"exited with code {process.returncode} while loading" if exited else
                      f"was not ready within {self.settings.worker_ready_timeout_s:g} s and was killed")
            # The client gets one line and a correlation id; the worker's own lines (paths,
            # tracebacks) stay in the hive's log, under that id.
            cid = str(uuid.uuid4())
            log.warning("worker %s %s correlation_id=%s; its log %s ends with:",
                        worker_id, reason, cid, log_path)
            for line in last:
                log.warning("  correlation_id=%s %r", cid, line)
            plain = isinstance(said, str) and said.isprintable() and len(said) <= 300
            one_line = f" ({said})" if plain else ""
            raise WorkerStartFailed(
                f"The worker {reason}{one_line}.",
                code="WORKER_START_FAILED" if exited else "WORKER_READY_TIMEOUT",
                correlation_id=cid,
                hint="The hive's log has the worker's last lines under this correlation id.",
            )
        info.url = str(ready.get("url") or info.url)
        info.state = "ready"
        context.progress("worker_load", int((time.monotonic() - started) * 1000), unit="ms")
        context.narrate("worker_ready", f"Worker {worker_id} is ready at {info.url}", worker_id=worker_id,
                        url=info.url)
        return info

    async def _read_ready(
        self, process: Child, context: JobContext, started: float
    ) -> dict[str, object] | None:
        stdout = process.stdout
        buffer = bytearray()
        while True:
            with trio.move_on_after(0.5):
                chunk = await stdout.receive_some(4096)
                if not chunk:
                    return None  # it exited
                buffer += chunk
            context.progress("worker_load", int((time.monotonic() - started) * 1000), unit="ms")
            *lines, _partial = bytes(buffer).split(b"\n")  # only whole lines
            for line in lines:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "ready":
                        self.nursery.start_soon(self._drain, stdout)
                        return event
                    if isinstance(event, dict) and event.get("event") == "failed":
                        return event  # our worker's own one-line reason

    @staticmethod
    async def _drain(stdout: trio.abc.ReceiveStream) -> None:
        """Keep reading what the worker prints, so that it never writes into a closed pipe."""
        async with stdout:
            while await stdout.receive_some(4096):
                pass

    async def _supervise(self, running: _Running) -> None:
        info = running.info
        try:
            code = await running.process.wait()
        finally:
            with contextlib.suppress(OSError):
                os.close(running.lifeline)
            self.running.pop(info.worker_id, None)
            running.exited.set()
        if info.state != "stopping":
            log.warning("worker %s (pid %d) died with exit code %s; removed", info.worker_id, info.pid, code)
        else:
            log.info("worker %s (pid %d) stopped with exit code %s", info.worker_id, info.pid, code)

    async def _kill(self, running: _Running, why: str) -> None:
        running.info.state = "stopping"
        if running.process.returncode is None:
            info = running.info
            log.warning("killing worker %s (pid %d, SIGKILL): %s", info.worker_id, info.pid, why)
            running.process.send_signal(signal.SIGKILL)
        # Shielded, so a cancelled caller still reaps what it killed; bounded, because the
        # supervisor that sets `exited` may itself be cancelled (the hive's nursery closing).
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await running.exited.wait()

    # --- health ---------------------------------------------------------------

    async def check(self, running: _Running, http: httpx.AsyncClient) -> None:
        """One health check: HTTP `/v1/ready` (the supervisor already watches the pid)."""
        info = running.info
        if info.state not in ("ready", "busy"):
            return
        try:
            # Connecting must be quick; answering may be slow (10 s at the default period) on a
            # worker busy with thousands of streams: that worker is alive, not to be killed.
            patience = httpx.Timeout(2 * self.settings.worker_check_s, connect=2.0)
            response = await http.get(f"{info.url}/v1/ready", timeout=patience, headers=bearer(running.token))
            ready = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            ready = None
        if info.state not in ("ready", "busy"):
            return  # it was stopped meanwhile
        if not isinstance(ready, dict):
            running.failed_checks += 1
            log.warning("worker %s (pid %d) failed health check %d of 3",
                        info.worker_id, info.pid, running.failed_checks)
            if running.failed_checks >= 3:
                await self._kill(running, "3 failed health checks in a row (process alive, HTTP dead)")
            return
        running.failed_checks = 0
        info.slots_busy = int(ready.get("slots_busy", 0))
        info.idle_s = float(ready.get("idle_s", 0.0))
        info.state = "busy" if ready.get("state") == "busy" else "ready"
        timeout = self.settings.worker_idle_timeout_s
        if timeout and info.slots_busy == 0 and info.idle_s >= timeout:
            log.info("worker %s idle for %.0f s (limit %g s): stopping it",
                     info.worker_id, info.idle_s, timeout)
            info.state = "stopping"
            self.on_idle_stop(info)
            self.nursery.start_soon(self.stop, info.worker_id)

    async def check_all(self, http: httpx.AsyncClient) -> None:
        async with trio.open_nursery() as nursery:
            for running in list(self.running.values()):
                nursery.start_soon(self.check, running, http)

    async def monitor_forever(self) -> None:
        async with self.http() as http:
            while True:
                await trio.sleep(self.settings.worker_check_s)
                await self.check_all(http)

    # --- stop -----------------------------------------------------------------

    async def stop(self, worker_id: str, context: JobContext | None = None) -> HiveWorker:
        running = self.running.get(worker_id)
        if running is None:
            self.get(worker_id)  # raises WORKER_NOT_FOUND
            raise NotFound("No such worker.")
        info = running.info
        info.state = "stopping"

        def say(text: str) -> None:
            log.info("%s: %s", info.worker_id, text)
            if context is not None:
                context.narrate("worker_stop", text, worker_id=info.worker_id)

        grace = self.settings.worker_stop_grace_s
        say(f"Asking {info.worker_id} to shut down (drain up to {grace:g} s)")
        try:
            async with self.http(timeout=1.0) as http:
                log.info("%s: POST %s/v1/admin/shutdown", info.worker_id, info.url)
                await http.post(f"{info.url}/v1/admin/shutdown", headers=bearer(running.token))
        except httpx.HTTPError:
            say("It did not answer over HTTP; sending SIGTERM")
            running.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await running.exited.wait()
        if not running.exited.is_set():
            say(f"Still running after {grace:g} s; sending SIGKILL to pid {info.pid}")
            await self._kill(running, "no graceful exit within the deadline")
        say(f"Worker {info.worker_id} stopped; port {info.port} is free")
        return info

    async def stop_all(self) -> None:
        workers: Sequence[str] = list(self.running)
        if not workers:
            return
        log.info("Shutting down %d worker(s)", len(workers))
        stopped = 0

        async def stop_one(worker_id: str) -> None:
            nonlocal stopped
            with contextlib.suppress(RbeeError):
                await self.stop(worker_id)
            stopped += 1
            log.info("%d/%d workers stopped", stopped, len(workers))

        async with trio.open_nursery() as nursery:
            for worker_id in workers:
                nursery.start_soon(stop_one, worker_id)
        log.info("All workers stopped")

    def kill_all(self) -> None:
        for running in self.running.values():
            if running.process.returncode is None:
                log.warning("killing worker %s (pid %d, SIGKILL): shutdown deadline passed",
                            running.info.worker_id, running.info.pid)
                running.process.send_signal(signal.SIGKILL)


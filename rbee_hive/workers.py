"""The hive's workers: spawn with preflight, supervise, stop (DESIGN §4, §6).

Every worker is a child of the hive, started from the trio thread (so Linux's
PR_SET_PDEATHSIG follows the hive), with a lifeline pipe whose write end only
the hive holds: if the hive dies, the worker reads EOF and exits. A
supervisor task per worker reaps it and removes it from the registry when it
exits, whoever stopped it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import trio

from rbee_common.auth import TOKEN_ENV, bearer, new_token, token_sha256
from rbee_common.child import Child, spawn_child
from rbee_common.client import map_transport_errors
from rbee_common.config import HiveSettings
from rbee_common.errors import (
    InsufficientCpu,
    InsufficientRam,
    InsufficientVram,
    NoFreePort,
    NotFound,
    RbeeError,
    TransportError,
    WorkerNotFound,
    WorkerReadyTimeout,
    WorkerStartFailed,
)
from rbee_common.gpus import format_split, gpu_environment
from rbee_common.jobs import JobContext
from rbee_common.wire import CatalogEntry, WorkerRecord, WorkerSpawn
from rbee_hive.catalog import Catalog
from rbee_hive.devices import physical_cores
from rbee_hive.metrics import HiveMetrics
from rbee_hive.preflight import Preflight, preflight, worker_command

log = logging.getLogger("rbee.hive.workers")


class _Running:
    def __init__(
        self, info: WorkerRecord, process: Child, lifeline: int, model_path: str, token: str | None
    ) -> None:
        self.info = info
        self.token = token
        """The worker's own API token: the hive presents it; the worker never sees the hive's."""
        self.process = process
        self.lifeline = lifeline
        self.model_path = model_path
        self.exited = trio.Event()
        self.failed_checks = 0
        self.keep = False
        """Spared by the idle timeout (`WorkerSpawn.keep`)."""
        self.reserved_bytes = 0
        """What its preflight counted it needs (RAM on a CPU, VRAM on GPUs): what stopping it frees."""
        self.killed = False
        """SIGKILL was sent: a second stop only waits for the exit (reaping a process whose
        gigabyte of cache the kernel frees takes tens of milliseconds)."""


def tail(path: Path, lines: int = 10) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


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
        self.on_idle_stop: Callable[[WorkerRecord], None] = lambda worker: None
        """A worker the hive stops by itself (idle timeout): the audit log."""
        self.metrics: HiveMetrics | None = None
        self.on_evict: Callable[[WorkerRecord], None] = lambda worker: None
        """An idle worker the hive stops to make room for another (the audit log)."""
        self.extra_cpu_threads: Callable[[], int] = lambda: 0
        """CPU threads taken outside the workers (this hive's RPC servers)."""

    def http(self, timeout: float = 5.0) -> httpx.AsyncClient:
        """A client for talking to our workers (each request carries that worker's token).

        No kept-alive connections: checks are seconds apart, and an idle connection would
        hold a stopping worker's HTTP shutdown."""
        return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))

    # --- queries --------------------------------------------------------------

    def list(self) -> list[WorkerRecord]:
        return [r.info for r in sorted(self.running.values(), key=lambda r: r.info.started_at or 0.0)]

    def get(self, worker_id: str) -> WorkerRecord:
        running = self.running.get(worker_id)
        if running is None:
            raise WorkerNotFound("No worker with that id on this hive.",
                                 hint=f"List them: rbee-keeper worker list --hive {self.settings.hive_id}")
        return running.info

    def uses_model(self, entry: CatalogEntry) -> bool:
        return any(r.model_path == entry.path or r.info.model == entry.id for r in self.running.values())

    def cpu_budget(self) -> tuple[int, int]:
        """(threads all CPU workers may use, threads they use now)."""
        total = self.settings.cpu_threads or physical_cores()
        used = sum(r.info.threads or 0 for r in self.running.values()
                   if r.info.device == "CPU-0" and r.info.backend != "synthetic")
        return total, used + self.extra_cpu_threads()

    def spin_wait(self, device: str, threads: int) -> str:
        """`short` for a CPU worker that takes every core: the hive, the queen or anything else that
        runs would deschedule one of its threads, and llama.cpp's spinning threads would all wait."""
        if self.settings.worker_spin_wait != "auto":
            return self.settings.worker_spin_wait
        return "short" if device == "CPU-0" and threads >= physical_cores() else "full"

    # --- room for the next model ----------------------------------------------

    async def _make_room(self, op: WorkerSpawn, short: RbeeError, context: JobContext) -> bool:
        """Stop idle workers, least recently used first, that hold what `op` lacks, if stopping
        them frees enough; whether it stopped any. Never a worker with requests, nor one the
        queen keeps (`min_workers`)."""
        if not self.settings.evict_idle:
            return False
        details = short.details
        cpu = isinstance(short, InsufficientCpu)
        gpu = isinstance(short, InsufficientVram)
        wanted = set(op.device.split(","))
        if cpu:
            requested = int(details["threads_requested"]) or 1  # (none asked for: all that are free)
            lacking = requested - (int(details["threads_total"]) - int(details["threads_used"]))
        else:
            lacking = int(details["required_bytes"]) - int(details["available_bytes"])
        what = "CPU threads" if cpu else "VRAM" if gpu else "RAM"

        def holds(running: _Running) -> int:
            """What stopping it frees of what the spawn lacks."""
            info = running.info
            if cpu:
                return (info.threads or 0) if info.device == "CPU-0" and info.backend != "synthetic" else 0
            if gpu:
                return running.reserved_bytes if wanted & set(info.device.split(",")) else 0
            return running.reserved_bytes if info.device == "CPU-0" else 0

        async with self.http() as http:
            await self.check_all(http)  # who is idle now, not at the last check
        idle = sorted((r for r in self.running.values()
                       if r.info.state == "ready" and r.info.slots_busy == 0 and not r.keep and holds(r)),
                      key=lambda r: -r.info.idle_s)
        chosen, freed = [], 0
        for running in idle:
            if freed >= lacking:
                break
            chosen.append(running)
            freed += holds(running)
        if not chosen or freed < lacking:
            return False
        for running in chosen:
            info = running.info
            context.narrate(
                "worker_evict", f"Stopping idle worker {info.worker_id} ({info.model}, idle for "
                f"{info.idle_s:.0f} s) to make room for {op.model}: it holds the {what} the new worker "
                "needs", worker_id=info.worker_id, model=info.model, idle_s=info.idle_s)
            self.on_evict(info)
            await self.stop(info.worker_id, context)
        return True

    # --- spawn ----------------------------------------------------------------

    def preflight(self, op: WorkerSpawn) -> Preflight:
        """Blocking (NVML, disk): call it in a thread."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return preflight(self.settings, self.catalog, op, cpu_budget=self.cpu_budget())

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
        raise NoFreePort(
            "No free port in the worker port range.",
            details={"port_min": self.settings.worker_port_min, "port_max": self.settings.worker_port_max},
            hint="Stop a worker or widen [hive] worker_port_min/worker_port_max.",
        )

    async def spawn(self, op: WorkerSpawn, context: JobContext) -> WorkerRecord:
        try:
            checked = await trio.to_thread.run_sync(self.preflight, op)
        except (InsufficientCpu, InsufficientRam, InsufficientVram) as short:
            if not await self._make_room(op, short, context):
                raise
            checked = await trio.to_thread.run_sync(self.preflight, op)
        name, backend, threads = checked.name, checked.backend, checked.threads
        cache = f", a prompt cache of {checked.cache_ram_mib} MiB in RAM" if checked.cache_ram_mib else ""
        if checked.tensor_split:
            holders = op.device.split(",") + [f"hive {helper}" for helper in op.helpers]
            total = sum(checked.tensor_split)
            cache += ", the layers split " + " / ".join(
                f"{share / total:.0%} on {holder}"
                for holder, share in zip(holders, checked.tensor_split, strict=True))
        context.narrate(
            "worker_preflight",
            f"Preflight passed: {name} on {op.device} with {backend}, {threads} thread(s), "
            f"{checked.slots} slot(s) of {checked.ctx} tokens ({checked.ctx_why}){cache}; it needs "
            f"{checked.required_bytes / 1e6:.0f} MB of the {checked.available_bytes / 1e6:.0f} MB "
            f"{checked.memory} available",
            model=name, device=op.device, backend=backend, threads=threads, slots=checked.slots,
            ctx=checked.ctx, ctx_why=checked.ctx_why, cache_ram_mib=checked.cache_ram_mib,
            tensor_split=checked.tensor_split,
            required_bytes=checked.required_bytes, available_bytes=checked.available_bytes,
        )
        worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        tried: set[int] = set()
        for _attempt in range(3):  # a port taken between our check and the worker's bind: next one
            port = self._free_port(tried)
            tried.add(port)
            self._reserved_ports.add(port)
            began = time.monotonic()
            try:
                result = await self._start(op, context, worker_id, checked, port)
            except RbeeError:
                if self.metrics is not None:
                    self.metrics.spawns.labels(backend, "failed").inc()
                raise
            finally:
                self._reserved_ports.discard(port)
            if result is not None:
                if self.metrics is not None:
                    self.metrics.spawns.labels(backend, "completed").inc()
                    self.metrics.start_duration.labels(backend).observe(time.monotonic() - began)
                return result
            context.narrate("worker_spawn", f"Port {port} was taken; trying another", level="warn")
        raise WorkerStartFailed(
            "No port in the range could be bound.", hint="Free ports in the worker range."
        )

    async def _start(
        self, op: WorkerSpawn, context: JobContext, worker_id: str, checked: Preflight, port: int,
    ) -> WorkerRecord | None:
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
            "--slots", str(checked.slots), "--ctx", str(checked.ctx),
            "--cache-ram", str(checked.cache_ram_mib),
            "--spin-wait", self.spin_wait(op.device, threads),
            # drain a little less than we wait, so a busy worker finishes before our SIGKILL
            "--drain-s", f"{max(self.settings.worker_stop_grace_s - 1.0, 0.5):g}",
            *(["--queen-url", self.settings.queen_url] if self.settings.queen_url else []),
            *(["--metrics-public"] if self.settings.metrics_public else []),
            *(["--tensor-split", format_split(checked.tensor_split)] if checked.tensor_split else []),
            *(["--rpc", ",".join(op.rpc)] if op.rpc else []),
        ]
        if backend == "synthetic":
            argv += ["--synthetic-tokens-per-s", f"{self.settings.synthetic_tokens_per_s:g}",
                     "--synthetic-prefill-tokens-per-s", f"{self.settings.synthetic_prefill_tokens_per_s:g}"]
            argv += ["--script", self.settings.synthetic_script] if self.settings.synthetic_script else []
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # from trio's own thread, so that PR_SET_PDEATHSIG follows the hive (see child.py)
            # the token goes in the environment, not argv: `ps` shows argv to every user
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | gpu_environment(op.device)
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
        info = WorkerRecord(
            worker_id=worker_id, hive_id=self.settings.hive_id, model=name, device=op.device, backend=backend,
            threads=threads, pid=process.pid, port=port, url=f"http://{self.settings.host}:{port}",
            state="loading", slots_total=checked.slots, ctx=checked.ctx, started_at=time.time(),
            token_sha256=token_sha256(token) if token else None, helpers=list(op.helpers) or None,
        )
        running = _Running(info, process, write_end, model_arg, token)
        running.keep = op.keep
        running.reserved_bytes = checked.required_bytes
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
            raise (WorkerStartFailed if exited else WorkerReadyTimeout)(
                f"The worker {reason}{one_line}.",
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
        if info.state != "draining":
            log.warning("worker %s (pid %d) died with exit code %s; removed", info.worker_id, info.pid, code)
            if self.metrics is not None and info.state != "loading":  # (a failed start is counted there)
                self.metrics.crashes.labels(info.model).inc()
        else:
            log.info("worker %s (pid %d) stopped with exit code %s", info.worker_id, info.pid, code)

    async def _kill(self, running: _Running, why: str) -> None:
        running.info.state = "draining"
        if running.process.returncode is None and not running.killed:
            running.killed = True
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
            with map_transport_errors(f"worker {info.worker_id}"):
                response = await http.get(f"{info.url}/v1/ready", timeout=patience,
                                          headers=bearer(running.token))
            ready = response.json() if response.status_code == 200 else None
        except (TransportError, ValueError):
            ready = None
        if info.state not in ("ready", "busy"):
            return  # it was stopped meanwhile
        if self.metrics is not None:
            self.metrics.health_checks.labels("success" if isinstance(ready, dict) else "failure").inc()
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
        if timeout and info.slots_busy == 0 and info.idle_s >= timeout and not running.keep:
            log.info("worker %s idle for %.0f s (limit %g s): stopping it",
                     info.worker_id, info.idle_s, timeout)
            info.state = "draining"
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

    async def stop(self, worker_id: str, context: JobContext | None = None) -> WorkerRecord:
        running = self.running.get(worker_id)
        if running is None:
            self.get(worker_id)  # raises WORKER_NOT_FOUND
            raise NotFound("No such worker.")
        info = running.info
        info.state = "draining"

        def say(text: str) -> None:
            log.info("%s: %s", info.worker_id, text)
            if context is not None:
                context.narrate("worker_stop", text, worker_id=info.worker_id)

        grace = self.settings.worker_stop_grace_s
        say(f"Asking {info.worker_id} to shut down (drain up to {grace:g} s)")
        try:
            async with self.http(timeout=1.0) as http:
                log.info("%s: POST %s/v1/admin/shutdown", info.worker_id, info.url)
                with map_transport_errors(f"worker {info.worker_id}"):
                    await http.post(f"{info.url}/v1/admin/shutdown", json={}, headers=bearer(running.token))
        except TransportError:
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


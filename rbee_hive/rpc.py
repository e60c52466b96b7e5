"""RPC servers this hive runs for workers on other hives (`rpc_serve`, `rpc_stop`).

Each is `rbee_worker.rpc_server` (llama.cpp's RPC server, from the same llama-cpp-python the
workers load) on 127.0.0.1 only: the queen tunnels to it over SSH. The hive owns it: it dies with
the hive (PR_SET_PDEATHSIG), stops on `rpc_stop` and when the hive shuts down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

from rbee_common.child import Child, spawn_child
from rbee_common.config import HiveSettings
from rbee_common.errors import BackendUnavailable, DeviceNotFound, RpcServerNotFound, WorkerStartFailed
from rbee_common.ggml import RPC_BUILD
from rbee_common.gpus import gpu_environment, llama_rpc
from rbee_common.jobs import JobContext
from rbee_common.wire import RpcServe, RpcServer
from rbee_hive.devices import detect_devices, mark_unusable

log = logging.getLogger("rbee.hive.rpc")
READY_S = 20.0


@dataclass
class _Running:
    info: RpcServer
    process: Child
    exited: trio.Event


class RpcServers:
    def __init__(self, settings: HiveSettings, nursery: trio.Nursery, *, log_dir: Path) -> None:
        self.settings = settings
        self.nursery = nursery
        self.log_dir = log_dir
        self.running: dict[str, _Running] = {}

    def list(self) -> list[RpcServer]:
        return [r.info for r in self.running.values()]

    def cpu_threads(self) -> int:
        """Threads its servers on the CPU use (they count in the CPU workers' budget)."""
        return sum(r.info.threads for r in self.running.values() if r.info.device == "CPU-0")

    async def serve(self, op: RpcServe, context: JobContext, *, free_threads: int) -> RpcServer:
        if not await trio.to_thread.run_sync(llama_rpc):
            raise BackendUnavailable(
                "llama-cpp-python on this hive was built without the RPC backend: it cannot lend its "
                "device to another hive.", hint=f"On this hive: {RPC_BUILD}")
        devices = {d.id: d for d in mark_unusable(await trio.to_thread.run_sync(detect_devices))}
        device = op.device or ",".join(
            d.id for d in devices.values() if d.kind == "cuda" and not d.unusable) or "CPU-0"
        chosen = [devices.get(name) for name in device.split(",")]
        if None in chosen:
            raise DeviceNotFound(f"This hive has no device {device}.",
                                 hint=f"Use one of: {', '.join(sorted(devices))}.")
        found = [d for d in chosen if d is not None]
        if unusable := next((d.unusable for d in found if d.unusable), None):
            raise BackendUnavailable(unusable)
        cpu = device == "CPU-0"
        threads = op.threads or (free_threads if cpu else 1)
        if cpu and not 1 <= threads <= free_threads:
            raise BackendUnavailable(
                f"{max(free_threads, 0)} CPU threads are free on this hive; the RPC server wants {threads}.",
                hint="Stop a CPU worker, or ask for fewer threads.")
        free = sum(d.memory_free_bytes for d in found)
        server_id = f"rpc-{uuid.uuid4().hex[:12]}"
        port = _free_loopback_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_dir / f"{server_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        argv = [sys.executable, "-m", "rbee_worker.rpc_server", "--port", str(port),
                "--threads", str(threads), "--device", device]
        try:
            process = spawn_child(argv, stderr=log_fd, env=dict(os.environ) | gpu_environment(device))
        except OSError as error:
            raise WorkerStartFailed(f"The RPC server could not be started: {error.strerror}.") from None
        finally:
            os.close(log_fd)
        info = RpcServer(server_id=server_id, hive_id=self.settings.hive_id, device=device, port=port,
                         pid=process.pid, threads=threads, free_bytes=free, started_at=time.time())
        running = _Running(info, process, trio.Event())
        self.running[server_id] = running
        self.nursery.start_soon(self._supervise, running)
        with trio.move_on_after(READY_S):
            while not running.exited.is_set():  # (another process's port: polling is all there is)
                if await trio.to_thread.run_sync(_answers, port):
                    break
                await trio.sleep(0.05)
            if not running.exited.is_set():
                context.narrate(
                    "rpc_serve", f"RPC server {server_id} lends {device} ({free / 1e9:.1f} GB free, "
                    f"{threads} thread(s)) on 127.0.0.1:{port} only; pid {process.pid}",
                    server_id=server_id, port=port, device=device)
                return info
        await self._kill(running)
        tail = _tail(self.log_dir / f"{server_id}.log")
        raise WorkerStartFailed(f"The RPC server did not start: {tail}",
                                hint=f"Its log: {self.log_dir / f'{server_id}.log'} on this hive.")

    async def stop(self, server_id: str, context: JobContext | None = None) -> RpcServer:
        running = self.running.get(server_id)
        if running is None:
            raise RpcServerNotFound("No RPC server with that id on this hive.",
                                    hint="It stopped already, or its hive restarted.")
        await self._kill(running)
        if context is not None:
            context.narrate("rpc_stop", f"RPC server {server_id} stopped", server_id=server_id)
        return running.info

    async def stop_all(self) -> None:
        for server_id in list(self.running):
            with contextlib.suppress(RpcServerNotFound):
                await self.stop(server_id)

    async def _kill(self, running: _Running) -> None:
        running.process.send_signal(signal.SIGTERM)  # it holds no state worth a drain
        with trio.move_on_after(3):
            await running.exited.wait()
        if not running.exited.is_set():
            running.process.send_signal(signal.SIGKILL)
            await running.exited.wait()

    async def _supervise(self, running: _Running) -> None:
        try:
            code = await running.process.wait()
            log.info("RPC server %s exited (%s)", running.info.server_id, code)
        finally:
            with contextlib.suppress(OSError, trio.ClosedResourceError):
                await running.process.stdout.aclose()
            self.running.pop(running.info.server_id, None)
            running.exited.set()


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "(no output)"


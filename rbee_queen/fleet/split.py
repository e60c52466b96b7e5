"""One model over several hives: llama.cpp's RPC backend, through SSH tunnels the queen holds.

A split worker runs on one hive (the main one) and keeps part of the layers on devices of other
hives (helpers), each lent by an RPC server its hive runs on 127.0.0.1 only (`rpc_serve`). The
RPC protocol has no authentication, so no RPC port is ever reachable from the network: the queen
opens, with the SSH access it already has to every hive,

    main hive 127.0.0.1:P  --ssh (remote forward)-->  queen 127.0.0.1:Q
    queen 127.0.0.1:Q      --ssh (local forward)--->  helper 127.0.0.1:<rpc port>

and the worker is told `--rpc 127.0.0.1:P`. A hive inside this queen (--local-hive) needs no
tunnel on its side. The shares follow free memory: the main device's and each helper's.

The queen holds the tunnels and servers while the worker lives. When it stops (or exits), they
close and the servers stop. When a helper is lost, the worker's next step fails: llama.cpp aborts
the worker, its request ends with an error naming the helper, and the rest is closed here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

from rbee_common.errors import RbeeError, ValidationFailed, WorkerNotFound
from rbee_common.gpus import shares
from rbee_common.jobs import JobContext
from rbee_common.wire import RpcServe, RpcServer, RpcStop, WorkerGet, WorkerRecord, WorkerSpawn, WorkerStop
from rbee_queen.fleet import ssh
from rbee_queen.fleet.hives import HiveRouter
from rbee_queen.fleet.remote import Remote
from rbee_queen.registry import WorkerRegistry

log = logging.getLogger("rbee.queen.split")
WATCH_S = 1.0


@dataclass
class Split:
    """A split worker's helpers: their servers, the tunnels to them, and whether it still lives."""

    main: str
    servers: list[RpcServer]
    worker_id: str | None = None
    lost: str | None = None
    """Why it ended, when a helper was lost (said in its requests' errors)."""
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Splits:
    def __init__(self, router: HiveRouter, remote: Remote, nursery: trio.Nursery,
                 registry: WorkerRegistry) -> None:
        self.router = router
        self.remote = remote
        self.nursery = nursery
        self.registry = registry

    async def spawn(self, op: WorkerSpawn, context: JobContext) -> WorkerRecord:
        """Start `op`'s worker on its hive with part of its layers on `op.helpers`' devices."""
        main, helpers = op.hive_id, list(op.helpers)
        if main in helpers or len(set(helpers)) != len(helpers):
            raise ValidationFailed("A split's helpers must be other hives than its own, each once.",
                                   details={"hive_id": main, "helpers": helpers})
        for hive_id in [main, *helpers]:
            self.router.get(hive_id)  # HIVE_NOT_FOUND before anything starts
        caps = await self.router.get(main).capabilities()
        local = [d for d in caps.devices if d.id in op.device.split(",")]
        local_free = sum(d.memory_free_bytes for d in local)
        split = Split(main=main, servers=[])
        try:
            for helper in helpers:
                server = await self.router.get(helper).run(
                    RpcServe(hive_id=helper, threads=op.threads), context)
                split.servers.append(server)
            weights = shares([local_free] + [server.free_bytes for server in split.servers])
            plan = ", ".join(
                [f"{weights[0]:.0%} on {main} {op.device} ({local_free / 1e9:.1f} GB free)"]
                + [f"{weight:.0%} on {s.hive_id} {s.device} ({s.free_bytes / 1e9:.1f} GB free)"
                   for weight, s in zip(weights[1:], split.servers, strict=True)])
            context.narrate("worker_split", f"Splitting {op.model} over {len(helpers) + 1} hives by free "
                            f"memory: {plan}; RPC through SSH tunnels, loopback only on every host",
                            hive_id=main, helpers=helpers, tensor_split=weights)
            endpoints: list[str] = await self.nursery.start(self._hold, split, context)
            local_split = [weights[0] * d.memory_free_bytes / max(local_free, 1) for d in local] \
                if len(local) > 1 else [weights[0]]
            spawned = await self.router.get(main).run(msgspec.structs.replace(
                op, rpc=endpoints, tensor_split=[max(w, 1e-3) for w in local_split + weights[1:]]), context)
        except BaseException:
            split.done.set()
            with trio.CancelScope(shield=True):
                await self._stop_servers(split)
            raise
        split.worker_id = spawned.worker_id
        self.registry.helpers[spawned.worker_id] = helpers
        self.nursery.start_soon(self._watch, split)
        return spawned

    async def _hold(self, split: Split, context: JobContext,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the tunnels, hand back their ends on the main hive, and hold them until `done`."""
        def say(text: str) -> None:
            context.narrate("worker_split", text, hive_id=split.main)

        try:
            with split.scope:
                async with contextlib.AsyncExitStack() as stack:
                    main = await self._session(stack, split.main, say)
                    endpoints, sessions = [], []
                    for server in split.servers:
                        helper = await self._session(stack, server.hive_id, say)
                        port = await helper.forward_local(server.port) if helper else server.port
                        if helper is not None:
                            sessions.append((server.hive_id, helper))
                        endpoints.append(f"127.0.0.1:{await main.forward_remote(port) if main else port}")
                    say("Tunnels open: " + ", ".join(
                        f"{s.hive_id} 127.0.0.1:{s.port} -> {split.main} {end}"
                        for s, end in zip(split.servers, endpoints, strict=True)))
                    task_status.started(endpoints)
                    while not split.done.is_set():
                        with trio.move_on_after(WATCH_S):
                            await split.done.wait()
                        for hive_id, session in sessions:
                            if session.closed() and split.lost is None:
                                split.lost = f"the SSH connection to its helper hive {hive_id} was lost"
        finally:
            split.done.set()

    async def _session(self, stack: contextlib.AsyncExitStack, hive_id: str,
                       say: Callable[[str], None]) -> ssh.Session | None:
        """An SSH connection to the hive's host, or None for a hive inside this queen."""
        if getattr(self.router.get(hive_id), "in_process", False):
            return None
        target = self.remote.target(hive_id, self.router.entry(hive_id))
        session: ssh.Session = await stack.enter_async_context(ssh.connect(target, say))
        return session

    async def _watch(self, split: Split) -> None:
        """Until the worker is gone: then close the tunnels and stop the servers."""
        worker_id = split.worker_id or ""
        hive = self.router.get(split.main)
        try:
            while not split.done.is_set():
                with trio.move_on_after(WATCH_S):
                    await split.done.wait()
                try:
                    await hive.run(WorkerGet(worker_id=worker_id, hive_id=split.main), None)
                except WorkerNotFound:
                    break
                except RbeeError as error:
                    log.info("split worker %s: its hive did not answer (%s)", split.worker_id, error.code)
                for server in split.servers:
                    if split.lost is None and not await self._serving(server):
                        split.lost = f"its helper hive {server.hive_id} was lost"
                if split.lost is not None:
                    # A tunnel does not always pass on the end of the server behind it: the worker
                    # would wait for an answer. Closed tunnels end its connections, and llama.cpp
                    # ends the worker (its requests fail, naming the helper); then it is stopped.
                    log.warning("split worker %s: %s; closing its tunnels", split.worker_id, split.lost)
                    split.scope.cancel()
                    self.registry.forget(worker_id, split.lost, "stopped")
                    with contextlib.suppress(RbeeError), trio.move_on_after(30):
                        await hive.run(WorkerStop(worker_id=worker_id, hive_id=split.main), None)
                    break
        finally:
            split.done.set()
            split.scope.cancel()
            with trio.CancelScope(shield=True):
                await self._stop_servers(split)
            self.registry.helpers.pop(worker_id, None)
            log.info("split worker %s is gone; its tunnels are closed and its RPC servers stopped",
                     split.worker_id)

    async def _serving(self, server: RpcServer) -> bool:
        try:
            health = await self.router.get(server.hive_id).health(2.0)
        except RbeeError:
            return False
        return health.reachable

    async def _stop_servers(self, split: Split) -> None:
        for server in split.servers:
            with contextlib.suppress(RbeeError), trio.move_on_after(10):
                await self.router.get(server.hive_id).run(
                    RpcStop(server_id=server.server_id, hive_id=server.hive_id), None)



"""ggml's backend registry and RPC backend, called through ctypes on llama-cpp-python's own libraries.

llama-cpp-python's `rpc_servers` argument does nothing in current versions, so a worker that
splits a model over other hives registers their RPC devices itself, before the model loads, as
`llama-server --rpc` does (`add_rpc_devices` in llama.cpp's `common/arg.cpp`). The helper side,
`rbee_worker.rpc_server`, serves from the same libraries: one build, one protocol version on both
ends.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

DEVICE_CPU, DEVICE_GPU = 0, 1
RPC_BUILD = ('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-deps --no-cache-dir '
             "llama-cpp-python==0.3.36")


def _unavailable(message: str, hint: str | None = None) -> Exception:
    """`BackendUnavailable`, imported when raised: `python -m rbee_common.llama_build` asks this
    module what a build can do in a venv that has no rbee dependencies yet."""
    from rbee_common.errors import BackendUnavailable

    return BackendUnavailable(message, hint=hint)


class Ggml:
    """The few ggml functions rbee calls, from the libraries llama-cpp-python loaded."""

    def __init__(self) -> None:
        import llama_cpp

        # By soname, not by path: llama_cpp's libllama loaded these already, and a wheel holds
        # copies, not links, of libggml.so and libggml.so.0: opened by path, a second copy would
        # load, with a registry of its own that llama.cpp never sees.
        base = ctypes.CDLL("libggml-base.so.0", mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
        ggml = ctypes.CDLL("libggml.so.0", mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
        p, size = ctypes.c_void_p, ctypes.c_size_t
        self._signatures(base, ggml, p, size)
        self.base, self.ggml = base, ggml
        self.rpc = ggml.ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None

    @staticmethod
    def _signatures(base: ctypes.CDLL, ggml: ctypes.CDLL, p: type, size: type) -> None:
        ggml.ggml_backend_reg_by_name.argtypes, ggml.ggml_backend_reg_by_name.restype = [ctypes.c_char_p], p
        ggml.ggml_backend_register.argtypes, ggml.ggml_backend_register.restype = [p], None
        ggml.ggml_backend_dev_count.argtypes, ggml.ggml_backend_dev_count.restype = [], size
        ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [size], p
        ggml.ggml_backend_dev_by_type.argtypes, ggml.ggml_backend_dev_by_type.restype = [ctypes.c_int], p
        base.ggml_backend_reg_get_proc_address.argtypes = [p, ctypes.c_char_p]
        base.ggml_backend_reg_get_proc_address.restype = p
        base.ggml_backend_reg_dev_count.argtypes, base.ggml_backend_reg_dev_count.restype = [p], size
        base.ggml_backend_dev_type.argtypes, base.ggml_backend_dev_type.restype = [p], ctypes.c_int
        base.ggml_backend_dev_name.argtypes, base.ggml_backend_dev_name.restype = [p], ctypes.c_char_p
        base.ggml_backend_dev_memory.argtypes = [p, ctypes.POINTER(size), ctypes.POINTER(size)]
        base.ggml_backend_dev_memory.restype = None

    def _rpc_function(self, name: str, restype: Any, argtypes: list[Any]) -> Any:
        if not self.rpc:
            raise _unavailable(
                "llama-cpp-python on this machine was built without the RPC backend (GGML_RPC): "
                "it cannot split a model over other hives.", hint=RPC_BUILD)
        address = self.base.ggml_backend_reg_get_proc_address(self.rpc, name.encode())
        if not address:
            raise _unavailable(f"ggml's RPC backend has no {name}.", hint=RPC_BUILD)
        return ctypes.CFUNCTYPE(restype, *argtypes)(address)

    def has_backend(self, name: str) -> bool:
        """Whether this build has the backend (`CUDA`, `RPC`), devices or not."""
        return bool(self.ggml.ggml_backend_reg_by_name(name.encode()))

    def gpus(self) -> list[int]:
        """This process's GPU devices (CUDA, as `CUDA_VISIBLE_DEVICES` shows them), as handles."""
        found = []
        for index in range(self.ggml.ggml_backend_dev_count()):
            device = self.ggml.ggml_backend_dev_get(index)
            if self.base.ggml_backend_dev_type(device) == DEVICE_GPU:
                found.append(device)
        return found

    def add_rpc_servers(self, endpoints: list[str]) -> list[int]:
        """Register each server's devices (after checking it answers: ggml aborts the process on a
        server it cannot reach); how many devices each one added."""
        add = self._rpc_function("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
        added = []
        for endpoint in endpoints:
            host, _, port = endpoint.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except (OSError, ValueError):
                raise _unavailable(
                    f"The RPC server at {endpoint} does not answer.",
                    hint="Its hive or its tunnel is gone: spawn the split worker again.") from None
            reg = add(endpoint.encode())
            if not reg:
                raise _unavailable(f"ggml could not add the RPC server at {endpoint}.")
            self.ggml.ggml_backend_register(reg)
            added.append(int(self.base.ggml_backend_reg_dev_count(reg)))
        return added

    def serve_rpc(self, port: int, threads: int, gpu: bool) -> None:
        """Serve this machine's device to RPC clients on 127.0.0.1:`port`, until the process ends.

        Bound to loopback only, always: the protocol has no authentication, so remote clients come
        through an SSH tunnel."""
        start = self._rpc_function(
            "ggml_backend_rpc_start_server", None,
            [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
             ctypes.POINTER(ctypes.c_void_p)])
        devices = self.gpus() if gpu else [self.ggml.ggml_backend_dev_by_type(DEVICE_CPU)]
        if not devices or not all(devices):
            raise _unavailable("No device to serve: " + ("no GPU is visible." if gpu else "no CPU."))
        array = (ctypes.c_void_p * len(devices))(*devices)
        start(f"127.0.0.1:{port}".encode(), None, threads, len(devices), array)

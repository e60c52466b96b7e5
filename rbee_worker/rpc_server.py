"""`python -m rbee_worker.rpc_server`: lend this machine's device to a worker on another hive.

llama.cpp's `rpc-server`, run from the libraries of the installed llama-cpp-python (the worker on
the other end uses the same build, so the protocol versions match). It listens on 127.0.0.1 only:
the RPC protocol has no authentication and has had remote-code-execution bugs, so the worker
reaches it through an SSH tunnel the queen holds. Its hive starts it (`rpc_serve`) and stops it;
it dies with its hive (PR_SET_PDEATHSIG) and on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys

from rbee_common.errors import RbeeError
from rbee_common.gpus import gpu_environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee-rpc-server", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="Port on 127.0.0.1.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a CPU device).")
    parser.add_argument("--device", default="CPU-0", help="CPU-0, or GPU-<n> (several: GPU-0,GPU-1).")
    args = parser.parse_args(argv)
    os.dup2(2, 1)  # llama.cpp prints each connection to stdout: into the log with the rest
    os.environ.update(gpu_environment(args.device))  # before the CUDA backend initialises
    from rbee_common.ggml import Ggml
    from rbee_worker.__main__ import die_with_parent

    die_with_parent()
    try:
        ggml = Ggml()
        sys.stderr.write(f"rbee-rpc-server: serving {args.device} on 127.0.0.1:{args.port}\n")
        sys.stderr.flush()
        ggml.serve_rpc(args.port, args.threads, gpu=args.device.startswith("GPU-"))
    except RbeeError as error:
        sys.stderr.write(f"rbee-rpc-server: error: {error.message} {error.hint or ''}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama-cpp-python built the way rbee needs it: with llama.cpp's RPC backend, and CUDA where there is
a CUDA toolkit.

pip's wheel cache ignores `CMAKE_ARGS`: once it holds a CPU-only build, `CMAKE_ARGS=... pip install`
gets that build back. So rbee builds its own wheels, one folder per flavour, under
`~/.cache/rbee/wheels/llama-cpp-python-<version>-<flavour>/` (`rpc`: CPU and RPC; `cuda-rpc`: CUDA
and RPC), and installs from there. The wheelhouse that `hive install` uploads takes the same wheel.

    python -m rbee_common.llama_build            # this venv: RPC (and CUDA with nvcc and a GPU), once
    python -m rbee_common.llama_build --check    # what the installed one can do
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rbee_common.gpus import LLAMA_CPP_VERSION
from rbee_common.paths import cache_dir

SDIST = f"llama-cpp-python=={LLAMA_CPP_VERSION}"


def nvcc() -> str | None:
    """The CUDA compiler here, if any (PATH, then CUDA's usual home)."""
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvidia_gpu() -> bool:
    """An NVIDIA driver with a card here (its control device): a CUDA toolkit alone, as on a build
    machine or a CI runner without a GPU, is no reason for a CUDA build."""
    return os.path.exists("/dev/nvidiactl")


def wanted_flavour() -> str:
    """`cuda-rpc` where there are both the CUDA toolkit and an NVIDIA GPU, else `rpc`."""
    return "cuda-rpc" if nvcc() and nvidia_gpu() else "rpc"


def cmake_args(flavour: str) -> str:
    return "-DGGML_RPC=on" + (" -DGGML_CUDA=on" if flavour.startswith("cuda") else "")


def wheel_dir(flavour: str) -> Path:
    """Where the wheel of `flavour` is kept: `$RBEE_LLAMA_WHEELS` (shared by checkouts and test
    runs), else ~/.cache/rbee/wheels."""
    root = Path(os.environ.get("RBEE_LLAMA_WHEELS") or cache_dir() / "wheels")
    return root / f"llama-cpp-python-{LLAMA_CPP_VERSION}-{flavour}"


def cached_wheel(flavour: str) -> Path | None:
    wheels = sorted(wheel_dir(flavour).glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(flavour: str, say: Callable[[str], None], source: str | None = None) -> Path:
    """The wheel of this flavour, built once (about 7 minutes on 2 cores for `rpc`) from `source` (an
    sdist's path; default: the package index). `$CMAKE_ARGS` adds to the flavour's (for example
    -DCMAKE_CUDA_ARCHITECTURES=90)."""
    found = cached_wheel(flavour)
    if found is not None:
        return found
    folder = wheel_dir(flavour)
    staging = folder.with_name(folder.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    say(f"Building llama-cpp-python {LLAMA_CPP_VERSION} with {cmake_args(flavour)}: llama.cpp compiles "
        "from source, once (about 7 minutes on 2 cores; the wheel is kept in " + str(folder.parent) + ")")
    env = dict(os.environ, CMAKE_ARGS=f"{cmake_args(flavour)} {os.environ.get('CMAKE_ARGS', '')}".strip())
    if flavour.startswith("cuda") and (compiler := nvcc()):
        env.setdefault("CUDACXX", compiler)
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "--no-binary",
               "llama-cpp-python", "-w", str(staging), source or SDIST]
    code, tail = _run_with_progress(command, env, say)
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"building llama-cpp-python failed: {(tail or ['(no output)'])[-1][:300]}")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    wheel = cached_wheel(flavour)
    if wheel is None:
        raise RuntimeError(f"pip built no llama-cpp-python wheel into {folder}")
    return wheel


_STEP = re.compile(r"^\[\s*(?:(?P<percent>\d{1,3})%|(?P<done>\d+)/(?P<total>\d+))\]")
"""A build step: make's `[ 45%]` or ninja's `[12/140]`."""


def _run_with_progress(
    command: list[str], env: dict[str, str], say: Callable[[str], None],
) -> tuple[int, list[str]]:
    """Run pip's build, saying the compiler's progress (`[ 45%]` or `[12/140]`) every 10%; its exit code
    and its last lines (for an error)."""
    tail: list[str] = []
    said = -10
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as build:
        for line in build.stdout or ():
            tail = [*tail[-19:], line.rstrip()]
            step = _STEP.match(line.strip())
            if step is None:
                continue
            percent = int(step["percent"] or 100 * int(step["done"]) // max(int(step["total"]), 1))
            if percent >= said + 10:
                said = percent // 10 * 10
                say(f"compiling llama.cpp: {said}%")
    return build.returncode, tail


def capabilities(python: str = sys.executable) -> dict[str, bool]:
    """What the llama-cpp-python of `python` can do (asked in a child: loading it is not free)."""
    code = ("import json, llama_cpp as l; from rbee_common.ggml import Ggml; "
            "print(json.dumps({'rpc': bool(l.llama_supports_rpc()), "
            "'gpu_offload': Ggml().has_backend('CUDA')}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"rpc": False, "gpu_offload": False}
    import json

    answer: dict[str, bool] = json.loads(done.stdout)
    return answer


def ensure_installed(
    say: Callable[[str], None], flavour: str | None = None, source: str | None = None,
) -> dict[str, bool]:
    """This venv's llama-cpp-python, replaced by the wanted flavour unless it already does all that
    flavour does."""
    flavour = flavour or wanted_flavour()
    have = capabilities()
    if have["rpc"] and (have["gpu_offload"] or not flavour.startswith("cuda")):
        say(f"llama-cpp-python here has {describe(have)}: nothing to do")
        return have
    wheel = build_wheel(flavour, say, source)
    say(f"Installing {wheel.name} ({flavour}) into {sys.prefix}")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(wheel)], check=True)
    subprocess.run([*pip, str(wheel)], check=True)  # what it needs (numpy, …), where missing
    have = capabilities()
    say(f"llama-cpp-python here now has {describe(have)}")
    return have


def describe(have: dict[str, bool]) -> str:
    gpu = "CUDA" if have.get("gpu_offload") else "CPU only"
    return gpu + (" and RPC" if have.get("rpc") else ", no RPC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee_common.llama_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only say what the installed one can do.")
    parser.add_argument("--flavour", choices=("rpc", "cuda-rpc"),
                        help="Default: cuda-rpc where nvcc and an NVIDIA GPU are.")
    parser.add_argument("--sdist", help="Build from this sdist (a machine without the package index).")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        sys.stderr.write(f"llama_build: {text}\n")

    if args.check:
        say(f"llama-cpp-python here has {describe(capabilities())}")
        return 0
    try:
        ensure_installed(say, args.flavour, args.sdist)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        say(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

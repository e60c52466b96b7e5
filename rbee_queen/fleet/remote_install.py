"""`hive_install` and `hive_uninstall` over SSH (DESIGN §7).

`install` checks the host (Python >= 3.11, the platform, free disk), has
`remote_wheels` put rbee there, and writes the hive's token (0600) and config.
Only then is the install recorded on the queen's side
(`$XDG_STATE_HOME/rbee/hives/<id>/install.json` and `token`, in `Installs`);
a failed install records nothing and removes the directory it created.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from rbee_common import wheelhouse
from rbee_common.auth import cached_token_file, new_token, write_token_file
from rbee_common.config import HiveEntry, HiveSettings, state_dir, toml_section
from rbee_common.errors import RemoteDiskFull, RemoteFailed, RemotePythonMissing, RemotePythonOld
from rbee_common.jobs import JobContext
from rbee_common.wheelhouse import check_platform, ensure
from rbee_common.wire import HiveUninstalled, InstallRecord
from rbee_queen.fleet import ssh
from rbee_queen.fleet.remote_wheels import install_wheels

if TYPE_CHECKING:
    from rbee_queen.fleet.remote import Remote

MIN_PYTHON = (3, 11)

_PROBE = """\
import json, os, shutil, sys, sysconfig
d = os.path.abspath(os.path.expanduser(sys.argv[1]))
p = d
while not os.path.isdir(p):
    p = os.path.dirname(p)
cuda = [x for x in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc") if x and os.path.isfile(x)]
print(json.dumps({"version": list(sys.version_info[:3]), "platform": sysconfig.get_platform(),
                  "dir": d, "existed": os.path.isdir(d), "free": shutil.disk_usage(p).free,
                  "nvcc": cuda[0] if cuda else None, "nvidia": os.path.exists("/dev/nvidiactl")}))
"""


def _say_llama_build(manifest: wheelhouse.Manifest, probed: dict[str, Any], hive_id: str,
                     say: Callable[..., None]) -> None:
    """Which llama-cpp-python the host gets, and whether its GPUs can use it."""
    built = {"rpc": "built for the CPU, with RPC", "cuda-rpc": "built with CUDA and RPC"}.get(
        manifest.llama_cpp, "as pip gave it (a wheelhouse from before rbee built its own)")
    say(f"llama-cpp-python from the wheelhouse: {built}", llama_cpp=manifest.llama_cpp)
    if probed.get("nvidia") and not manifest.llama_cpp.startswith("cuda"):
        toolkit = f" and the CUDA toolkit ({probed['nvcc']})" if probed.get("nvcc") else ""
        say(f"{hive_id} has an NVIDIA GPU{toolkit}, but this wheelhouse's llama-cpp-python cannot use it: "
            "its GPUs "
            f"will be listed as unusable. For them, build a CUDA wheelhouse on a machine like it "
            f"(rbee-keeper hive wheelhouse --cuda --dir DIR) and set wheelhouse = DIR in [hives.{hive_id}]",
            level="warn")


class Installs:
    """What this queen installed where: one folder per hive under its state directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "hives"

    def _dir(self, hive_id: str) -> Path:
        return self.root / hive_id

    def record(self, hive_id: str) -> InstallRecord | None:
        try:
            return msgspec.json.decode((self._dir(hive_id) / "install.json").read_bytes(), type=InstallRecord)
        except (OSError, msgspec.DecodeError):
            return None

    def token(self, hive_id: str) -> str | None:
        path = self._dir(hive_id) / "token"
        return cached_token_file(path) if path.exists() else None

    def save(self, record: InstallRecord, token: str) -> None:
        folder = self._dir(record.hive_id)
        write_token_file(folder / "token", token)
        staging = folder / "install.json.tmp"
        staging.write_bytes(msgspec.json.encode(record))
        staging.replace(folder / "install.json")  # last: until here, nothing is recorded as installed

    def forget(self, hive_id: str) -> None:
        for name in ("install.json", "token"):
            with contextlib.suppress(FileNotFoundError):
                (self._dir(hive_id) / name).unlink()


async def install(
    remote: Remote, hive_id: str, entry: HiveEntry, context: JobContext, *, force: bool = False
) -> InstallRecord:
    def say(text: str, **fields: Any) -> None:
        context.narrate("hive_install", text, hive_id=hive_id, **fields)

    target = remote.target(hive_id, entry)
    configured = entry.wheelhouse or remote.settings.wheelhouse
    wheels_dir, manifest = await ensure(wheelhouse.locate(configured), say)
    files = wheelhouse.files(wheels_dir, manifest)
    total = wheelhouse.total_bytes(wheels_dir, manifest)
    token = remote.token(hive_id) or new_token()  # a reinstall keeps the token a running hive knows
    say(f"Connecting to {target.where}")
    async with ssh.connect(target, say) as session:
        say("Connected; checking the remote Python")
        command = f"{ssh.program(entry.python)} -c {ssh.quote(_PROBE)} {ssh.quote(entry.install_dir)}"
        probe = await session.run(command, check=False, limit_s=30)
        probed = _probe(probe, hive_id, entry, target)
        version = ".".join(map(str, probed["version"]))
        say(f"Python {version} on {probed['platform']} at {entry.python}")
        check_platform(manifest, probed, target.where, hive_id)
        _say_llama_build(manifest, probed, hive_id, say)
        directory: str = probed["dir"]
        needed = total * 4  # the wheels, and the venv they unpack into
        if probed["free"] < needed:
            raise RemoteDiskFull(
                f"The disk is full on {target.where}: {directory} needs {needed / 1e6:.0f} MB and "
                f"{probed['free'] / 1e6:.0f} MB are free.",
                details={"hive_id": hive_id, "needed_bytes": needed, "free_bytes": probed["free"]},
                hint=f"Free space there, or set install_dir in [hives.{hive_id}] to a bigger disk.",
            )
        created = not probed["existed"]
        remote.installs.forget(hive_id)  # the host changes from here: until the end, it is not installed
        try:
            version = await install_wheels(
                session, hive_id, entry, target, directory, files, total, manifest, say, context, force=force
            )
            record = InstallRecord(
                hive_id=hive_id, host=entry.host, install_dir=directory, version=version,
                python=".".join(map(str, probed["version"])), platform=probed["platform"],
                installed_at=time.time(), created_dir=created,
            )  # fmt: skip
            await _configure(session, record, entry, token)
            say("Wrote the hive's token (0600) and config")
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                if created:
                    say(f"Install failed: removing {directory} from {hive_id}", level="warn")
                    with contextlib.suppress(RemoteFailed):
                        await session.run(f"rm -rf {ssh.quote(directory)}", check=False)
            raise
    remote.installs.save(record, token)
    say(f"Hive {hive_id} installed in {directory} on {target.where}")
    if hive_id in remote.attached:
        say(f"Hive {hive_id} is running: restart it (hive stop, hive start) to run what was installed")
    return record


def _probe(probe: ssh.Completed, hive_id: str, entry: HiveEntry, target: ssh.Target) -> dict[str, Any]:
    if probe.code == 127 or "not found" in probe.stderr:
        raise RemotePythonMissing(
            f"No Python at `{entry.python}` on {target.where}.",
            details={"hive_id": hive_id},
            hint=f"Install Python >= 3.11 there (apt install python3 python3-venv), or set python "
            f"in [hives.{hive_id}] to its path.",
        )
    try:
        probed: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
        found = tuple(probed["version"])
    except (ValueError, IndexError, KeyError, TypeError):
        found = ()
        probed = {}
    if probe.code != 0 or not found or found < MIN_PYTHON:
        have = ".".join(map(str, found)) if found else "an unusable one"
        raise RemotePythonOld(
            f"{target.where} has Python {have} at `{entry.python}`; rbee needs 3.11 or newer.",
            details={"hive_id": hive_id, "found": have},
            hint=f"Install Python >= 3.11 there, and set python in [hives.{hive_id}] to it.",
        )
    return probed


async def _configure(session: ssh.Session, record: InstallRecord, entry: HiveEntry, token: str) -> None:
    """The hive's token (0600) and config file, written from `HiveSettings`' schema."""
    directory = record.install_dir
    await session.write_file(f"{directory}/hive.token", token.encode() + b"\n", mode=0o600)
    settings = HiveSettings(host=ssh.real_host(entry.host), port=entry.hive_port, hive_id=record.hive_id,
                            data_dir=directory + "/data")
    await session.write_file(f"{directory}/hive.toml", toml_section("hive", settings).encode(), mode=0o600)


async def uninstall(
    remote: Remote, hive_id: str, entry: HiveEntry, context: JobContext, *, purge: bool
) -> HiveUninstalled:
    def say(text: str) -> None:
        context.narrate("hive_uninstall", text, hive_id=hive_id)

    record = remote.require_installed(hive_id)
    await remote.stop(hive_id, entry, context)
    target = remote.target(hive_id, entry)
    d = ssh.quote(record.install_dir)
    async with ssh.connect(target, say) as session:
        if record.created_dir and purge:
            await session.run(f"rm -rf {d}")
            say(f"Removed {record.install_dir} from {hive_id}")
        else:
            await session.run(f"rm -rf {d}/venv {d}/wheels {d}/hive.token {d}/hive.toml {d}/hive.log")
            say(
                f"Removed rbee from {record.install_dir} on {hive_id}; the models in "
                f"{record.install_dir}/data are kept (--purge removes them)"
            )
    remote.installs.forget(hive_id)
    return HiveUninstalled(hive_id=hive_id, uninstalled=True, purged=purge)

"""Putting rbee on a host: the wheelhouse uploaded over SFTP, a venv, an offline pip install.

The host needs no internet: every wheel comes from the queen's wheelhouse
(`rbee-keeper hive wheelhouse`). `install_wheels` ends by checking that the
installed `rbee-hive --version` is the queen's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rbee_common.config import HiveEntry
from rbee_common.daemon import package_version
from rbee_common.errors import HiveVersionMismatch, RemoteDiskFull, RemoteInstallFailed, RemoteVenvFailed
from rbee_common.jobs import JobContext
from rbee_common.wheelhouse import Manifest
from rbee_queen.fleet import ssh


async def install_wheels(
    session: ssh.Session,
    hive_id: str,
    entry: HiveEntry,
    target: ssh.Target,
    directory: str,
    files: list[Path],
    total: int,
    manifest: Manifest,
    say: Callable[..., None],
    context: JobContext,
    *,
    force: bool,
) -> str:
    """Upload the wheels into `directory`, make its venv and install rbee there; the version installed."""
    d = ssh.quote(directory)
    await session.run(f"mkdir -p {d}/wheels {d}/data && chmod 700 {d}")
    say(f"Uploading {len(files)} wheels ({total / 1e6:.0f} MB) to {directory}/wheels")
    sent = 0
    began = time.monotonic()

    def on_file(file: Path) -> None:
        nonlocal sent
        sent += file.stat().st_size
        elapsed = time.monotonic() - began
        context.progress("upload", sent, total, rate=sent / elapsed if elapsed > 0 else None)

    await session.put(files, f"{directory}/wheels", on_file, again=force)
    say(f"Uploaded {sent / 1e6:.0f} MB in {time.monotonic() - began:.1f} s")
    say("Creating the venv")
    await session.run(
        f"test -x {d}/venv/bin/python || {ssh.program(entry.python)} -m venv {d}/venv",
        limit_s=300,
        check=False,
    )
    venv = await session.run(f"test -x {d}/venv/bin/python", check=False)
    if venv.code != 0:
        raise RemoteVenvFailed(
            f"`{entry.python} -m venv` did not make a venv on {target.where}.",
            details={"hive_id": hive_id},
            hint="Install the venv module there (apt install python3-venv).",
        )
    version = manifest.rbee_version
    say(f"Installing rbee {version} offline from the wheelhouse")
    pip = f"{d}/venv/bin/python -m pip install -q --disable-pip-version-check --no-index"
    installs = [f"{pip} --find-links {d}/wheels {ssh.quote(f'rbee=={version}')}"]
    if force:  # the same version number, other code (a checkout): pip would keep what is there
        say(f"--force: reinstalling rbee {version} over what is there")
        installs.append(f"{pip} --no-deps --force-reinstall {d}/wheels/{ssh.quote(manifest.rbee_wheel)}")
    installs += [f"{pip} --no-deps {d}/wheels/{ssh.quote(name)}" for name in manifest.no_deps]
    for command in installs:
        done = await session.run(command, limit_s=900, check=False)
        if done.code != 0:
            if "No space left" in done.stderr:
                raise RemoteDiskFull(
                    f"The disk is full on {target.where} while installing into {directory}.",
                    details={"hive_id": hive_id},
                    hint=f"Free space there, or set install_dir in [hives.{hive_id}] to a bigger disk.",
                )
            raise RemoteInstallFailed(
                f"pip failed on {target.where}: {ssh.last_line(done.stderr)}",
                details={"hive_id": hive_id},
                hint="The wheelhouse may lack a wheel for it: rebuild it (rbee-keeper hive wheelhouse).",
            )
    check = await session.run(f"{d}/venv/bin/rbee-hive --version", check=False)
    reported = check.stdout.strip().rpartition(" ")[2]
    if check.code != 0 or reported != package_version():
        raise HiveVersionMismatch(
            f"rbee-hive on {target.where} reports {reported or 'nothing'}; this queen is "
            f"{package_version()}.",
            details={"hive_id": hive_id},
            hint="Reinstall: rbee-keeper hive install " + hive_id,
        )
    say(f"rbee-hive --version: {reported}, the same as this queen")
    return version

"""`rbee-keeper hive …`: configure hives, and install, start and stop them through the queen."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
import trio
import typer

from rbee_common import wheelhouse
from rbee_common.auth import bearer
from rbee_common.client import map_transport_errors
from rbee_common.config import HiveEntry
from rbee_common.errors import HiveNotFound, SshKeyNotFound, TransportError
from rbee_common.wire import (
    HiveInstall,
    HiveRefreshCapabilities,
    HiveStart,
    HiveStatus,
    HiveStop,
    HiveUninstall,
    Op,
    SshTest,
)
from rbee_keeper import hive_config, lifecycle
from rbee_keeper.common import (
    Context,
    build,
    handles_errors,
    keeper_context,
    print_fields,
    print_table,
    run_with_queen,
)
from rbee_keeper.output import say

hive_cli = typer.Typer(no_args_is_help=True, help="Configure hives and install, start and stop them.")


@hive_cli.command("add")
@handles_errors
def hive_add(
    ctx: typer.Context,
    alias: str,
    host: Annotated[str, typer.Option(help="Host name or address to reach it over SSH.")],
    user: Annotated[str | None, typer.Option(help="SSH user.")] = None,
    ssh_port: Annotated[int, typer.Option(min=1, max=65535, help="SSH port.")] = 22,
    identity_file: Annotated[str | None, typer.Option(help="SSH private key (checked here: it must exist).")] = None,  # noqa: E501
    hive_port: Annotated[int, typer.Option(min=1, max=65535, help="Port rbee-hive listens on.")] = 9000,
    install_dir: Annotated[str | None, typer.Option(help="Where to install rbee on it (default ~/.local/share/rbee/hive).")] = None,  # noqa: E501
    python: Annotated[str | None, typer.Option(help="Python >= 3.11 on it (default python3).")] = None,
    host_key_policy: Annotated[str | None, typer.Option(help="`strict` (default: the host key must be in known_hosts) or `accept-new` (record a first key).")] = None,  # noqa: E501
) -> None:
    """Add a hive to the config file."""
    c = keeper_context(ctx)
    if identity_file is not None:
        key = Path(identity_file).expanduser()
        if not key.is_file():
            raise SshKeyNotFound(f"SSH key not found: {key}.",
                                 hint="Give the path of an existing private key, or make one: ssh-keygen")
        identity_file = str(key.resolve())
    fields: dict[str, Any] = {
        "host": host, "ssh_user": user, "ssh_port": ssh_port, "identity_file": identity_file,
        "hive_port": hive_port, "install_dir": install_dir, "python": python,
        "host_key_policy": host_key_policy,
    }
    entry = build(HiveEntry, **fields)
    path = hive_config.add_hive(c.config_path, alias, entry)
    print(f"hive {alias} added to {path}")


@hive_cli.command("remove")
@handles_errors
def hive_remove(ctx: typer.Context, alias: str) -> None:
    """Remove a hive from the config file (it does not touch the machine)."""
    path = hive_config.remove_hive(keeper_context(ctx).config_path, alias)
    print(f"hive {alias} removed from {path}")


@hive_cli.command("list")
@handles_errors
def hive_list(ctx: typer.Context) -> None:
    """The configured hives (localhost is always one)."""
    configured = {"localhost": HiveEntry(host="127.0.0.1"), **keeper_context(ctx).config.hives}
    rows = [[alias, e.host, str(e.ssh_port), e.ssh_user or "", str(e.hive_port),
             "-" if alias == "localhost" else e.install_dir]
            for alias, e in configured.items()]
    print_table(rows, ["HIVE", "HOST", "SSH", "USER", "PORT", "INSTALL_DIR"])


@hive_cli.command("get")
@handles_errors
def hive_get(ctx: typer.Context, alias: str) -> None:
    """One configured hive."""
    configured = {"localhost": HiveEntry(host="127.0.0.1"), **keeper_context(ctx).config.hives}
    entry = configured.get(alias)
    if entry is None:
        raise HiveNotFound("No hive with that alias is configured.",
                           hint="See `rbee-keeper hive list`, or add it with `rbee-keeper hive add`.")
    print_fields(entry)


@hive_cli.command("import-ssh")
@handles_errors
def hive_import_ssh(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Argument(help="An SSH config file (default: ~/.ssh/config).")] = None,
) -> None:
    """Add every Host of an SSH config as a hive; aliases already configured win."""
    ssh_config = path or Path("~/.ssh/config").expanduser()
    added, skipped = hive_config.import_ssh(keeper_context(ctx).config_path, ssh_config)
    print(f"added {len(added)} hive(s): {', '.join(added) or '-'}")
    if skipped:
        print(f"kept {len(skipped)} already configured: {', '.join(skipped)}")


def _hive_operation(
    ctx: typer.Context, kind: type[Op[msgspec.Struct]], alias: str, *, keep_queen: bool = False, **fields: Any
) -> None:
    """Run a hive operation through the queen and print its result as one JSON line."""
    c = keeper_context(ctx)
    result = run_with_queen(c, build(kind, hive_id=alias, **fields), keep_queen=keep_queen)
    print(msgspec.json.encode(result).decode())


@hive_cli.command("install")
@handles_errors
def hive_install(
    ctx: typer.Context, alias: str,
    force: Annotated[bool, typer.Option("--force", help="Upload every wheel again and reinstall rbee, even at the same version.")] = False,  # noqa: E501
) -> None:
    """Install rbee on the hive's machine over SSH (through the queen)."""
    c = keeper_context(ctx)
    local = alias == "localhost" and lifecycle.is_healthy(c.queen_url) and not _has_local_hive(c)
    if local and not _confirm_localhost(c):
        raise typer.Exit(1)
    _hive_operation(ctx, HiveInstall, alias, force=force)


@hive_cli.command("uninstall")
@handles_errors
def hive_uninstall(
    ctx: typer.Context, alias: str,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete its models and the whole install dir.")] = False,  # noqa: E501
) -> None:
    """Stop the hive and remove rbee from its machine (through the queen); models stay unless --purge."""
    _hive_operation(ctx, HiveUninstall, alias, purge=purge)


@hive_cli.command("start")
@handles_errors
def hive_start(
    ctx: typer.Context, alias: str,
    detached: Annotated[bool, typer.Option("--detached", help="Let the hive outlive the queen (for hosts where a service manager owns it).")] = False,  # noqa: E501
) -> None:
    """Start the hive over SSH; the queen keeps the session as its lifeline (a queen started here stays)."""
    _hive_operation(ctx, HiveStart, alias, keep_queen=True, detached=detached)


@hive_cli.command("wheelhouse")
@handles_errors
def hive_wheelhouse(
    directory: Annotated[Path | None, typer.Option("--dir", help="Where to build it (default: the queen's cache, ~/.cache/rbee/wheelhouse).")] = None,  # noqa: E501
    cuda: Annotated[bool, typer.Option("--cuda", help="llama-cpp-python built with CUDA (and RPC), for GPU hosts: build it on a machine with nvcc, like them, and set wheelhouse = DIR in their [hives.<alias>].")] = False,  # noqa: E501
) -> None:
    """Build the wheels `hive install` uploads (rbee and all it needs), for hosts without internet."""
    target = (directory or wheelhouse.default_dir()).expanduser().resolve()
    manifest = trio.run(functools.partial(wheelhouse.build, target, say, cuda=cuda))
    print(f"{target}: {len(manifest.wheels) + len(manifest.no_deps)} wheels for CPython {manifest.python} "
          f"on {manifest.platform}")


@hive_cli.command("ssh-test")
@handles_errors
def hive_ssh_test(ctx: typer.Context, alias: str) -> None:
    """Check SSH to the hive's machine: login, a command, the round trip, rbee-hive there."""
    _hive_operation(ctx, SshTest, alias)


@hive_cli.command("stop")
@handles_errors
def hive_stop(ctx: typer.Context, alias: str) -> None:
    """Stop the hive and its workers."""
    _hive_operation(ctx, HiveStop, alias)


@hive_cli.command("status")
@handles_errors
def hive_status(ctx: typer.Context, alias: str) -> None:
    """Whether the hive answers, through the queen."""
    _hive_operation(ctx, HiveStatus, alias)


@hive_cli.command("refresh")
@handles_errors
def hive_refresh(ctx: typer.Context, alias: str) -> None:
    """Ask the hive for its devices again."""
    _hive_operation(ctx, HiveRefreshCapabilities, alias)


def _has_local_hive(c: Context) -> bool:
    try:
        with map_transport_errors(c.queen_url):
            response = httpx.get(f"{c.queen_url}/v1/build-info", timeout=2,
                                 headers=bearer(lifecycle.client_token()))
        return "local-hive" in response.json().get("features", [])
    except (TransportError, ValueError, AttributeError):
        return False


LOCAL_HIVE_PROMPT = """\
This queen runs without --local-hive, so a hive on localhost would be a second
process that the queen reaches over HTTP. With --local-hive the queen runs the
hive in-process instead: measured with bench/hive_ops.py, a hive operation
takes about 9 ms in-process against 20 ms over HTTP (median, model_list, a
2-core machine), and there is one process less to install and keep running.
To use it: rbee-keeper queen restart --local-hive"""


def _confirm_localhost(c: Context) -> bool:
    say(LOCAL_HIVE_PROMPT)
    if not sys.stdin.isatty():
        say("stdin is not a terminal, so the answer is no: nothing was installed.")
        return False
    answer = input("Install a separate hive on localhost anyway? [y/N] ").strip().lower()
    return answer in ("y", "yes")

"""`rbee-keeper queen …`: start, stop and inspect queen-rbee."""

from __future__ import annotations

import datetime
from typing import Annotated

import httpx
import msgspec
import trio
import typer

from rbee_common.client import JobClient
from rbee_common.wire import BuildInfo
from rbee_keeper import lifecycle
from rbee_keeper.common import handles_errors, keeper_context
from rbee_keeper.output import say

queen_cli = typer.Typer(no_args_is_help=True, help="Start, stop and inspect queen-rbee.")


LocalHive = Annotated[bool, typer.Option("--local-hive/--no-local-hive", help="Run this machine's hive inside the queen.")]  # noqa: E501


@queen_cli.command("start")
@handles_errors
def queen_start(ctx: typer.Context, local_hive: LocalHive = True) -> None:
    """Start queen-rbee as a background daemon (log and pid under the XDG state dir)."""
    c = keeper_context(ctx)
    if lifecycle.is_healthy(c.queen_url):
        say(f"queen-rbee is already running at {c.queen_url}")
        return
    say("queen is asleep, waking queen")
    pid = lifecycle.start_queen(
        c.queen_url, config=c.config_path, timeout=c.config.keeper.queen_start_timeout_s,
        local_hive=local_hive,
    ).pid
    say("queen is awake and healthy")
    print(f"queen-rbee running at {c.queen_url} (pid {pid}, log {lifecycle.log_file(c.queen_url)})")


@queen_cli.command("stop")
@handles_errors
def queen_stop(ctx: typer.Context) -> None:
    """Stop queen-rbee (HTTP shutdown, SIGTERM if that fails)."""
    c = keeper_context(ctx)
    if lifecycle.stop_queen(c.queen_url, say=say):
        print(f"queen-rbee at {c.queen_url} stopped")
    else:
        print(f"queen-rbee is not running at {c.queen_url}")


@queen_cli.command("restart")
@handles_errors
def queen_restart(ctx: typer.Context, local_hive: LocalHive = True) -> None:
    """Stop the queen (if it runs) and start it again."""
    queen_stop(ctx)
    queen_start(ctx, local_hive=local_hive)


@queen_cli.command("status")
@handles_errors
def queen_status(ctx: typer.Context) -> None:
    """Say whether queen-rbee answers; exit 1 when it does not."""
    c = keeper_context(ctx)
    if lifecycle.is_healthy(c.queen_url):
        print(f"queen-rbee is running and healthy at {c.queen_url}")
        return
    print(f"queen-rbee is not running at {c.queen_url}")
    raise typer.Exit(1)


@queen_cli.command("info")
@handles_errors
def queen_info(ctx: typer.Context) -> None:
    """Show the running queen's version, features and build time."""
    c = keeper_context(ctx)

    async def fetch() -> BuildInfo:
        async with httpx.AsyncClient() as http:
            response = await JobClient(c.queen_url, http=http, token=lifecycle.client_token()).request(
                "GET", "/v1/build-info")
        return msgspec.json.decode(response.content, type=BuildInfo)

    info = trio.run(fetch)
    features = ", ".join(info.features) or "none"
    print(f"program   {info.program}\nversion   {info.version}\nfeatures  {features}")
    print(f"python    {info.python}\nbuilt     {_when(info.build_timestamp)}")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat(timespec="seconds")

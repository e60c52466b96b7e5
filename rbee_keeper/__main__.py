"""`rbee-keeper`: the operator's commands."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import httpx
import msgspec
import trio
import typer

from rbee_common.client import JobClient
from rbee_common.config import RbeeConfig, load_config
from rbee_common.errors import RbeeError
from rbee_common.wire import BuildInfo, JobCreated, Operation, Status
from rbee_keeper import lifecycle
from rbee_keeper.output import say, show_error, show_event, show_status

cli = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="rbee-keeper: run and use an rbee inference fleet from one place.",
)
queen_cli = typer.Typer(no_args_is_help=True, help="Start, stop and inspect queen-rbee.")
cli.add_typer(queen_cli, name="queen")

F = TypeVar("F", bound=Callable[..., Any])


class Context(msgspec.Struct, kw_only=True):
    config: RbeeConfig
    config_path: str | None
    queen_url: str
    verbose: bool


def _ctx(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    if not isinstance(obj, Context):
        raise typer.Exit(2)
    return obj


def handles_errors(function: F) -> F:
    """One line and a hint on stderr, exit 1: never a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except RbeeError as error:
            show_error(error)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@cli.callback()
def main(
    ctx: typer.Context,
    queen_url: Annotated[str | None, typer.Option(envvar="RBEE_QUEEN_URL", help="The queen to talk to (default: keeper.queen_url in the config, else http://127.0.0.1:8500).")] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option("--config", help="Config file (default: $RBEE_CONFIG, ~/.config/rbee/config.toml, /etc/rbee/config.toml).")] = None,  # noqa: E501
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show job ids and stream URLs.")] = False,  # noqa: E501
) -> None:
    try:
        loaded = load_config(config)
    except RbeeError as error:
        show_error(error)
        raise typer.Exit(1) from None
    ctx.obj = Context(
        config=loaded,
        config_path=config,
        queen_url=(queen_url or loaded.keeper.queen_url).rstrip("/"),
        verbose=verbose,
    )


async def _run_job(url: str, operation: Operation, *, verbose: bool) -> Any:
    def created(job: JobCreated) -> None:
        if verbose:
            say(f"Job created: {job.job_id}")
            say(f"SSE URL: {job.sse_url}")

    result = None
    async with httpx.AsyncClient() as http:
        events = JobClient(url, http=http).run(operation, on_created=created)
        async with contextlib.aclosing(events):
            async for event in events:
                value = show_event(event)
                if value is not None:
                    result = value
    return result


def run_job(ctx: Context, operation: Operation) -> Any:
    return trio.run(functools.partial(_run_job, ctx.queen_url, operation, verbose=ctx.verbose))


@cli.command()
@handles_errors
def status(
    ctx: typer.Context,
    keep_queen: Annotated[bool, typer.Option("--keep-queen", help="If this command starts a queen, leave it running.")] = False,  # noqa: E501
) -> None:
    """Show the queen, its hives and their workers (starts a queen if none runs)."""
    c = _ctx(ctx)
    with lifecycle.ephemeral_queen(
        c.queen_url, say=say, config=c.config_path, keep=keep_queen,
        timeout=c.config.keeper.queen_start_timeout_s,
    ):
        result = run_job(c, Status())
    show_status(c.queen_url, result)


@queen_cli.command("start")
@handles_errors
def queen_start(ctx: typer.Context) -> None:
    """Start queen-rbee as a background daemon (log and pid under the XDG state dir)."""
    c = _ctx(ctx)
    if lifecycle.is_healthy(c.queen_url):
        say(f"queen-rbee is already running at {c.queen_url}")
        return
    say("queen is asleep, waking queen")
    pid = lifecycle.start_queen(
        c.queen_url, config=c.config_path, timeout=c.config.keeper.queen_start_timeout_s
    ).pid
    say("queen is awake and healthy")
    print(f"queen-rbee running at {c.queen_url} (pid {pid}, log {lifecycle.log_file(c.queen_url)})")


@queen_cli.command("stop")
@handles_errors
def queen_stop(ctx: typer.Context) -> None:
    """Stop queen-rbee (HTTP shutdown, SIGTERM if that fails)."""
    c = _ctx(ctx)
    if lifecycle.stop_queen(c.queen_url, say=say):
        print(f"queen-rbee at {c.queen_url} stopped")
    else:
        print(f"queen-rbee is not running at {c.queen_url}")


@queen_cli.command("status")
@handles_errors
def queen_status(ctx: typer.Context) -> None:
    """Say whether queen-rbee answers; exit 1 when it does not."""
    c = _ctx(ctx)
    if lifecycle.is_healthy(c.queen_url):
        print(f"queen-rbee is running and healthy at {c.queen_url}")
        return
    print(f"queen-rbee is not running at {c.queen_url}")
    raise typer.Exit(1)


@queen_cli.command("info")
@handles_errors
def queen_info(ctx: typer.Context) -> None:
    """Show the running queen's version, features and build time."""
    c = _ctx(ctx)

    async def fetch() -> BuildInfo:
        async with httpx.AsyncClient() as http:
            response = await JobClient(c.queen_url, http=http).request("GET", "/v1/build-info")
        return msgspec.json.decode(response.content, type=BuildInfo)

    info = trio.run(fetch)
    features = ", ".join(info.features) or "none"
    print(f"program   {info.program}\nversion   {info.version}\nfeatures  {features}")
    print(f"python    {info.python}\nbuilt     {_when(info.build_timestamp)}")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat(timespec="seconds")


def run() -> None:
    cli()


if __name__ == "__main__":
    run()

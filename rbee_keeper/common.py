"""What every keeper command shares: the context, error handling, running a job on the queen."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import httpx
import msgspec
import trio
import typer

from rbee_common.client import JobClient
from rbee_common.config import RbeeConfig
from rbee_common.errors import AuthFailed, RbeeError, ValidationFailed
from rbee_common.validation import describe_validation_error
from rbee_common.wire import JobCreated, JobEvent, Op, T
from rbee_keeper import lifecycle
from rbee_keeper.output import say, show_error, show_event

F = TypeVar("F", bound=Callable[..., Any])
K = TypeVar("K")


class Context(msgspec.Struct, kw_only=True):
    config: RbeeConfig
    config_path: str | None
    queen_url: str
    usual_queen_url: str
    """Where the queen is without --queen-url or RBEE_QUEEN_URL (the config's, else the default)."""
    verbose: bool


def keeper_context(ctx: typer.Context) -> Context:
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
        except AuthFailed as error:  # the server's hint speaks HTTP; the keeper's user sets a variable
            show_error(AuthFailed(error.message, hint=(
                "Give the keeper the queen's token: export RBEE_API_TOKEN=\"$(cat "
                "~/.config/rbee/queen.token)\" (the file the queen's --api-token-file names).")))
            raise typer.Exit(1) from None
        except RbeeError as error:
            show_error(error)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


async def _call(url: str, operation: Op[T], *, verbose: bool, tokens: bool) -> T:
    def created(job: JobCreated) -> None:
        if verbose:
            say(f"Job created: {job.job_id}")
            say(f"SSE URL: {job.sse_url}")

    def shown(event: JobEvent) -> None:
        show_event(event, tokens=tokens)

    async with httpx.AsyncClient() as http:
        client = JobClient(url, http=http, token=lifecycle.client_token())
        return await client.call(operation, on_event=shown, on_created=created)


def run_job(c: Context, operation: Op[T], *, tokens: bool = True) -> T:
    """Run a job on the queen, its narration on stderr; its result, typed as the operation declares."""
    return trio.run(functools.partial(_call, c.queen_url, operation, verbose=c.verbose, tokens=tokens))


def run_with_queen(c: Context, operation: Op[T], *, keep_queen: bool = False, tokens: bool = True) -> T:
    """Run a job on the queen; if none answers, on one started (--local-hive) for this command."""
    with lifecycle.ephemeral_queen(
        c.queen_url, say=say, config=c.config_path, keep=keep_queen,
        timeout=c.config.keeper.queen_start_timeout_s, verbose=c.verbose, usual=c.usual_queen_url,
    ):
        return run_job(c, operation, tokens=tokens)


KeepQueen = Annotated[bool, typer.Option("--keep-queen", help="If this command starts a queen, leave it running.")]  # noqa: E501
HiveOption = Annotated[str, typer.Option("--hive", help="The hive (an alias from the config; localhost is always there).")]  # noqa: E501


def print_fields(record: msgspec.Struct) -> None:
    fields = msgspec.structs.asdict(record)
    width = max(map(len, fields), default=0) + 1
    for key, value in fields.items():
        print(f"{key:<{width}} {value}")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def build(kind: type[K], **fields: Any) -> K:
    """Build an operation (or a config entry) from the options given (None: not given), with the
    wire's validation: a bad value is a one-line error."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, kind)
    except msgspec.ValidationError as error:
        message, path = describe_validation_error(error)
        raise ValidationFailed(f"{message} at `{path}`." if path else f"{message}.",
                               hint="See --help for the accepted values.") from None

"""`rbee-keeper`: the operator's commands."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import msgspec
import trio
import typer

from rbee_common import wheelhouse
from rbee_common.auth import bearer
from rbee_common.client import JobClient
from rbee_common.config import HiveEntry, RbeeConfig, load_config
from rbee_common.errors import NotFound, RbeeError, ValidationFailed
from rbee_common.validation import describe_validation_error
from rbee_common.wire import (
    BuildInfo,
    ChatMessage,
    Embed,
    HiveInstall,
    HiveRefreshCapabilities,
    HiveStart,
    HiveStatus,
    HiveStop,
    HiveUninstall,
    Infer,
    JobCreated,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    Operation,
    SshTest,
    Status,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
    WorkerStop,
)
from rbee_keeper import hives, lifecycle
from rbee_keeper.audit import audit_cli
from rbee_keeper.output import say, show_error, show_event, show_status

cli = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="rbee-keeper: run and use an rbee inference fleet from one place.",
)
queen_cli = typer.Typer(no_args_is_help=True, help="Start, stop and inspect queen-rbee.")
cli.add_typer(queen_cli, name="queen")
worker_cli = typer.Typer(no_args_is_help=True, help="Start, list and stop workers on the hives.")
cli.add_typer(worker_cli, name="worker")
model_cli = typer.Typer(no_args_is_help=True, help="Download, list and delete models on the hives.")
cli.add_typer(model_cli, name="model")
hive_cli = typer.Typer(no_args_is_help=True, help="Configure hives and install, start and stop them.")
cli.add_typer(hive_cli, name="hive")
cli.add_typer(audit_cli, name="audit")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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


async def _run_job(url: str, operation: Operation, *, verbose: bool, tokens: bool = True) -> Any:
    def created(job: JobCreated) -> None:
        if verbose:
            say(f"Job created: {job.job_id}")
            say(f"SSE URL: {job.sse_url}")

    result = None
    async with httpx.AsyncClient() as http:
        events = JobClient(url, http=http, token=lifecycle.client_token()).run(operation, on_created=created)
        async with contextlib.aclosing(events):
            async for event in events:
                value = show_event(event, tokens=tokens)
                if value is not None:
                    result = value
    return result


def run_job(ctx: Context, operation: Operation, *, tokens: bool = True) -> Any:
    return trio.run(functools.partial(_run_job, ctx.queen_url, operation, verbose=ctx.verbose, tokens=tokens))


def run_with_queen(c: Context, operation: Operation, *, keep_queen: bool = False, tokens: bool = True) -> Any:
    """Run a job on the queen; if none answers, on one started (--local-hive) for this command."""
    with lifecycle.ephemeral_queen(
        c.queen_url, say=say, config=c.config_path, keep=keep_queen,
        timeout=c.config.keeper.queen_start_timeout_s, verbose=c.verbose,
    ):
        return run_job(c, operation, tokens=tokens)


KeepQueen = Annotated[bool, typer.Option("--keep-queen", help="If this command starts a queen, leave it running.")]  # noqa: E501
Hive = Annotated[str, typer.Option("--hive", help="The hive (an alias from the config; localhost is always there).")]  # noqa: E501


def _fields(record: dict[str, Any]) -> None:
    width = max(map(len, record), default=0) + 1
    for key, value in record.items():
        print(f"{key:<{width}} {value}")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@cli.command()
@handles_errors
def infer(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A model a hive has (see `rbee-keeper model list`).")] = "smollm2-135m",  # noqa: E501
    max_tokens: Annotated[int, typer.Option(min=1, help="At most this many tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature.")] = 0.7,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    hive: Annotated[str | None, typer.Option("--hive", help="Run it on this hive only (its workers, or a cold start there).")] = None,  # noqa: E501
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer at the end, not as it comes.")] = False,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Ask a model; the answer goes to stdout, everything else to stderr."""
    c = _ctx(ctx)
    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
    try:
        operation = Infer(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                          hive_id=hive)
    except msgspec.ValidationError:
        raise ValidationFailed(
            "That model name is not valid.", hint="See `rbee-keeper model list`."
        ) from None
    try:
        result = run_with_queen(c, operation, keep_queen=keep_queen, tokens=not no_stream)
    except RbeeError as error:
        if error.code == "MODEL_NOT_FOUND":
            raise NotFound(
                f"Model {model} is not on any hive.",
                hint=f"List models with `rbee-keeper model list`, or get it with `rbee-keeper model download {model}`.",  # noqa: E501
            ) from None
        raise
    text = result.get("text", "") if isinstance(result, dict) else ""
    if no_stream:
        print(text)
    elif not text.endswith("\n"):
        print()


@cli.command()
@handles_errors
def embed(
    ctx: typer.Context,
    texts: Annotated[list[str], typer.Argument(help="One or more texts; each gets a vector.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A model a hive has (see `rbee-keeper model list`).")] = "smollm2-135m",  # noqa: E501
    dimensions: Annotated[int | None, typer.Option(min=1, help="Keep this many leading dimensions (normalized again).")] = None,  # noqa: E501
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the model, the vectors and the token count.")] = False,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Embed texts: one unit vector per text, a line of numbers each (or JSON with --json)."""
    operation = _operation(Embed, model=model, input=texts, dimensions=dimensions)
    result = run_with_queen(_ctx(ctx), operation, keep_queen=keep_queen)
    value = result if isinstance(result, dict) else {}
    vectors = value.get("data", [])
    if as_json:
        print(json.dumps({"model": model, "data": vectors, "tokens": value.get("tokens")}))
        return
    for vector in vectors:
        print(" ".join(f"{value:.6f}" for value in vector))


@worker_cli.command("spawn")
@handles_errors
def worker_spawn(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the hive's catalog, or file:///abs/path.gguf.")],
    device: Annotated[str, typer.Option(help="CPU-0, GPU-<n> or METAL-0.")] = "CPU-0",
    hive: Hive = "localhost",
    backend: Annotated[str, typer.Option(help="auto, llama-cpp or mlx.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: the hive's free cores).")] = None,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Start a worker for a model on a hive, with its progress."""
    c = _ctx(ctx)
    operation = _operation(
        WorkerSpawn, model=model, device=device, hive_id=hive, backend=backend, threads=threads
    )
    if not keep_queen and not lifecycle.is_healthy(c.queen_url):
        say("No queen runs: one starts for this command, and the worker stops with it at the end.")
        say("To keep the worker: `rbee-keeper queen start` first, or pass --keep-queen.")
    worker = run_with_queen(c, operation, keep_queen=keep_queen)
    print(f"{worker['worker_id']}  {worker['model']}  {worker['device']}  {worker['url']}  "
          f"(pid {worker['pid']})")


@worker_cli.command("list")
@handles_errors
def worker_list(ctx: typer.Context, hive: Hive = "localhost") -> None:
    """The workers of a hive."""
    workers = run_with_queen(_ctx(ctx), _operation(WorkerList, hive_id=hive))
    rows = [
        [w["worker_id"], w["model"], w["device"], w["state"], str(w["slots_busy"]), w["url"], str(w["pid"])]
        for w in workers
    ]
    _table(rows, ["WORKER", "MODEL", "DEVICE", "STATE", "BUSY", "URL", "PID"])


@worker_cli.command("get")
@handles_errors
def worker_get(ctx: typer.Context, worker_id: str, hive: Hive = "localhost") -> None:
    """One worker of a hive."""
    _fields(run_with_queen(_ctx(ctx), _operation(WorkerGet, worker_id=worker_id, hive_id=hive)))


@worker_cli.command("stop")
@handles_errors
def worker_stop(ctx: typer.Context, worker_id: str, hive: Hive = "localhost") -> None:
    """Stop a worker (graceful, then SIGKILL after the hive's deadline)."""
    worker = run_with_queen(_ctx(ctx), _operation(WorkerStop, worker_id=worker_id, hive_id=hive))
    print(f"{worker['worker_id']} stopped")


@model_cli.command("download")
@handles_errors
def model_download(ctx: typer.Context, model: str, hive: Hive = "localhost") -> None:
    """Download hf:<org>/<repo>[:<file or quant>] into a hive's catalog, with progress."""
    entry = run_with_queen(_ctx(ctx), _operation(ModelDownload, model=model, hive_id=hive))
    print(f"{entry['id']}  {entry['size_bytes'] / 1e6:.0f} MB  {entry['path']}")


@model_cli.command("list")
@handles_errors
def model_list(ctx: typer.Context, hive: Hive = "localhost") -> None:
    """The models in a hive's catalog."""
    models = run_with_queen(_ctx(ctx), _operation(ModelList, hive_id=hive))
    _table([[m["id"], m["format"], f"{m['size_bytes'] / 1e6:.0f} MB", m["provider"], m.get("source") or ""]
            for m in models], ["MODEL", "FORMAT", "SIZE", "FROM", "SOURCE"])


@model_cli.command("get")
@handles_errors
def model_get(ctx: typer.Context, model: str, hive: Hive = "localhost") -> None:
    """One model of a hive's catalog."""
    _fields(run_with_queen(_ctx(ctx), _operation(ModelGet, model=model, hive_id=hive)))


@model_cli.command("delete")
@handles_errors
def model_delete(ctx: typer.Context, model: str, hive: Hive = "localhost") -> None:
    """Delete a model from a hive (refused while a worker uses it)."""
    entry = run_with_queen(_ctx(ctx), _operation(ModelDelete, model=model, hive_id=hive))
    print(f"{entry['id']} deleted")


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
    c = _ctx(ctx)
    if identity_file is not None:
        key = Path(identity_file).expanduser()
        if not key.is_file():
            raise NotFound(f"SSH key not found: {key}.", code="SSH_KEY_NOT_FOUND",
                           hint="Give the path of an existing private key, or make one: ssh-keygen")
        identity_file = str(key.resolve())
    fields: dict[str, Any] = {
        "host": host, "ssh_user": user, "ssh_port": ssh_port, "identity_file": identity_file,
        "hive_port": hive_port, "install_dir": install_dir, "python": python,
        "host_key_policy": host_key_policy,
    }
    entry = _convert(HiveEntry, fields)
    path = hives.add_hive(c.config_path, alias, entry)
    print(f"hive {alias} added to {path}")


@hive_cli.command("remove")
@handles_errors
def hive_remove(ctx: typer.Context, alias: str) -> None:
    """Remove a hive from the config file (it does not touch the machine)."""
    path = hives.remove_hive(_ctx(ctx).config_path, alias)
    print(f"hive {alias} removed from {path}")


@hive_cli.command("list")
@handles_errors
def hive_list(ctx: typer.Context) -> None:
    """The configured hives (localhost is always one)."""
    configured = {"localhost": HiveEntry(host="127.0.0.1"), **_ctx(ctx).config.hives}
    rows = [[alias, e.host, str(e.ssh_port), e.ssh_user or "", str(e.hive_port),
             "-" if alias == "localhost" else e.install_dir]
            for alias, e in configured.items()]
    _table(rows, ["HIVE", "HOST", "SSH", "USER", "PORT", "INSTALL_DIR"])


@hive_cli.command("get")
@handles_errors
def hive_get(ctx: typer.Context, alias: str) -> None:
    """One configured hive."""
    configured = {"localhost": HiveEntry(host="127.0.0.1"), **_ctx(ctx).config.hives}
    entry = configured.get(alias)
    if entry is None:
        raise NotFound("No hive with that alias is configured.", code="HIVE_NOT_FOUND",
                       hint="See `rbee-keeper hive list`, or add it with `rbee-keeper hive add`.")
    _fields(msgspec.structs.asdict(entry))


@hive_cli.command("import-ssh")
@handles_errors
def hive_import_ssh(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Argument(help="An SSH config file (default: ~/.ssh/config).")] = None,
) -> None:
    """Add every Host of an SSH config as a hive; aliases already configured win."""
    added, skipped = hives.import_ssh(_ctx(ctx).config_path, path or Path("~/.ssh/config").expanduser())
    print(f"added {len(added)} hive(s): {', '.join(added) or '-'}")
    if skipped:
        print(f"kept {len(skipped)} already configured: {', '.join(skipped)}")


def _hive_operation(
    ctx: typer.Context, kind: type[Operation], alias: str, *, keep_queen: bool = False, **fields: Any
) -> None:
    c = _ctx(ctx)
    result = run_with_queen(c, _operation(kind, hive_id=alias, **fields), keep_queen=keep_queen)
    if result is not None:
        print(msgspec.json.encode(result).decode())


@hive_cli.command("install")
@handles_errors
def hive_install(
    ctx: typer.Context, alias: str,
    force: Annotated[bool, typer.Option("--force", help="Upload every wheel again and reinstall rbee, even at the same version.")] = False,  # noqa: E501
) -> None:
    """Install rbee on the hive's machine over SSH (through the queen)."""
    c = _ctx(ctx)
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
) -> None:
    """Build the wheels `hive install` uploads (rbee and all it needs), for hosts without internet."""
    target = (directory or wheelhouse.default_dir()).expanduser().resolve()
    manifest = trio.run(wheelhouse.build, target, say)
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
        headers = bearer(lifecycle.client_token())
        response = httpx.get(f"{c.queen_url}/v1/build-info", timeout=2, headers=headers)
        return "local-hive" in response.json().get("features", [])
    except (httpx.HTTPError, ValueError):
        return False


LOCAL_HIVE_PROMPT = """\
This queen runs without --local-hive, so a hive on localhost would be a second
process that the queen reaches over HTTP. With --local-hive the queen runs the
hive in-process instead: measured with bench/hive_ops.py, a hive operation
takes about 2.1 ms in-process against 5.4 ms over HTTP (median, model_list,
one machine), and there is one process less to install and keep running.
To use it: rbee-keeper queen restart --local-hive"""


def _confirm_localhost(c: Context) -> bool:
    say(LOCAL_HIVE_PROMPT)
    if not sys.stdin.isatty():
        say("stdin is not a terminal, so the answer is no: nothing was installed.")
        return False
    answer = input("Install a separate hive on localhost anyway? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _operation(kind: type[Operation], **fields: Any) -> Operation:
    """Build an operation with the wire's validation, as a one-line error."""
    return _convert(kind, fields)


def _convert(kind: type[T], fields: dict[str, Any]) -> T:
    """Build `kind` from the options given (None: not given), a bad value as a one-line error."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, kind)
    except msgspec.ValidationError as error:
        message, path = describe_validation_error(error)
        raise ValidationFailed(f"{message} at `{path}`." if path else f"{message}.",
                               hint="See --help for the accepted values.") from None


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
        timeout=c.config.keeper.queen_start_timeout_s, verbose=c.verbose,
    ):
        result = run_job(c, Status())
    show_status(c.queen_url, result)


LocalHive = Annotated[bool, typer.Option("--local-hive/--no-local-hive", help="Run this machine's hive inside the queen.")]  # noqa: E501


@queen_cli.command("start")
@handles_errors
def queen_start(ctx: typer.Context, local_hive: LocalHive = True) -> None:
    """Start queen-rbee as a background daemon (log and pid under the XDG state dir)."""
    c = _ctx(ctx)
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
    c = _ctx(ctx)
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
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat(timespec="seconds")


def run() -> None:
    cli()


if __name__ == "__main__":
    run()

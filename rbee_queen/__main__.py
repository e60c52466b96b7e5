"""`queen-rbee`: parse arguments, load the config, run the daemon."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated

import typer

from rbee_common.auth import TokenSource
from rbee_common.daemon import configure_logging, exit_on_config_error, package_version, run_daemon
from rbee_common.errors import ConfigError
from rbee_queen.config import QueenConfig
from rbee_queen.serve import serve

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"queen-rbee {package_version()}")
        raise typer.Exit()


@cli.command()
def main(
    host: Annotated[str | None, typer.Option(help="Address to bind (default from config: 127.0.0.1).")] = None,  # noqa: E501
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port to bind; 0 picks a free one (default 8500).")] = None,  # noqa: E501
    local_hive: Annotated[bool, typer.Option("--local-hive", help="Run the localhost hive inside the queen: direct calls, its workers are the queen's children.")] = False,  # noqa: E501
    api_token_file: Annotated[str | None, typer.Option(help="Bearer token file (one line, mode 0600); else $RBEE_API_TOKEN. Needed to bind beyond loopback.")] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option("--config", help="Config file (default: $RBEE_CONFIG, ~/.config/rbee/config.toml, /etc/rbee/config.toml).")] = None,  # noqa: E501
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    """queen-rbee: the brain of an rbee fleet (job API, hive registry, scheduling; OpenAI,
    Anthropic and Ollama APIs).

    SIGHUP reads the API token file and the config file again: changed hives and limits apply without a restart (host, port and --local-hive wait for one); a broken file changes nothing.
    """  # noqa: E501 (one line: typer's help keeps a later paragraph's line breaks)
    configure_logging("queen")
    try:
        queen_config = QueenConfig.load(
            config, host=host, port=port, local_hive=local_hive, api_token_file=api_token_file)
    except ConfigError as error:
        exit_on_config_error(error, "queen-rbee")
    tokens = TokenSource.fixed(queen_config.api_token, queen_config.api_token_file)
    reloads: list[Callable[[], None]] = []

    def hangup() -> None:
        tokens.reload()
        for reload in reloads:
            reload()

    code = run_daemon(functools.partial(serve, queen_config, tokens=tokens, reloads=reloads),
                      component="queen-rbee", on_hangup=hangup)
    raise typer.Exit(code)


def run() -> None:
    cli()


if __name__ == "__main__":
    run()

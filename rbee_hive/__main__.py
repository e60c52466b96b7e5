"""`rbee-hive`: parse arguments, load the config, run the daemon."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

import typer

from rbee_common.auth import TokenSource, require_token_for_bind
from rbee_common.daemon import configure_logging, exit_on_config_error, package_version, run_daemon
from rbee_common.errors import ConfigError
from rbee_hive.config import load_hive_settings
from rbee_hive.serve import serve

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class Lifeline(StrEnum):
    stdin = "stdin"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rbee-hive {package_version()}")
        raise typer.Exit()


@cli.command()
def main(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port to bind; 0 picks a free one (default 9000).")] = None,  # noqa: E501
    hive_id: Annotated[str | None, typer.Option(help="This hive's id (default localhost).")] = None,
    queen_url: Annotated[str | None, typer.Option(help="The queen its workers heartbeat to.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Where models live (default: XDG data dir).")] = None,
    lifeline: Annotated[Lifeline | None, typer.Option(help="`stdin`: stop when stdin closes (started over SSH).")] = None,  # noqa: E501
    api_token_file: Annotated[str | None, typer.Option(help="Bearer token file (one line, mode 0600); else $RBEE_API_TOKEN. Needed to bind beyond loopback.")] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option("--config", help="Config file (default: $RBEE_CONFIG, ~/.config/rbee/config.toml, /etc/rbee/config.toml).")] = None,  # noqa: E501
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    """rbee-hive: runs and owns the workers of this machine.

    SIGHUP reads the API token file and the config file again: changed limits apply without a restart (host, port, hive_id, queen_url and data_dir wait for one); a broken file changes nothing.
    """  # noqa: E501 (one line: typer's help keeps a later paragraph's line breaks)
    configure_logging("hive")
    try:
        settings = load_hive_settings(
            config, host=host, port=port, hive_id=hive_id, queen_url=queen_url, data_dir=data_dir
        )
        tokens = TokenSource(api_token_file)
        require_token_for_bind(settings.host, tokens.current, "rbee-hive")
    except ConfigError as error:
        exit_on_config_error(error, "rbee-hive")
    reloads: list[Callable[[], None]] = []

    def hangup() -> None:
        tokens.reload()
        for reload in reloads:
            reload()

    overrides = {"host": host, "port": port, "hive_id": hive_id, "queen_url": queen_url, "data_dir": data_dir}
    code = run_daemon(
        functools.partial(serve, settings, lifeline_stdin=lifeline is Lifeline.stdin, token=tokens,
                          reloads=reloads, config_path=config, overrides=overrides),
        component="rbee-hive", on_hangup=hangup,
    )
    raise typer.Exit(code)


def run() -> None:
    cli()


if __name__ == "__main__":
    run()

"""`rbee-keeper`: the operator's commands.

One module per command group: `infer` (infer, embed, status), `queen`, `hive`,
`worker`, `model`, `audit`; `common` has what they share (running a job on the
queen, one-line errors), `output` how events and results are shown.
"""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.config import load_config
from rbee_common.daemon import package_version
from rbee_common.errors import RbeeError
from rbee_keeper.audit import audit_cli
from rbee_keeper.chat import chat
from rbee_keeper.common import Context
from rbee_keeper.hive import hive_cli
from rbee_keeper.infer import embed, infer, status
from rbee_keeper.model import model_cli
from rbee_keeper.output import show_error
from rbee_keeper.queen import queen_cli
from rbee_keeper.worker import worker_cli

cli = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="rbee-keeper: run and use an rbee inference fleet from one place.",
)
cli.command()(infer)
cli.command()(chat)
cli.command()(embed)
cli.add_typer(queen_cli, name="queen")
cli.add_typer(worker_cli, name="worker")
cli.add_typer(model_cli, name="model")
cli.add_typer(hive_cli, name="hive")
cli.add_typer(audit_cli, name="audit")
cli.command()(status)


def _version(value: bool) -> None:
    if value:
        print(f"rbee-keeper {package_version()}")
        raise typer.Exit()


@cli.callback()
def main(
    ctx: typer.Context,
    queen_url: Annotated[str | None, typer.Option(envvar="RBEE_QUEEN_URL", help="The queen to talk to (default: keeper.queen_url in the config, else http://127.0.0.1:8500).")] = None,  # noqa: E501
    config: Annotated[str | None, typer.Option("--config", help="Config file (default: $RBEE_CONFIG, ~/.config/rbee/config.toml, /etc/rbee/config.toml).")] = None,  # noqa: E501
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show job ids and stream URLs.")] = False,  # noqa: E501
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
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
        usual_queen_url=loaded.keeper.queen_url.rstrip("/"),
        verbose=verbose,
    )


def run() -> None:
    cli()


if __name__ == "__main__":
    run()

"""`rbee-keeper model …`: download, list and delete models on the hives."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.errors import ValidationFailed
from rbee_common.wire import ModelDelete, ModelDownload, ModelGet, ModelList
from rbee_keeper import hive_config
from rbee_keeper.common import (
    HiveOption,
    build,
    handles_errors,
    keeper_context,
    print_fields,
    print_table,
    run_with_queen,
)

model_cli = typer.Typer(no_args_is_help=True, help="Download, list and delete models on the hives.")


@model_cli.command("download")
@handles_errors
def model_download(
    ctx: typer.Context, model: str, hive: HiveOption = "localhost",
    from_hive: Annotated[str | None, typer.Option(help="Copy it from this hive over the LAN (by default the queen copies from any hive that has it, else downloads from the Hub).")] = None,  # noqa: E501
) -> None:
    """Download hf:<org>/<repo>[:<file or quant>] into a hive's catalog, with progress: copied from
    another hive of the fleet when one has it, else from the Hub."""
    operation = build(ModelDownload, model=model, hive_id=hive, from_hive=from_hive)
    entry = run_with_queen(keeper_context(ctx), operation)
    print(f"{entry.id}  {entry.size_bytes / 1e6:.0f} MB  {entry.path}")


@model_cli.command("list")
@handles_errors
def model_list(ctx: typer.Context, hive: HiveOption = "localhost") -> None:
    """The models in a hive's catalog."""
    models = run_with_queen(keeper_context(ctx), build(ModelList, hive_id=hive))
    rows = [[m.id, m.format, f"{m.size_bytes / 1e6:.0f} MB", m.provider, m.source or ""] for m in models]
    print_table(rows, ["MODEL", "FORMAT", "SIZE", "FROM", "SOURCE"])


@model_cli.command("get")
@handles_errors
def model_get(ctx: typer.Context, model: str, hive: HiveOption = "localhost") -> None:
    """One model of a hive's catalog."""
    print_fields(run_with_queen(keeper_context(ctx), build(ModelGet, model=model, hive_id=hive)))


@model_cli.command("delete")
@handles_errors
def model_delete(ctx: typer.Context, model: str, hive: HiveOption = "localhost") -> None:
    """Delete a model from a hive (refused while a worker uses it)."""
    entry = run_with_queen(keeper_context(ctx), build(ModelDelete, model=model, hive_id=hive))
    print(f"{entry.id} deleted")


@model_cli.command("alias")
@handles_errors
def model_alias(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="The short name (letters, digits, '.', '_', '-').")] = None,  # noqa: E501
    model: Annotated[str | None, typer.Argument(help="What it names: hf:<org>/<repo>[:<quant>], a hf.co/ or https://huggingface.co/ address, or a catalog id.")] = None,  # noqa: E501
    remove: Annotated[bool, typer.Option("--remove", help="Forget the alias NAME.")] = False,
) -> None:
    """Short names for models (a `ref` line in the config file's section for the name): after
    `rbee-keeper model alias qwen hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M`, "qwen" names that
    model everywhere (`--model qwen`, any client's "model"). A running queen reads a new alias from
    the file when a request names it. Without arguments: the aliases."""
    explicit = keeper_context(ctx).config_path
    if name is None:
        print_table([[alias, ref] for alias, ref in sorted(hive_config.model_aliases(explicit).items())],
                    ["ALIAS", "MODEL"])
        return
    if model is None and not remove:
        raise ValidationFailed(f"Say what the alias {name} names, or remove it.",
                               hint=f"rbee-keeper model alias {name} --remove")
    path, target = hive_config.set_model_alias(explicit, name, None if remove else model)
    print(f"{name} now names {target} ({path})" if target else f"alias {name} removed from {path}")

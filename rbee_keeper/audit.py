"""`rbee-keeper audit verify [FILE]`: check the keyed chain of an audit log (area 330)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rbee_common.audit import Broken, anchors_path, chain_files, default_key_path, load_key, verify
from rbee_common.config import state_dir
from rbee_common.errors import ConfigError

audit_cli = typer.Typer(no_args_is_help=True, help="Check the tamper-evident audit logs of this machine.")


@audit_cli.command("verify")
def audit_verify(
    file: Annotated[Path | None, typer.Argument(help="One audit log, with its rotated archives beside it (default: every log under $XDG_STATE_HOME/rbee/audit).")] = None,  # noqa: E501
    key: Annotated[Path | None, typer.Option(help="The chain's key (default: audit.key in the config dir, where the daemons made it).")] = None,  # noqa: E501
) -> None:
    """Check every entry's MAC and link, and the log's end against its anchors; name the first
    tampered line and exit 1. Says what it could not prove."""
    try:
        secret = load_key(key or default_key_path(), create=False)
    except ConfigError as error:
        typer.echo(f"rbee-keeper: error: {error.message} Without it no entry can be proven.", err=True)
        if error.hint:
            typer.echo(f"hint: {error.hint}", err=True)
        raise typer.Exit(1) from None
    if file is not None:
        if not file.is_file():
            typer.echo(f"rbee-keeper: error: no audit log at {file}.", err=True)
            raise typer.Exit(1)
        chains = [chain_files(file)]
    else:
        folder = state_dir() / "audit"
        currents = sorted(p for p in folder.glob("*.jsonl") if not _is_archive(p)) if folder.is_dir() else []
        if not currents:
            typer.echo(f"rbee-keeper: error: no audit logs in {folder}.", err=True)
            raise typer.Exit(1)
        chains = [chain_files(p) for p in currents]
    failed = False
    for files in chains:
        try:
            proved = verify(files, secret, anchors_path(files[-1]))
        except Broken as broken:
            where = f"line {broken.line}: " if broken.line else ""
            typer.echo(f"TAMPERED {broken.file}: {where}{broken.why}")
            failed = True
        except OSError as error:
            typer.echo(f"rbee-keeper: error: cannot read {files[-1]}: {error.strerror}.", err=True)
            failed = True
        else:
            typer.echo(f"OK {files[-1]}: {proved.entries} entries in {len(files)} file(s), the chain holds "
                       f"up to its anchor at seq {proved.anchored_seq}")
            for caveat in proved.caveats():
                typer.echo(f"  not proven: {caveat}")
    raise typer.Exit(1 if failed else 0)


def _is_archive(path: Path) -> bool:
    stem, _, stamp = path.stem.rpartition("-")
    return bool(stem) and stamp.endswith("Z") and stamp[:8].isdigit() and "T" in stamp

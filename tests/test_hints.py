"""Every `rbee-keeper …` command that an error's hint (or any message) tells a user to type is one
the keeper's own CLI takes: its command path exists and its options are its options.

The commands are read from the source of every program (string literals, f-strings with their
fields filled in with a placeholder), then given to the keeper's parser with `--help` after them:
an unknown command or option fails there as it would at the terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rbee_keeper.__main__ import cli

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ["rbee_common", "rbee_hive", "rbee_keeper", "rbee_queen", "rbee_worker"]
COMMAND = re.compile(r"rbee-keeper ((?:[a-z][a-z-]*)(?: (?:--?[a-z][a-z-]*|<[^>]+>|\{[^}]+\}|[A-Za-z0-9_.:/=-]+))*)")
NOT_COMMANDS = ("rbee-keeper: ", "rbee-keeper's", "rbee-keeper run")
"""Prose about the keeper, not a command to type."""


def told_commands() -> list[tuple[str, str]]:
    """(where, the command) for each `rbee-keeper …` in a string of the programs' source."""
    found = []
    for package in PROGRAMS:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for literal in re.finditer(r"(?:f?\"(?:[^\"\\\n]|\\.)*\"|f?'(?:[^'\\\n]|\\.)*')", text):
                for command in COMMAND.finditer(literal.group(0)):
                    start = literal.start() + command.start()
                    if literal.group(0)[command.start():].startswith(NOT_COMMANDS):
                        continue
                    line = text.count("\n", 0, start) + 1
                    found.append((f"{path.relative_to(ROOT)}:{line}", command.group(1)))
    return found


def arguments(command: str) -> list[str]:
    """The words a user would type, a placeholder (`<hive>`, `{alias}`) as a plain value."""
    words = command.replace("`", "").split()
    return ["x" if re.fullmatch(r"<[^>]+>|\{[^}]+\}|\S*\{[^}]+\}\S*", w) else w for w in words]


COMMANDS = told_commands()


def test_the_source_tells_users_commands() -> None:
    assert len(COMMANDS) >= 20, COMMANDS  # the scan works: hints name many commands


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_command_a_hint_tells_is_one_the_keeper_takes(where: str, command: str) -> None:
    result = CliRunner().invoke(cli, [*arguments(command), "--help"])
    assert result.exit_code == 0, f"{where}: `rbee-keeper {command}` is not a command:\n{result.output}"

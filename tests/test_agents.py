"""The coding agents people point at a local server, run as a user runs them, against a real queen:
Claude Code (`claude -p`, Anthropic's Messages API) and Codex CLI (`codex exec`, the Responses API).

Each runs twice:
- against synthetic workers with a script (a test double for the model's text): the first answer
  is a call of the agent's shell tool, which really runs `echo rbee-$((40+2))` in a temp dir; the
  answer after it, once the tool's output (`rbee-42`, which is nowhere in the prompt) is in the
  conversation, says what it printed. The whole agent loop goes through the queen;
- against the built-in model, whose 2,048-token context holds no agent's prompt: the CLI shows the
  queen's "prompt is too long" / `context_length_exceeded` error with the numbers, and exits.

The CLIs come from npm, pinned, installed by `.ci/run` into `.agents/` (`RBEE_AGENTS_DIR`
elsewhere). Without them the tests skip, except where `RBEE_REQUIRE_AGENTS` is set (CI as root):
there they fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, Daemon, daemon

ROOT = Path(__file__).resolve().parents[1]
AGENTS = Path(os.environ.get("RBEE_AGENTS_DIR", ROOT / ".agents")) / "node_modules" / ".bin"
MODEL = "smollm2-135m"
COMMAND = "echo rbee-$((40+2))"
ASK = f"Run the shell command `{COMMAND}` and tell me what it printed."


def _require() -> None:
    missing = [name for name in ("claude", "codex") if not (AGENTS / name).exists()]
    if missing:
        why = f"the agent CLIs are not installed in {AGENTS.parent.parent} (.ci/run installs them with npm)"
        if os.environ.get("RBEE_REQUIRE_AGENTS"):
            pytest.fail(f"RBEE_REQUIRE_AGENTS is set, but {why}")
        pytest.skip(why)


@pytest.fixture(autouse=True)
def agents_installed() -> None:
    _require()


def _queen(root: Path, script: list[dict[str, str]] | None) -> Iterator[Daemon]:
    lines = ["[hive]"]
    if script is not None:
        (root / "script.json").write_text(json.dumps(script))
        lines += ["synthetic_backend = true", f'synthetic_script = "{root / "script.json"}"',
                  "synthetic_tokens_per_s = 500", "worker_ctx = 1048576"]
    (root / "config.toml").write_text("\n".join(lines) + "\n")
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(root / "config.toml")],
                timeout=60) as queen:
        yield queen


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    print(f"$ {' '.join(argv[:2])} ... -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


# --- Claude Code ----------------------------------------------------------------------------------

CLAUDE_SCRIPT = [
    {"when": "rbee-42", "reply": "The command printed rbee-42."},
    {"reply": '<tool_call>{"name": "Bash", "arguments": {"command": "' + COMMAND + '", '
              '"description": "Print the marker"}}</tool_call>'},
]


def _claude(queen: Daemon, home: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "ANTHROPIC_BASE_URL": queen.url, "ANTHROPIC_API_KEY": "sk-local-not-checked",
           "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    return _run([str(AGENTS / "claude"), "-p", prompt, "--model", MODEL, "--allowedTools", "Bash"], env, work)


def test_claude_code_runs_a_tool_through_the_queen_and_answers(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, CLAUDE_SCRIPT):
        done = _claude(queen, tmp_path / "home", ASK)
        assert done.returncode == 0, done.stderr
        assert "The command printed rbee-42." in done.stdout


def test_claude_code_shows_that_the_prompt_is_too_long_for_the_built_in_model(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, None):
        done = _claude(queen, tmp_path / "home", "Reply with the single word: hello")
        said = done.stdout + done.stderr
        assert done.returncode != 0
        # Claude Code reads the numbers out of "prompt is too long: N tokens > 8192 maximum": the
        # model's own context, which no worker of it can pass.
        assert re.search(r"Prompt is too long .*\d{5,} tokens \(limit 8192\)", said), said
        assert not re.search(r"\b5\d\d\b", said) and "overloaded" not in said.lower()  # no 5xx


# --- Codex CLI ------------------------------------------------------------------------------------

CODEX_SCRIPT = [
    {"when": "rbee-42", "reply": "The command printed rbee-42."},
    {"reply": '<tool_call>{"name": "exec_command", "arguments": {"cmd": "' + COMMAND + '"}}</tool_call>'},
]


def _codex(queen: Daemon, home: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "rbee"\n'
        f'[model_providers.rbee]\nname = "rbee"\nbase_url = "{queen.url}/v1"\nwire_api = "responses"\n')
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "CODEX_HOME": str(codex_home)}
    return _run([str(AGENTS / "codex"), "exec", "--skip-git-repo-check",
                 "--dangerously-bypass-approvals-and-sandbox", prompt], env, work)


def test_codex_runs_a_tool_through_the_queen_and_answers(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, CODEX_SCRIPT):
        done = _codex(queen, tmp_path / "home", ASK)
        assert done.returncode == 0, done.stderr
        assert "The command printed rbee-42." in done.stdout + done.stderr


def test_codex_shows_that_the_context_is_exceeded_for_the_built_in_model(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, None):
        done = _codex(queen, tmp_path / "home", "Reply with the single word: hello")
        said = done.stdout + done.stderr
        # Codex knows `context_length_exceeded` and words it itself (without our numbers).
        assert done.returncode != 0
        assert "ran out of room in the model's context window" in said, said

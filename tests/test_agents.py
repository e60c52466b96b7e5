"""The coding agents people point at a local server, run as a user runs them, against a real queen:
Claude Code (`claude -p`, Anthropic's Messages API) and Codex CLI (`codex exec`, the Responses API).

Each runs twice:
- against synthetic workers with a script (a test double for the model's text): the first answer
  is a call of the agent's shell tool, which really runs `echo rbee-$((40+2))` in a temp dir; the
  answer after it, once the tool's output (`rbee-42`, which is nowhere in the prompt) is in the
  conversation, says what it printed. The whole agent loop goes through the queen;
- against the built-in model, trained for 8,192 tokens: Claude Code's prompt (about 12,600 of its
  tokens) does not fit, and the CLI shows the queen's "prompt is too long" with the numbers; Codex's
  (about 6,500) does, and the real model answers; with a long pasted text it does not, and Codex
  shows the `context_length_exceeded` it was sent.

The CLIs come from npm, pinned, installed by `.ci/run` into `.agents/` (`RBEE_AGENTS_DIR`
elsewhere). Without them the tests skip, except where `RBEE_REQUIRE_AGENTS` is set (CI as root):
there they fail.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from harness.helpers import BIN, Daemon, daemon

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


def _claude(url: str, home: Path, prompt: str, *more: str) -> subprocess.CompletedProcess[str]:
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "sk-local-not-checked",
           "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    return _run([str(AGENTS / "claude"), "-p", prompt, "--model", MODEL, "--allowedTools", "Bash", *more],
                env, work)


class _Exchange(NamedTuple):
    path: str
    body: dict[str, Any]
    status: int
    answer: bytes


class _Recorder:
    """Passes every request to the queen as it came and its answer back as it went, keeping both:
    to know what a CLI sent and was told (nothing is changed or answered here)."""

    def __init__(self, upstream: str) -> None:
        self.exchanges: list[_Exchange] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, headers=headers, content=body,
                                       timeout=120)
                if body:
                    recorder.exchanges.append(_Exchange(self.path, json.loads(body), answer.status_code,
                                                        answer.content))
                self.send_response(answer.status_code)
                for key in ("content-type", "retry-after", "request-id", "x-request-id"):
                    if key in answer.headers:
                        self.send_header(key, answer.headers[key])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _Recorder:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_claude_code_runs_a_tool_through_the_queen_and_answers(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, CLAUDE_SCRIPT):
        done = _claude(queen.url, tmp_path / "home", ASK)
        assert done.returncode == 0, done.stderr
        assert "The command printed rbee-42." in done.stdout


def test_a_second_claude_code_turn_reads_the_first_turns_system_prompt_from_the_cache(tmp_path: Path) -> None:
    """`claude -p`, then `claude -p --continue`: the second turn's usage (Claude Code's JSON output)
    reports cached prompt tokens covering the whole system prompt the first turn sent, though each
    run's billing header differs (the queen drops it). The synthetic workers model llama.cpp's
    prefix cache a word a token."""
    for queen in _queen(tmp_path, CLAUDE_SCRIPT):
        with _Recorder(queen.url) as recorder:
            first = _claude(recorder.url, tmp_path / "home", ASK, "--output-format", "json")
            second = _claude(recorder.url, tmp_path / "home", "Run it once more.", "--continue",
                             "--output-format", "json")
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        asked = [e.body for e in recorder.exchanges if e.path.startswith("/v1/messages?")]
        system = [block["text"] for block in asked[0]["system"]]
        assert system[0].startswith("x-anthropic-billing-header:")  # what Claude Code sent
        words = sum(len(text.split()) for text in system[1:])
        usage = json.loads(second.stdout)["usage"]
        print(f"system prompt {words} words; second turn {usage}; request sizes "
              f"{[len(json.dumps(body)) for body in asked]} bytes")
        assert json.loads(second.stdout)["result"] == "The command printed rbee-42."
        assert usage["cache_read_input_tokens"] >= words > 500, (words, usage)


def test_claude_code_shows_that_the_prompt_is_too_long_for_the_built_in_model(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, None):
        done = _claude(queen.url, tmp_path / "home", "Reply with the single word: hello")
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


def _codex(url: str, home: Path, prompt: str, *how: str) -> subprocess.CompletedProcess[str]:
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "rbee"\n'
        f'[model_providers.rbee]\nname = "rbee"\nbase_url = "{url}/v1"\nwire_api = "responses"\n')
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "CODEX_HOME": str(codex_home)}
    how = how or ("--dangerously-bypass-approvals-and-sandbox",)
    return _run([str(AGENTS / "codex"), "exec", "--skip-git-repo-check", *how, prompt], env, work)


def test_codex_runs_a_tool_through_the_queen_and_answers(tmp_path: Path) -> None:
    for queen in _queen(tmp_path, CODEX_SCRIPT):
        with _Recorder(queen.url) as recorder:
            done = _codex(recorder.url, tmp_path / "home", ASK)
        assert done.returncode == 0, done.stderr
        assert "The command printed rbee-42." in done.stdout + done.stderr
        asked = [e for e in recorder.exchanges if e.path == "/v1/responses"]
        print(f"request sizes {[len(json.dumps(e.body)) for e in asked]} bytes")
        assert [e.status for e in asked] == [200, 200]  # the call, then the answer with its output


def test_codex_answers_with_the_built_in_model(tmp_path: Path) -> None:
    """Codex's prompt (its instructions and tools: about 6,500 of the built-in model's tokens) fits
    the 8,192 tokens its hive gives each worker's sequences: the real model answers a turn. Read-only
    sandbox: whatever the small model says, Codex changes nothing."""
    for queen in _queen(tmp_path, None):
        with _Recorder(queen.url) as recorder:
            done = _codex(recorder.url, tmp_path / "home", "Reply with the single word: hello",
                          "--sandbox", "read-only")
        assert done.returncode == 0, done.stderr
        answered = [e for e in recorder.exchanges if e.path == "/v1/responses"]
        assert answered and all(e.status == 200 for e in answered)
        assert re.search(r"(?m)^codex\n\S", done.stdout + done.stderr), done.stderr  # what the model said


def test_codex_shows_that_the_context_is_exceeded_for_the_built_in_model(tmp_path: Path) -> None:
    pasted = "Count the words of this text: " + "bee " * 3000  # with Codex's own prompt, over 8,192
    for queen in _queen(tmp_path, None):
        with _Recorder(queen.url) as recorder:
            done = _codex(recorder.url, tmp_path / "home", pasted)
        said = done.stdout + done.stderr
        # Codex knows `context_length_exceeded` and words it itself, without the numbers the queen
        # sent (it compacts its history on that code in a long session, so the code stays).
        assert done.returncode != 0
        assert "ran out of room in the model's context window" in said, said
        (refused,) = [e for e in recorder.exchanges if e.path == "/v1/responses"]  # and no retry
        error = json.loads(refused.answer)["error"]
        assert refused.status == 400 and error["code"] == "context_length_exceeded"
        said_tokens = re.search(r"maximum context length is 8192 tokens\. However, your messages resulted in "
                                r"(\d+) tokens", error["message"])
        assert said_tokens and int(said_tokens[1]) > 8192, error

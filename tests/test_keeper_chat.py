"""`rbee-keeper chat` at a real terminal (a pty): turns that keep the conversation, Ctrl-C that
stops an answer and not the chat, Ctrl-D that leaves, and nothing left running."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import psutil

from harness.helpers import BIN, free_port, wait_for
from tests.test_keeper_cli import ours

STATS = re.compile(r"\(prompt (\d+) tokens, (\d+) of them cached; answer (\d+) tokens; (\d+) turn\(s\) kept\)")


class Terminal:
    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a terminal of its own, and Ctrl-C as a terminal sends it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(argv[0], argv)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Read until `pattern` appears after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end():]
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child is gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {pattern!r}:\n{self.seen[-2000:]}")
                self.seen += chunk.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_status = os.waitpid(self.pid, os.WNOHANG)
            if with_status[0]:
                return os.waitstatus_to_exitcode(with_status[1])
            with contextlib.suppress(OSError):
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"rbee-keeper chat did not exit; the terminal shows:\n{self.seen[-2000:]}")


def turn(terminal: Terminal, text: str) -> tuple[int, int, int]:
    """Say `text`; the answer's (prompt tokens, answer tokens, turns kept)."""
    terminal.type(text + "\r")
    stats = terminal.expect(STATS.pattern)
    terminal.expect(">>> ")
    return int(stats[1]), int(stats[3]), int(stats[4])


def test_a_chat_keeps_its_turns_survives_ctrl_c_and_leaves_on_ctrl_d(isolated_dirs: Path) -> None:
    port = free_port()
    terminal = Terminal([str(BIN / "rbee-keeper"), "--queen-url", f"http://127.0.0.1:{port}", "chat",
                         "--temperature", "0", "--max-tokens", "300", "--stats"])
    try:
        terminal.expect("Chatting with smollm2-135m")
        terminal.expect(">>> ")
        first_prompt, first_answer, kept = turn(terminal, "My name is Ada. Say hello to me.")
        assert kept == 1
        second_prompt, _, kept = turn(terminal, "What is my name?")
        assert kept == 2
        # the second turn carried the first one: its question, and the answer to it
        assert second_prompt > first_prompt + first_answer, (first_prompt, first_answer, second_prompt)

        terminal.type("Write a very long story about a lighthouse by the sea.\r")
        terminal.expect(r"by the sea\.\r?\n")  # the terminal's echo of the line
        terminal.expect(r"\w{4}")  # it is answering (300 tokens: seconds to go)
        terminal.type("\x03")  # Ctrl-C
        terminal.expect(r"\(stopped; the answer is not kept\)")
        terminal.expect(">>> ")
        third_prompt, _, kept = turn(terminal, "Thank you.")
        assert kept == 3  # the stopped answer is not part of the conversation
        assert third_prompt > second_prompt

        terminal.type("/clear\r")
        terminal.expect(r"\(the conversation is forgotten\)")
        terminal.expect(">>> ")
        fresh_prompt, _, kept = turn(terminal, "What is my name?")
        assert kept == 1 and fresh_prompt < second_prompt

        terminal.type("\x04")  # Ctrl-D
        assert terminal.wait() == 0
    finally:
        with contextlib.suppress(OSError):
            os.kill(terminal.pid, signal.SIGKILL)
        os.close(terminal.fd)
        wait_for(lambda: ours(port) == [], timeout=10)
        left = ours(port)
        for process in left:  # a failed run: the queen the killed chat started is still up
            with contextlib.suppress(psutil.Error):
                process.kill()
    assert left == [], left


def test_chat_and_infer_read_a_piped_prompt(isolated_dirs: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["chat", "--temperature", "0", "--max-tokens", "8"],
                 ["infer", "-", "--temperature", "0", "--max-tokens", "8"]):
        done = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, *argv], input="Say hi.\n",
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() and done.stdout.endswith("\n") and "Chatting" not in done.stderr

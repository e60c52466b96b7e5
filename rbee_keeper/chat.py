"""`rbee-keeper chat [MODEL]`: a conversation at the terminal, as `ollama run` has it.

Each turn sends the whole conversation (the queen's workers keep its prefix cached, so a turn
costs its new tokens). The queen (and with it the worker) stays up for the session; one this
command started stops when it ends. Ctrl-C stops an answer and keeps the chat; Ctrl-D, or /bye,
leaves. With stdin not a terminal, what it holds is one prompt: the answer, and the end.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import msgspec
import typer

from rbee_common.errors import RbeeError, ValidationFailed
from rbee_common.wire import ChatMessage, Infer, InferResult
from rbee_keeper import lifecycle
from rbee_keeper.common import Context, KeepQueen, handles_errors, keeper_context, run_job
from rbee_keeper.output import end_line, say, show_error

HELP = """Commands:
  /system TEXT   set the system message (the conversation goes on)
  /model NAME    talk to another model (the conversation goes on)
  /clear         forget the conversation
  /bye           leave (or Ctrl-D)
A line of three quotes (\"\"\") starts and ends a message of several lines; a line ending in \\
goes on on the next. Ctrl-C stops an answer."""


def _read_message(prompt: str) -> str | None:
    """One message from the terminal (several lines within \"\"\" or after a trailing \\); None at
    Ctrl-D."""
    try:
        first = input(prompt)
    except EOFError:
        return None
    if first.strip() == '"""':
        lines: list[str] = []
        while True:
            try:
                line = input("... ")
            except EOFError:
                return "\n".join(lines)
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


class Conversation:
    def __init__(self, model: str, system: str | None) -> None:
        self.model = model
        self.system = system
        self.turns: list[ChatMessage] = []

    def messages(self, text: str) -> list[ChatMessage]:
        system = [ChatMessage("system", self.system)] if self.system else []
        return [*system, *self.turns, ChatMessage("user", text)]

    def command(self, line: str) -> bool:
        """Carry out a /command; False when it means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name == "/clear":
            self.turns.clear()
            say("(the conversation is forgotten)")
        elif name == "/system":
            self.system = rest or None
            say("(system message set)" if rest else "(no system message)")
        elif name == "/model" and rest:
            self.model = rest
            say(f"(talking to {rest})")
        else:
            say(HELP)
        return True


def _answer(c: Context, conversation: Conversation, text: str, max_tokens: int, temperature: float,
            verbose: bool) -> None:
    try:
        operation = Infer(model=conversation.model, messages=conversation.messages(text),
                          max_tokens=max_tokens, temperature=temperature)
    except msgspec.ValidationError:
        raise ValidationFailed("That model name is not valid.", hint="rbee-keeper model list") from None
    try:
        result: InferResult = run_job(c, operation)
    except KeyboardInterrupt:
        end_line()
        say("(stopped; the answer is not kept)")
        return
    end_line()
    conversation.turns += [ChatMessage("user", text), ChatMessage("assistant", result.text)]
    if verbose:
        say(f"(prompt {result.tokens_in} tokens, {result.tokens_cached} of them cached; "
            f"answer {result.tokens_out} tokens; {len(conversation.turns) // 2} turn(s) kept)")


@handles_errors
def chat(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A model a hive has (see `rbee-keeper model list`).")] = "smollm2-135m",  # noqa: E501
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="At most this many tokens an answer.")] = 1024,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature.")] = 0.7,
    stats: Annotated[bool, typer.Option("--stats", help="After each answer, its token counts on stderr.")] = False,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Chat with a model: the conversation is kept, turn after turn (Ctrl-C stops an answer, Ctrl-D
    leaves; /help for the commands). Stdin that is not a terminal is one prompt."""
    c = keeper_context(ctx)
    conversation = Conversation(model, system)
    piped = not sys.stdin.isatty()
    with lifecycle.ephemeral_queen(c.queen_url, say=say, config=c.config_path, keep=keep_queen,
                                   timeout=c.config.keeper.queen_start_timeout_s, verbose=c.verbose,
                                   usual=c.usual_queen_url):
        if piped:
            text = sys.stdin.read().strip()
            if text:
                _answer(c, conversation, text, max_tokens, temperature, stats)
            return
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (line editing and history for input())
        say(f"Chatting with {model}; /help for the commands, Ctrl-D to leave.")
        while True:
            try:
                text = _read_message(">>> ")
            except KeyboardInterrupt:
                print(file=sys.stderr)
                say("(Ctrl-D or /bye leaves)")
                continue
            if text is None:
                print(file=sys.stderr)
                break
            if not text.strip():
                continue
            if text.startswith("/"):
                if not conversation.command(text.strip()):
                    break
                continue
            try:
                _answer(c, conversation, text, max_tokens, temperature, stats)
            except RbeeError as error:  # a turn that failed: said, and the chat goes on
                show_error(error)

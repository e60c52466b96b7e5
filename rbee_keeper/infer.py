"""`rbee-keeper infer`, `embed` and `status`: using the fleet."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import msgspec
import typer

from rbee_common.errors import ModelNotFound, ValidationFailed
from rbee_common.wire import ChatMessage, Embed, Infer, Status
from rbee_keeper import lifecycle
from rbee_keeper.common import KeepQueen, build, handles_errors, keeper_context, run_job, run_with_queen
from rbee_keeper.output import end_line, say, show_status


@handles_errors
def infer(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to ask; - reads it from stdin.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A model a hive has (see `rbee-keeper model list`).")] = "smollm2-135m",  # noqa: E501
    max_tokens: Annotated[int, typer.Option(min=1, help="At most this many tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature.")] = 0.7,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    hive: Annotated[str | None, typer.Option("--hive", help="Run it on this hive only (its workers, or a cold start there).")] = None,  # noqa: E501
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer at the end, not as it comes.")] = False,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Ask a model; the answer goes to stdout, everything else to stderr."""
    c = keeper_context(ctx)
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValidationFailed("stdin held no prompt.",
                                   hint='echo "Why is the sky blue?" | rbee-keeper infer -')
    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
    try:
        operation = Infer(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                          hive_id=hive)
    except msgspec.ValidationError:
        raise ValidationFailed(
            "That model name is not valid.", hint="See `rbee-keeper model list`."
        ) from None
    try:
        result = run_with_queen(c, operation, keep_queen=keep_queen, tokens=not no_stream)
    except ModelNotFound as error:  # the queen does not echo the name; its own user's, the keeper may
        raise ModelNotFound(f"{model}: {error.message}", details=error.details, hint=error.hint) from None
    if no_stream:
        print(result.text)
    else:
        end_line()


@handles_errors
def embed(
    ctx: typer.Context,
    texts: Annotated[list[str], typer.Argument(help="One or more texts; each gets a vector.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A model a hive has (see `rbee-keeper model list`).")] = "smollm2-135m",  # noqa: E501
    dimensions: Annotated[int | None, typer.Option(min=1, help="Keep this many leading dimensions (normalized again).")] = None,  # noqa: E501
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the model, the vectors and the token count.")] = False,  # noqa: E501
    keep_queen: KeepQueen = False,
) -> None:
    """Embed texts: one unit vector per text, a line of numbers each (or JSON with --json)."""
    operation = build(Embed, model=model, input=texts, dimensions=dimensions)
    result = run_with_queen(keeper_context(ctx), operation, keep_queen=keep_queen)
    if as_json:
        print(json.dumps({"model": model, "data": result.data, "tokens": result.tokens}))
        return
    for vector in result.data:
        print(" ".join(f"{value:.6f}" for value in vector))


@handles_errors
def status(
    ctx: typer.Context,
    keep_queen: Annotated[bool, typer.Option("--keep-queen", help="If this command starts a queen, leave it running.")] = False,  # noqa: E501
) -> None:
    """Show the queen, its hives and their workers (starts a queen if none runs)."""
    c = keeper_context(ctx)
    with lifecycle.ephemeral_queen(
        c.queen_url, say=say, config=c.config_path, keep=keep_queen,
        timeout=c.config.keeper.queen_start_timeout_s, verbose=c.verbose, usual=c.usual_queen_url,
    ):
        result = run_job(c, Status())
    show_status(c.queen_url, result)

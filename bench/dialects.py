"""What the queen's three dialects cost, and what tool calls and embeddings take, on one worker.

A queen with `--local-hive` serves the built-in SmolLM2-135M. Reported (median
of `--runs`, after one warm-up each):

- the same greedy answer of `--max-tokens` tokens through OpenAI's
  `/v1/chat/completions`, Anthropic's `/v1/messages` and Ollama's `/api/chat`,
  not streamed, with the official clients: wall time per request;
- a forced tool call (`tool_choice="required"`, two tools), not streamed and
  streamed (time to the call's name, time to its end);
- embeddings of short texts in batches of 1, 8 and 32: texts/s.

    .venv/bin/python bench/dialects.py [--runs 5] [--max-tokens 32]

Run it on a quiet machine; the queen (and its worker) stop at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic
import ollama
from openai import OpenAI

from harness.helpers import BIN, daemon

MODEL = "smollm2-135m"
ASK = [{"role": "user", "content": "What is the weather in Paris today?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"],
            },
        },
    },
]


def median_ms(run: Callable[[], object], runs: int) -> float:
    run()  # warm-up (and, the first time, the worker's cold start)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    n = args.max_tokens
    with tempfile.TemporaryDirectory() as root:
        env = {f"XDG_{name.upper()}_HOME": f"{root}/{name}" for name in ("config", "state", "data", "cache")}
        with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env, timeout=60) as queen:
            openai = OpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
            claude = anthropic.Anthropic(base_url=queen.url, api_key="x", max_retries=0)
            llama = ollama.Client(host=queen.url)
            report: dict[str, object] = {"max_tokens": n, "runs": args.runs}
            tokens: dict[str, int] = {}

            def via_openai() -> None:
                reply = openai.chat.completions.create(
                    model=MODEL,
                    messages=ASK,
                    max_tokens=n,  # type: ignore[arg-type]
                    temperature=0,
                )
                tokens["openai"] = reply.usage.completion_tokens if reply.usage else 0

            def via_anthropic() -> None:
                reply = claude.messages.create(
                    model=MODEL,
                    messages=ASK,
                    max_tokens=n,  # type: ignore[arg-type]
                    extra_body={"temperature": 0},
                )
                tokens["anthropic"] = reply.usage.output_tokens

            def via_ollama() -> None:
                reply = llama.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": n})
                tokens["ollama"] = reply.eval_count or 0

            report["chat_ms"] = {
                name: median_ms(run, args.runs)
                for name, run in (
                    ("openai", via_openai),
                    ("anthropic", via_anthropic),
                    ("ollama", via_ollama),
                )
            }
            report["chat_tokens"] = tokens
            forced: dict[str, Any] = {
                "model": MODEL,
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": "required",
                "temperature": 0,
                "max_tokens": 100,
            }
            report["tool_call_ms"] = median_ms(lambda: openai.chat.completions.create(**forced), args.runs)
            named, ended = [], []
            for _ in range(args.runs + 1):
                began = time.perf_counter()
                first = None
                for chunk in openai.chat.completions.create(**forced, stream=True):
                    if first is None and chunk.choices and chunk.choices[0].delta.tool_calls:
                        first = time.perf_counter() - began
                named.append((first or 0) * 1000)
                ended.append((time.perf_counter() - began) * 1000)
            report["tool_call_stream_ms"] = {
                "to_name": round(statistics.median(named[1:]), 1),
                "to_end": round(statistics.median(ended[1:]), 1),
            }
            texts = [f"Sentence number {i} is about bees and honey." for i in range(32)]
            rates = {}
            for batch in (1, 8, 32):
                ms = median_ms(
                    lambda b=batch: openai.embeddings.create(model=MODEL, input=texts[:b]), args.runs
                )
                rates[str(batch)] = round(batch / (ms / 1000), 1)
            report["embeddings_texts_per_s"] = rates
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

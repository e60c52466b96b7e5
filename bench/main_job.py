"""The main job end to end, as the README runs it: `rbee-keeper infer` with no queen running.

The keeper starts a queen (with its local hive), the hive starts a worker of the built-in
SmolLM2-135M, the answer streams to stdout, and the keeper stops the queen and with it every
process it started. Timed from the command's start to its exit, in a fresh XDG environment each run.

    .venv/bin/python -m bench main_job [--quick]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.helpers import BIN, free_port, isolated_env

PROMPT = "Why is the sky blue?"
MAX_TOKENS = 64


def run(*, quick: bool = False) -> dict[str, Any]:
    runs = 1 if quick else 5
    samples = []
    words = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, **isolated_env(Path(folder))}
            url = f"http://127.0.0.1:{free_port()}"
            started = time.perf_counter()
            done = subprocess.run(
                [str(BIN / "rbee-keeper"), "--queen-url", url, "infer", PROMPT,
                 "--max-tokens", str(MAX_TOKENS)],
                capture_output=True, text=True, timeout=300, env=env,
            )
            took = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"rbee-keeper infer failed: {done.stderr}")
            samples.append(took)
            words.append(len(done.stdout.split()))
    return {"runs": runs, "max_tokens": MAX_TOKENS, "seconds": [round(s, 2) for s in samples],
            "median_s": round(statistics.median(samples), 2), "answer_words": words}


def table(results: dict[str, Any]) -> str:
    each = ", ".join(f"{s:.2f}" for s in results["seconds"])
    return ("| command | median | each run | words in the answer |\n|---|---|---|---|\n"
            f"| `rbee-keeper infer \"{PROMPT}\" --max-tokens {results['max_tokens']}`, no queen running | "
            f"{results['median_s']:.2f} s | {each} s | {', '.join(map(str, results['answer_words']))} |")


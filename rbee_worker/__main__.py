"""`llm-worker-rbee`: not built yet; it says so instead of pretending."""

from __future__ import annotations

import sys


def run() -> None:
    sys.stderr.write(
        "llm-worker-rbee: the inference worker is not part of this build yet "
        "(it lands with the issue 'llm-worker-rbee: real tokens from llama.cpp and MLX').\n"
    )
    raise SystemExit(2)


if __name__ == "__main__":
    run()

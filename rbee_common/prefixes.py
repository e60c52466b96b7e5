"""Prompt prefixes as the queen and the workers both can name them (cache-aware routing).

A prompt is a chain of blocks: the tools, then each message (its role, text
and calls), or, for a plain prompt, its text in pieces of BLOCK_CHARS. Each
block's hash covers every block before it, so a worker that holds a block's
hash holds the whole prefix up to it. Workers send the hashes of what their
sequences and their RAM cache hold in their heartbeats; the queen hashes each
request the same way and scores each worker by the share of the prompt's
characters its longest held prefix covers. Blocks follow the messages, not
the tokens: the queen has no tokenizer, and the chat template renders the
same messages to the same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

import msgspec

from rbee_common.wire import GenerationParams

BLOCK_CHARS = 1024
"""A plain prompt's block."""
MAX_HELD = 4096
"""Hashes a worker reports (the most recent first): a few hundred prompts of ten messages."""


class Block(msgspec.Struct, frozen=True, array_like=True):
    hash: int
    chars: int


def _chain(parts: Sequence[str]) -> list[Block]:
    blocks: list[Block] = []
    previous = b""
    for part in parts:
        digest = hashlib.blake2b(previous + part.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        previous = digest
        blocks.append(Block(int.from_bytes(digest, "little") >> 1, len(part)))
    return blocks


def prompt_blocks(params: GenerationParams) -> list[Block]:
    """The chain of a request's prompt (empty for a request without one)."""
    parts: list[str] = []
    if params.tools:
        parts.append(msgspec.json.encode(params.tools).decode())
    if params.messages:
        for message in params.messages:
            calls = msgspec.json.encode(message.tool_calls).decode() if message.tool_calls else ""
            parts.append(f"{message.role}\x00{message.content}\x00{calls}\x00{message.tool_call_id or ''}")
    elif params.prompt:
        parts += [params.prompt[i:i + BLOCK_CHARS] for i in range(0, len(params.prompt), BLOCK_CHARS)]
    return _chain(parts)


def held_share(blocks: Sequence[Block], held: Collection[int]) -> float:
    """The share of the prompt's characters that the longest prefix in `held` covers."""
    total = sum(block.chars for block in blocks)
    if not total or not held:
        return 0.0
    for end in range(len(blocks), 0, -1):
        if blocks[end - 1].hash in held:
            return sum(block.chars for block in blocks[:end]) / total
    return 0.0

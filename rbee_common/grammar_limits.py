"""Bounds on the JSON schemas that become llama.cpp grammars, checked before any of them is built.

llama.cpp's schema converter writes a repetition `{0,n}` (from `maxLength`,
`maxItems`, a regex quantifier) as n nested groups, and `minItems: n` as n
copies; its grammar parser is recursive. A 100-byte schema with `maxLength:
100000` overflowed the worker's stack (SIGSEGV), and `minItems: 1e8` would
have taken gigabytes. So a schema that is to become a grammar (a
`response_format` json_schema, the tools a `tool_choice` forces, Ollama's
`format`, Anthropic's `input_schema` under `tool_choice: any`) must keep:

- its JSON within `MAX_SCHEMA_BYTES` and `MAX_SCHEMA_DEPTH` levels of nesting;
- every count (`minLength`, `maxLength`, `minItems`, `maxItems`,
  `minProperties`, `maxProperties`) at most `MAX_REPEAT`, and all of them
  together at most `MAX_TOTAL_REPEAT`;
- the `{m,n}` of one `pattern` adding up to at most `MAX_REPEAT` (the
  converter inlines a group's repetitions, so nested ones multiply);

and the grammar built from it within `MAX_GRAMMAR_BYTES` and
`MAX_GRAMMAR_NESTING` levels of parentheses (`check_grammar`). The queen
checks the schemas before it schedules anything, the worker again before it
builds; each refusal is a 400 (`LimitExceeded`) naming the field and the limit.
The walks are iterative: a hostile schema cannot make them recurse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from rbee_common.errors import LimitExceeded, ValidationFailed
from rbee_common.wire import GenerationParams

MAX_SCHEMA_BYTES = 256 * 1024
MAX_SCHEMA_DEPTH = 64
MAX_REPEAT = 1000
"""llama.cpp 0.3.36 itself refuses the grammar of `maxLength` 1,024 ("exceeds sane defaults"), and
overflowed an 8 MiB stack at 20,000 before it got to say so."""
MAX_TOTAL_REPEAT = 16 * MAX_REPEAT
MAX_GRAMMAR_BYTES = 2 * 1024 * 1024
MAX_GRAMMAR_NESTING = 2048
"""Measured: 1,000 levels parse within a 1 MiB stack; the worker's threads have 64 MiB
(rbee_worker/__main__.py)."""

COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def grammar_schemas(params: GenerationParams) -> Iterator[tuple[str, Any]]:
    """The schemas of a request that a worker turns into grammars, with the field that holds each."""
    fmt = params.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema:
        yield "response_format", fmt.json_schema.get("schema", fmt.json_schema)
    if params.tool_choice == "required" or params.tool_name is not None:
        for tool in params.tools:
            if params.tool_name is None or tool.name == params.tool_name:
                yield "tools", tool.parameters


def _limit(field: str, what: str, limit: int) -> LimitExceeded:
    return LimitExceeded(
        f"The JSON schema in `{field}` has {what}; at most {limit} is allowed.",
        details={"field": field, "limit": limit},
        hint="Use a smaller bound, or check the length after generation.",
    )


def check_schema(field: str, schema: Any) -> None:
    """Refuse a schema over the limits above (`LimitExceeded`), or one that is not a schema at all
    (`ValidationFailed`)."""
    if not isinstance(schema, dict | bool):
        raise ValidationFailed(f"The JSON schema in `{field}` must be an object.", details={"field": field})
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        raise ValidationFailed(f"The JSON schema in `{field}` is not JSON.",
                               details={"field": field}) from None
    if size > MAX_SCHEMA_BYTES:
        raise _limit(field, f"{size} bytes", MAX_SCHEMA_BYTES)
    stack: list[tuple[Any, int]] = [(schema, 1)]
    total = 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise _limit(field, f"more than {MAX_SCHEMA_DEPTH} levels of nesting", MAX_SCHEMA_DEPTH)
        if isinstance(node, dict):
            for keyword in COUNT_KEYWORDS:
                value = node.get(keyword)
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                if not value <= MAX_REPEAT:  # NaN too
                    raise _limit(field, f"`{keyword}` {str(value)[:24]}", MAX_REPEAT)
                total += max(int(value), 0)
                if total > MAX_TOTAL_REPEAT:
                    raise _limit(field, "counts (minLength, maxItems, ...) adding up to more",
                                 MAX_TOTAL_REPEAT)
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                counts = sum(max(int(low), int(high or 0)) for low, high in _QUANTIFIER.findall(pattern))
                if counts > MAX_REPEAT:
                    raise _limit(field, "a `pattern` whose repetitions add up to more", MAX_REPEAT)
            stack.extend((value, depth + 1) for value in node.values() if isinstance(value, dict | list))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node if isinstance(value, dict | list))


def check_params(params: GenerationParams) -> None:
    for field, schema in grammar_schemas(params):
        check_schema(field, schema)


def grammar_nesting(grammar: str) -> int:
    """The deepest nesting of parentheses in a GBNF grammar, outside its literals and classes."""
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for char in grammar:
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char == '"':
            quote = '"'
        elif char == "[":
            quote = "]"
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest


def check_grammar(field: str, grammar: str) -> None:
    """A built grammar that llama.cpp's parser may take without danger to the worker."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise _limit(field, f"a grammar of {len(grammar)} bytes", MAX_GRAMMAR_BYTES)
    nesting = grammar_nesting(grammar)
    if nesting > MAX_GRAMMAR_NESTING:
        raise _limit(field, f"a grammar nested {nesting} levels deep", MAX_GRAMMAR_NESTING)

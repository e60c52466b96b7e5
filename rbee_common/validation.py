"""Decoding untrusted JSON into wire types, with errors that never echo input."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from rbee_common.errors import MalformedJson, ValidationFailed

T = TypeVar("T")

_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
QUOTE_CHARS = 64
"""At most this much of a client-supplied name (a field, a path, a header) is quoted back."""


def quote(text: str) -> str:
    """A client-supplied name, cut to `QUOTE_CHARS` for a message (never a whole hostile string)."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"


def describe_validation_error(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    """msgspec's message, without the offending value, and the field's path."""
    message = str(exc)
    path: str | None = None
    match = _AT.search(message)
    if match:
        path = match.group("path") or None
        message = message[: match.start()]
    # msgspec quotes a rejected value ("Invalid value 'x'"); never echo input.
    message = re.sub(r"^Invalid (enum )?value .*$", r"Invalid \1value", message)
    pattern = re.match(r"Expected `str` matching regex '(?P<pattern>.*)'$", message)
    if pattern:  # in words: a regex helps nobody who typed gpu0
        from rbee_common.wire import PATTERN_WORDS

        raw = pattern["pattern"].encode().decode("unicode_escape")
        message = f"Expected {PATTERN_WORDS.get(raw, 'another form of value')}"
    bound = re.match(r"Expected `(?:int|float)` (?P<op>>=|<=|>|<) (?P<limit>-?[0-9.e+-]+)$", message)
    if bound:  # in words, as a person would say it
        limit = float(bound["limit"])
        said = {">=": "at least", "<=": "at most", ">": "above", "<": "below"}[bound["op"]]
        message = f"Expected a number {said} {limit:g}"
    missing = re.match(r"Object missing required field `(?P<field>[^`]+)`", message)
    if missing:
        field = missing.group("field")
        path = f"{path}.{field}" if path else field
    return message, path


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, path = describe_validation_error(exc)
        unknown = re.match(r"Object contains unknown field `(?P<field>[^`]+)`", message)
        if unknown:  # a request field this server does not take: name it (`param` on OpenAI's routes)
            path = f"{path}.{unknown['field']}" if path else unknown["field"]
            message = "Object contains an unknown field"
        path = quote(path) if path else path
        where = f" at `{path}`" if path else ""
        raise ValidationFailed(
            f"{message}{where}.", details={"field": path} if path else {}
        ) from None
    except msgspec.DecodeError:
        raise MalformedJson(
            "The request body is not valid JSON.", hint="Send one JSON object."
        ) from None
    except RecursionError:  # msgspec's depth limit for `Any` fields: hostile, not a server fault
        raise MalformedJson(
            "The request body is nested too deeply.", hint="Send one JSON object of ordinary depth."
        ) from None


def convert_checked(value: object, kind: type[T]) -> T:
    """`value` (a struct, or anything with the attributes) as `kind`, its constraints checked: a
    `ValidationFailed` naming the field for a value out of range."""
    try:
        return msgspec.convert(value, kind, from_attributes=True)
    except msgspec.ValidationError as exc:
        message, path = describe_validation_error(exc)
        raise ValidationFailed(f"{message} at `{path}`." if path else f"{message}.",
                               details={"field": path} if path else {}) from None

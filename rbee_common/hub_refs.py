"""Hub model references as people write them: `hf:org/repo[:quant]`, `hf.co/org/repo[:quant]`,
`huggingface.co/org/repo`, or the page's https URL (with `/tree/main` or `/blob/main/<file>`
after it), all read as the one form a hive downloads, `hf:org/repo[:file or quant]`."""

from __future__ import annotations

import re

_NAME = r"[A-Za-z0-9._-]+"
HF = re.compile(rf"^hf:(?P<repo>{_NAME}/{_NAME})(?::(?P<select>{_NAME}))?\Z")
"""The form a hive downloads (`rbee_hive.catalog` parses it with this)."""
_URL = re.compile(
    rf"^(?:https?://)?(?:www\.)?(?:hf\.co|huggingface\.co)/(?P<repo>{_NAME}/{_NAME})"
    rf"(?:/(?:blob|resolve|tree)/{_NAME}(?:/(?P<file>{_NAME}))?)?/?(?::(?P<select>{_NAME}))?\Z")


def hub_reference(ref: str) -> str | None:
    """`hf:org/repo[:select]` for a Hub reference in any of its spellings; None for anything else
    (a catalog id, a file, a built-in model)."""
    if HF.match(ref):
        return ref
    found = _URL.match(ref)
    if found is None:
        return None
    select = found["file"] or found["select"]
    return f"hf:{found['repo']}" + (f":{select}" if select else "")

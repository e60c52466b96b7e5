"""Model references: a catalog id, or a Hub model as people write it (`hf:org/repo[:quant]`,
`hf.co/org/repo[:quant]`, `huggingface.co/org/repo`, or the page's https URL, with `/tree/main`
or `/blob/main/<file>` after it), all read as the one form a hive downloads,
`hf:org/repo[:file or quant]`; and the catalog id each gets (`catalog_id`)."""

from __future__ import annotations

import re

import msgspec

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


_QUANT = re.compile(r"(?i)(?:^|(?<=[-._]))(I?Q[0-9](?:_[A-Z0-9]+)*|BF16|F16|F32)(?=[-._]|\Z)")
_GGUF_SUFFIX = re.compile(r"(?i)[-_.]gguf\Z")


def quant_of(name: str) -> str | None:
    """The quantization a GGUF file name (or a bare quant) names, upper case: `Q4_K_M`, `IQ4_XS`,
    `F16`; None when it names none."""
    found = _QUANT.search(name)
    return found[1].upper() if found else None


def readable_id(repo: str, select: str | None = None, *, qualified: bool = False) -> str:
    """The catalog id of a Hub GGUF file (or an MLX repository): the repository's name without
    `-GGUF`, then the file's quantization, lower case, so `hf:bartowski/SmolLM2-360M-Instruct-GGUF`,
    `…:Q4_K_M` and `…:SmolLM2-360M-Instruct-Q4_K_M.gguf` are all `smollm2-360m-instruct-q4_k_m`.
    `qualified` puts the organisation first, for a name another repository holds already."""
    org, name = repo.split("/", 1)
    name = _GGUF_SUFFIX.sub("", name)
    if qualified:
        name = f"{org}-{name}"
    tail = (quant_of(select) or _GGUF_SUFFIX.sub("", select)) if select else None
    if tail and tail.lower() != name.lower() and not name.lower().endswith(f"-{tail.lower()}"):
        name = f"{name}-{tail}"
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:200] or "model"


def sanitize(text: str) -> str:
    """`text` as a catalog id: runs of other characters become `--`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-")[:200] or "model"


def catalog_id(ref: str) -> str:
    """The id a reference's model gets in a hive's catalog (a Hub file's: `readable_id`)."""
    found = HF.match(ref)
    if found is not None:
        return readable_id(found["repo"], found["select"])
    return sanitize(ref)


class HfRef(msgspec.Struct, frozen=True):
    repo: str
    select: str | None
    """A file name (`x.Q4_K_M.gguf`) or a quantization (`Q4_K_M`)."""


def parse_hf(ref: str) -> HfRef | None:
    """`hf:org/repo[:select]` in its parts; None for anything else."""
    match = HF.match(ref)
    return HfRef(match["repo"], match["select"]) if match else None

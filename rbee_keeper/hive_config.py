"""The `[hives.<alias>]` sections of the config file, and the `ref` of `[models.<alias>]`, edited as
text.

Adding a hive appends a section, written from the `HiveEntry` schema (every field
that differs from its default); removing cuts one out. A model alias is one
`ref = "…"` line in its `[models."<alias>"]` section. Everything else in the file
(comments, order, other sections) stays as the operator wrote it, and the
file is replaced atomically. `import_ssh` reads `~/.ssh/config` Host blocks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec

from rbee_common.config import HiveEntry, config_dir, find_config_file, load_config, toml_section, toml_value
from rbee_common.errors import ConfigError, Conflict, HiveNotFound, ModelNotFound, ValidationFailed
from rbee_common.modelref import hub_reference

ALIAS = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


def config_path(explicit: str | None) -> Path:
    """The file to edit: the one in use, else the user's XDG config file."""
    return find_config_file(explicit) or config_dir() / "config.toml"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def add_hive(explicit: str | None, alias: str, entry: HiveEntry) -> Path:
    if not ALIAS.match(alias) or alias == "localhost":
        raise ValidationFailed(
            "A hive alias is letters, digits, '.', '_' and '-' (and localhost is built in).",
            hint="Pick another alias, e.g. gpu-node-1.",
        )
    path = config_path(explicit)
    if alias in load_config(explicit).hives:
        raise Conflict(f"The hive {alias} is already configured in {path}.",
                       hint=f"Remove it first: rbee-keeper hive remove {alias}")
    text = path.read_text() if path.is_file() else ""
    block = toml_section(f"hives.{alias}", entry)
    _write(path, text + ("\n" if text and not text.endswith("\n\n") else "") + block)
    try:
        load_config(str(path))  # what we wrote must load: a broken file is never left behind
    except ConfigError:
        _write(path, text)
        raise
    return path


def remove_hive(explicit: str | None, alias: str) -> Path:
    path = config_path(explicit)
    if alias not in load_config(explicit).hives:
        raise HiveNotFound(f"No hive {alias} in {path}.",
                           hint="See the configured hives with `rbee-keeper hive list`.")
    kept: list[str] = []
    skipping = False
    for line in path.read_text().splitlines(keepends=True):
        header = re.match(r"^\s*\[([^\]]+)\]\s*(#.*)?$", line)
        if header:
            skipping = header.group(1).strip() in (f"hives.{alias}", f'hives."{alias}"')
        if not skipping:
            kept.append(line)
    _write(path, "".join(kept))
    return path


_CATALOG_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}\Z")
_HEADER = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")


def model_aliases(explicit: str | None) -> dict[str, str]:
    """Each alias of the config file and the model it names."""
    return {name: m.ref for name, m in load_config(explicit).models.items() if m.ref is not None}


def set_model_alias(explicit: str | None, alias: str, ref: str | None) -> tuple[Path, str | None]:
    """Make `alias` name `ref` (a Hub reference in any spelling, kept as `hf:…`, or a catalog id),
    or forget it (`ref` None): the config file, and the model it now names."""
    if not ALIAS.match(alias):
        raise ValidationFailed(
            "A model alias is 1 to 64 letters, digits, '.', '_' and '-'.",
            hint="rbee-keeper model alias qwen hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
        )
    target = (hub_reference(ref) or ref) if ref is not None else None
    if target is not None and not (target.startswith("hf:") or _CATALOG_ID.match(target)):
        raise ValidationFailed(
            "An alias names a Hub model (hf:<org>/<repo>[:<quant>], hf.co/<org>/<repo>, or its "
            "https://huggingface.co/ address) or a catalog id.",
            hint=f"rbee-keeper model alias {alias} hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
        )
    path = config_path(explicit)
    if target is None and alias not in model_aliases(explicit):
        raise ModelNotFound(f"No model alias {alias} in {path}.",
                            hint="See the aliases with `rbee-keeper model alias`.")
    text = path.read_text() if path.is_file() else ""
    names = (f"models.{alias}", f'models."{alias}"')
    line = f"ref = {toml_value(target)}\n" if target is not None else ""
    kept: list[str] = []
    inside = found = False
    for row in text.splitlines(keepends=True):
        header = _HEADER.match(row)
        if header:
            inside = header.group(1).strip() in names
            if inside:
                found = True
                kept += [row if row.endswith("\n") else row + "\n", line]
                continue
        if not (inside and re.match(r"^\s*ref\s*=", row)):
            kept.append(row)
    if not found and line:
        kept += ["\n" if text and not text.endswith("\n\n") else "", f'[models."{alias}"]\n', line]
    if not line:  # a section left with nothing in it goes too
        kept = _without_empty_section(kept, names)
    _write(path, "".join(kept))
    try:
        load_config(str(path))  # what we wrote must load: a broken file is never left behind
    except ConfigError:
        _write(path, text)
        raise
    return path, target


def _without_empty_section(rows: list[str], names: tuple[str, ...]) -> list[str]:
    for start, row in enumerate(rows):
        header = _HEADER.match(row)
        if header and header.group(1).strip() in names:
            end = start + 1
            while end < len(rows) and not rows[end].strip():
                end += 1
            if end == len(rows) or _HEADER.match(rows[end]):
                return rows[:start] + rows[end:]
    return rows


def parse_ssh_config(text: str) -> dict[str, HiveEntry]:
    """Host blocks with one concrete alias each (no wildcards) as hive entries."""
    found: dict[str, dict[str, str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ") if " " in line else line.partition("=")
        key, value = key.strip().lower(), value.strip().strip("=").strip()
        if key == "host":
            current = [h for h in value.split() if ALIAS.match(h) and h != "localhost"]
            for alias in current:
                found.setdefault(alias, {})
        elif key == "match":
            current = []
        elif current and key in ("hostname", "user", "port", "identityfile"):
            for alias in current:
                found[alias].setdefault(key, value)
    entries = {}
    for alias, options in found.items():
        fields: dict[str, object] = {"host": options.get("hostname", alias)}
        if "user" in options:
            fields["ssh_user"] = options["user"]
        if options.get("port", "").isdigit():
            fields["ssh_port"] = int(options["port"])
        if "identityfile" in options:
            fields["identity_file"] = options["identityfile"]
        try:
            entries[alias] = msgspec.convert(fields, HiveEntry)
        except msgspec.ValidationError:
            continue
    return entries


def import_ssh(explicit: str | None, ssh_config: Path) -> tuple[list[str], list[str]]:
    """(added, skipped because already configured)."""
    if not ssh_config.is_file():
        raise ConfigError(f"There is no SSH config at {ssh_config}.",
                          hint="Pass its path: rbee-keeper hive import-ssh PATH")
    existing = load_config(explicit).hives
    added, skipped = [], []
    for alias, entry in parse_ssh_config(ssh_config.read_text()).items():
        if alias in existing:
            skipped.append(alias)
            continue
        add_hive(explicit, alias, entry)
        added.append(alias)
    return added, skipped

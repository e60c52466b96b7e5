"""The hive's settings: the `[hive]` section, with command-line overrides."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from rbee_common.config import HiveSettings, changed_fields, describe_source, load_config
from rbee_common.errors import ConfigError

log = logging.getLogger("rbee.hive.config")

RESTART_ONLY = frozenset({"host", "port", "hive_id", "queen_url", "data_dir", "metrics_public",
                          "allowed_hosts", "allowed_origins", "audit_key_file"})
"""Settings a running hive cannot change: SIGHUP logs that they wait for a restart."""


def load_hive_settings(path: str | None = None, **overrides: Any) -> HiveSettings:
    settings = load_config(path).hive
    given = {key: value for key, value in overrides.items() if value is not None}
    log.info("config_load %s", describe_source(path))
    return msgspec.structs.replace(settings, **given) if given else settings


def reload_hive_settings(
    current: HiveSettings, path: str | None, **overrides: Any
) -> tuple[HiveSettings, list[str], list[str]] | None:
    """SIGHUP: the settings from the file as it is now, with `current`'s fixed fields kept; and the
    changed fields (applied, and waiting for a restart). None for a broken file (logged)."""
    try:
        fresh = load_hive_settings(path, **overrides)
    except ConfigError as error:
        log.warning("config_reload failed: %s (nothing changed)%s", error.message,
                    f" (hint: {error.hint})" if error.hint else "")
        return None
    changed = changed_fields(current, fresh)
    restart = [name for name in changed if name in RESTART_ONLY]
    applied = [name for name in changed if name not in RESTART_ONLY]
    kept = msgspec.structs.replace(fresh, **{name: getattr(current, name) for name in RESTART_ONLY})
    log.info("config_reload %s changed=%s", describe_source(path),
             ",".join(f"hive.{name}" for name in applied) or "nothing")
    if restart:
        log.warning("config_reload: %s take effect at the next restart",
                    ",".join(f"hive.{name}" for name in restart))
    return kept, applied, restart

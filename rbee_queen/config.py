"""The queen's settings: the `[queen]` section, with command-line overrides."""

from __future__ import annotations

import logging

import msgspec

from rbee_common.auth import TokenSource, require_token_for_bind
from rbee_common.config import (
    HiveEntry,
    HiveSettings,
    ModelSettings,
    QueenSettings,
    RbeeConfig,
    changed_fields,
    describe_source,
    find_config_file,
    load_config,
)
from rbee_common.errors import ConfigError
from rbee_common.modelref import hub_reference
from rbee_hive.config import RESTART_ONLY as HIVE_RESTART_ONLY

log = logging.getLogger("rbee.queen.config")


def _stamp(path: str | None) -> int:
    """The config file's mtime (ns), 0 when there is none."""
    try:
        found = find_config_file(path)
        return found.stat().st_mtime_ns if found is not None else 0
    except (ConfigError, OSError):
        return 0

LOCALHOST_HIVE = HiveEntry(host="127.0.0.1")
"""`localhost` is always a hive, even when the config does not name it."""


RESTART_ONLY = frozenset({"host", "port", "local_hive", "metrics_public", "allowed_hosts", "allowed_origins",
                          "audit_key_file"})
"""[queen] settings a running queen cannot change: SIGHUP logs that they wait for a restart."""


class QueenConfig(msgspec.Struct, kw_only=True):
    settings: QueenSettings
    hives: dict[str, HiveEntry]
    hive: HiveSettings = msgspec.field(default_factory=HiveSettings)
    """The `[hive]` section: the in-process hive's settings under --local-hive."""
    models: dict[str, ModelSettings] = msgspec.field(default_factory=dict)
    """The `[models.<id>]` sections (`min_workers`)."""
    api_token: str | None = None
    """Wanted from clients on every endpoint but /health (`--api-token-file`, $RBEE_API_TOKEN)."""
    api_token_file: str | None = None
    """Where `api_token` came from, read again on SIGHUP."""
    config_path: str | None = None
    from_file: bool = False
    """Loaded from the config file, so `reload_hives` may read it again."""
    overrides: dict[str, object] = msgspec.field(default_factory=dict)
    """What the command line said (host, port, ...): it wins over the file on a reload too."""
    models_stamp: int = 0
    """The config file's mtime when `models` was read (`model_ref` reads it again when it changed)."""

    @classmethod
    def load(
        cls, path: str | None = None, *, host: str | None = None, port: int | None = None,
        local_hive: bool | None = None, api_token_file: str | None = None,
    ) -> QueenConfig:
        config: RbeeConfig = load_config(path)
        settings = config.queen
        if host is not None:
            settings = msgspec.structs.replace(settings, host=host)
        if port is not None:
            settings = msgspec.structs.replace(settings, port=port)
        if local_hive:
            settings = msgspec.structs.replace(settings, local_hive=True)
        hives = {"localhost": LOCALHOST_HIVE, **config.hives}
        token = TokenSource(api_token_file).current
        require_token_for_bind(settings.host, token, "queen-rbee")
        log.info("config_load %s hives=%d", describe_source(path), len(hives))
        return cls(settings=settings, hives=hives, hive=config.hive, models=dict(config.models),
                   api_token=token, config_path=path, models_stamp=_stamp(path),
                   from_file=True, api_token_file=api_token_file,
                   overrides={"host": host, "port": port, "local_hive": local_hive})

    def reload(self) -> tuple[list[str], list[str]] | None:
        """Read the config file again (SIGHUP): (changed keys applied, changed keys that wait for a
        restart), or None when the file is broken (logged; nothing changes)."""
        try:
            fresh = QueenConfig.load(self.config_path, api_token_file=self.api_token_file,
                                     **self.overrides)  # type: ignore[arg-type]
        except ConfigError as error:
            log.warning("config_reload failed: %s (nothing changed)%s", error.message,
                        f" (hint: {error.hint})" if error.hint else "")
            return None
        queen = changed_fields(self.settings, fresh.settings)
        hive = changed_fields(self.hive, fresh.hive)
        restart = [f"queen.{name}" for name in queen if name in RESTART_ONLY]
        restart += [f"hive.{name}" for name in hive if name in HIVE_RESTART_ONLY]
        applied = [f"queen.{name}" for name in queen if name not in RESTART_ONLY]
        applied += [f"hive.{name}" for name in hive if name not in HIVE_RESTART_ONLY]
        keep = {name: getattr(self.settings, name) for name in RESTART_ONLY}
        self.settings = msgspec.structs.replace(fresh.settings, **keep)
        self.hive = msgspec.structs.replace(
            fresh.hive, **{name: getattr(self.hive, name) for name in HIVE_RESTART_ONLY})
        changed_hives = sorted(alias for alias in set(self.hives) | set(fresh.hives)
                               if self.hives.get(alias) != fresh.hives.get(alias))
        self.hives.clear()
        self.hives.update(fresh.hives)
        applied += [f"hives.{alias}" for alias in changed_hives]
        applied += [f"models.{name}" for name in sorted(set(self.models) | set(fresh.models))
                    if self.models.get(name) != fresh.models.get(name)]
        self.models = fresh.models
        log.info("config_reload %s changed=%s", describe_source(self.config_path),
                 ",".join(applied) or "nothing")
        if restart:
            log.warning("config_reload: %s take effect at the next restart", ",".join(restart))
        return applied, restart

    def model_ref(self, name: str) -> str:
        """The model a requested name stands for: an alias's `ref` (`[models.<alias>]`; the file is
        read again when it changed, so `rbee-keeper model alias` needs no restart), else the name."""
        stamp = _stamp(self.config_path) if name not in self.models and self.from_file else self.models_stamp
        if stamp != self.models_stamp:
            self.models_stamp = stamp
            try:
                self.models = dict(load_config(self.config_path).models)
            except ConfigError as error:
                log.warning("config not reloaded: %s", error.message)
        settings = self.models.get(name)
        ref = settings.ref if settings is not None else None
        return (hub_reference(ref) or ref) if ref else name

    def reload_hives(self) -> None:
        """The `[hives.*]` of the config file as it is now, in place (a broken file changes nothing)."""
        if not self.from_file:
            return
        try:
            fresh = {"localhost": LOCALHOST_HIVE, **load_config(self.config_path).hives}
        except ConfigError as error:
            log.warning("config not reloaded: %s", error.message)
            return
        self.hives.clear()
        self.hives.update(fresh)

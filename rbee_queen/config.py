"""The queen's settings: the `[queen]` section, with command-line overrides."""

from __future__ import annotations

import logging

import msgspec

from rbee_common.auth import TokenSource, require_token_for_bind
from rbee_common.config import HiveEntry, HiveSettings, QueenSettings, RbeeConfig, load_config
from rbee_common.errors import ConfigError

log = logging.getLogger("rbee.queen.config")

LOCALHOST_HIVE = HiveEntry(host="127.0.0.1")
"""`localhost` is always a hive, even when the config does not name it."""


class QueenConfig(msgspec.Struct, frozen=True, kw_only=True):
    settings: QueenSettings
    hives: dict[str, HiveEntry]
    hive: HiveSettings = msgspec.field(default_factory=HiveSettings)
    """The `[hive]` section: the in-process hive's settings under --local-hive."""
    api_token: str | None = None
    """Wanted from clients on every endpoint but /health (`--api-token-file`, $RBEE_API_TOKEN)."""
    api_token_file: str | None = None
    """Where `api_token` came from, read again on SIGHUP."""
    config_path: str | None = None
    from_file: bool = False
    """Loaded from the config file, so `reload_hives` may read it again."""

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
        return cls(settings=settings, hives=hives, hive=config.hive, api_token=token, config_path=path,
                   from_file=True, api_token_file=api_token_file)

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

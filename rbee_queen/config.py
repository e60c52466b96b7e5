"""The queen's settings: the `[queen]` section, with command-line overrides."""

from __future__ import annotations

import msgspec

from rbee_common.config import HiveEntry, HiveSettings, QueenSettings, RbeeConfig, load_config

LOCALHOST_HIVE = HiveEntry(host="127.0.0.1")
"""`localhost` is always a hive, even when the config does not name it."""


class QueenConfig(msgspec.Struct, frozen=True, kw_only=True):
    settings: QueenSettings
    hives: dict[str, HiveEntry]
    hive: HiveSettings = msgspec.field(default_factory=HiveSettings)
    """The `[hive]` section: the in-process hive's settings under --local-hive."""

    @classmethod
    def load(
        cls, path: str | None = None, *, host: str | None = None, port: int | None = None,
        local_hive: bool | None = None,
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
        return cls(settings=settings, hives=hives, hive=config.hive)

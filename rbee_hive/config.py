"""The hive's settings: the `[hive]` section, with command-line overrides."""

from __future__ import annotations

from typing import Any

import msgspec

from rbee_common.config import HiveSettings, load_config


def load_hive_settings(path: str | None = None, **overrides: Any) -> HiveSettings:
    settings = load_config(path).hive
    given = {key: value for key, value in overrides.items() if value is not None}
    return msgspec.structs.replace(settings, **given) if given else settings

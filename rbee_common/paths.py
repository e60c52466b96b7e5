"""Where rbee keeps things (XDG): standard library only, so that `rbee_common.llama_build` runs in
a venv that holds nothing else yet."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "rbee"


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "rbee"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "rbee"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "rbee"

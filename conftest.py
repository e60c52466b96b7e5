"""Fixtures for both suites (tests/ and bdd/)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test reads the operator's config or writes into their home."""
    for name in ("config", "state", "data", "cache"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"XDG_{name.upper()}_HOME", str(tmp_path / name))
    for name in list(os.environ):
        if name.startswith("RBEE_"):
            monkeypatch.delenv(name)
    yield tmp_path


@pytest.fixture(scope="session")
def tiny_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight MLX model with a real tokenizer, made once per run."""
    from harness.tiny_mlx import make_tiny_mlx_model

    return make_tiny_mlx_model(tmp_path_factory.mktemp("mlx") / "tiny-llama")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels `hive install` and ansible/site.yml upload, built once per run (pip's cache helps)."""
    from harness.fleet import build_wheelhouse

    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse") / "wh")

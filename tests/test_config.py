"""Config loading: where the file is found, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_common.config import HiveEntry, HiveSettings, load_config, toml_section
from rbee_common.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_when_no_file_exists(isolated_dirs: Path) -> None:
    config = load_config(environ={})
    assert config.queen.port == 8500
    assert config.queen.host == "127.0.0.1"
    assert config.keeper.queen_url == "http://127.0.0.1:8500"
    assert config.hives == {}


def test_xdg_config_file_is_read(isolated_dirs: Path) -> None:
    write(isolated_dirs / "config/rbee/config.toml", '[queen]\nport = 8601\n[hives.gpu-1]\nhost = "10.0.0.5"\n')
    config = load_config(environ={})
    assert config.queen.port == 8601
    assert config.hives["gpu-1"].host == "10.0.0.5"
    assert config.hives["gpu-1"].hive_port == 9000


def test_rbee_config_wins_over_xdg(isolated_dirs: Path) -> None:
    write(isolated_dirs / "config/rbee/config.toml", "[queen]\nport = 8601\n")
    chosen = write(isolated_dirs / "elsewhere.toml", "[queen]\nport = 8602\n")
    assert load_config(environ={"RBEE_CONFIG": str(chosen)}).queen.port == 8602


def test_explicit_path_wins_over_rbee_config(isolated_dirs: Path) -> None:
    env_file = write(isolated_dirs / "env.toml", "[queen]\nport = 8602\n")
    explicit = write(isolated_dirs / "explicit.toml", "[queen]\nport = 8603\n")
    assert load_config(explicit, environ={"RBEE_CONFIG": str(env_file)}).queen.port == 8603


def test_missing_rbee_config_file_is_an_error(isolated_dirs: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist") as caught:
        load_config(environ={"RBEE_CONFIG": str(isolated_dirs / "nope.toml")})
    assert "RBEE_CONFIG" in caught.value.message


def test_unknown_key_names_key_and_file(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", "[queen]\nprot = 8500\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "`queen.prot`" in caught.value.message
    assert str(path) in caught.value.message
    assert "port" in (caught.value.hint or "")


def test_unknown_section_names_it(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", "[qeen]\nport = 8500\n")
    with pytest.raises(ConfigError, match=r"`qeen`"):
        load_config(path, environ={})


def test_unknown_key_in_a_hive_names_the_hive(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", '[hives.gpu-1]\nhost = "h"\nssh_prot = 22\n')
    with pytest.raises(ConfigError, match=r"`hives.gpu-1.ssh_prot`"):
        load_config(path, environ={})


def test_wrong_type_names_the_key(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", '[queen]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"`queen.port`") as caught:
        load_config(path, environ={})
    assert "eighty" not in caught.value.message


def test_invalid_toml_names_the_file(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", "[queen\nport = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML") as caught:
        load_config(path, environ={})
    assert str(path) in caught.value.message


def test_environment_overrides_the_file(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", "[queen]\nport = 8601\nmax_live_jobs = 3\n")
    config = load_config(path, environ={"RBEE_QUEEN__PORT": "8700", "RBEE_QUEEN_URL": "http://q:1"})
    assert config.queen.port == 8700
    assert config.queen.max_live_jobs == 3
    assert config.keeper.queen_url == "http://q:1"


def test_unknown_environment_key_names_the_variable(isolated_dirs: Path) -> None:
    with pytest.raises(ConfigError, match=r"RBEE_QUEEN__PROT"):
        load_config(environ={"RBEE_QUEEN__PROT": "1"})


def test_bad_environment_value_is_an_error(isolated_dirs: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment") as caught:
        load_config(environ={"RBEE_QUEEN__PORT": "many"})
    assert "queen.port" in caught.value.message


def test_bad_hive_alias_is_rejected(isolated_dirs: Path) -> None:
    path = write(isolated_dirs / "c.toml", '[hives."bad alias"]\nhost = "h"\n')
    with pytest.raises(ConfigError):
        load_config(path, environ={})


@pytest.mark.parametrize("section", [
    HiveSettings(host="10.231.0.5", port=9100, hive_id="gpu-1", data_dir="/srv/rbee data", model_roots=["/m", "/n"]),
    HiveSettings(),
    HiveEntry(host="gpu-1", ssh_user="bee", install_dir='/opt/"rbee"\\hive', host_key_policy="accept-new"),
])
def test_a_section_written_from_its_schema_loads_back_the_same(isolated_dirs: Path, section: object) -> None:
    """What `hive add` and `hive install` write: every field off its default, read back unchanged."""
    assert isinstance(section, HiveSettings | HiveEntry)
    name = "hive" if isinstance(section, HiveSettings) else "hives.gpu-1"
    path = isolated_dirs / "written.toml"
    path.write_text(toml_section(name, section))
    loaded = load_config(str(path))
    assert (loaded.hive if isinstance(section, HiveSettings) else loaded.hives["gpu-1"]) == section


def test_metrics_public_waits_for_a_restart(tmp_path: Path) -> None:
    """A SIGHUP cannot open /metrics to everyone: the routes' auth is set at start, so the setting
    is kept, and the log says it waits for a restart."""
    from rbee_hive.config import reload_hive_settings

    config = tmp_path / "config.toml"
    config.write_text("[hive]\nmetrics_public = true\nworker_ctx = 4096\n")
    reloaded = reload_hive_settings(HiveSettings(), str(config))
    assert reloaded is not None
    kept, applied, restart = reloaded
    assert restart == ["metrics_public"] and kept.metrics_public is False
    assert applied == ["worker_ctx"] and kept.worker_ctx == 4096

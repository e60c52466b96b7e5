"""The Ansible role's templates quote every value (security review): hostile inventory values stay inert."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import jinja2
from ansible.plugins.filter.core import FilterModule

TEMPLATES = Path(__file__).parent.parent / "ansible" / "roles" / "rbee_hive" / "templates"


def render(name: str, **values: object) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined)
    environment.filters.update(FilterModule().filters())
    return environment.get_template(name).render(**values)


def test_hive_toml_reads_back_the_exact_values_however_hostile() -> None:
    hostile = 'h"\n[evil]\nx = 1 #'
    text = render("hive.toml.j2", rbee_hive_host=hostile, rbee_hive_port="9000", rbee_hive_id='a"b',
                  rbee_dir='/opt/x"\n', rbee_queen_url='http://q"\n[more]')
    parsed = tomllib.loads(text)
    assert list(parsed) == ["hive"]  # no table was injected
    assert parsed["hive"] == {"host": hostile, "port": 9000, "hive_id": 'a"b', "data_dir": '/opt/x"\n/data',
                              "queen_url": 'http://q"\n[more]'}


def test_the_control_script_does_not_run_what_a_path_holds(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = f"{tmp_path}/hive $(touch {marker}) `touch {marker}`; touch {marker}"
    script = tmp_path / "rbee-hive-ctl"
    script.write_text(render("rbee-hive-ctl.sh.j2", rbee_dir=folder))
    result = subprocess.run(["sh", str(script), "status"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 1  # not running: no pid file in that (odd, but literal) folder
    assert not marker.exists()


def test_the_systemd_unit_runs_unprivileged_and_confined() -> None:
    unit = render("rbee-hive.service.j2", rbee_hive_id="gpu-1", rbee_dir="/var/lib/rbee/hive",
                  rbee_service_user="rbee", rbee_state_dir="/var/lib/rbee/state")
    lines = set(unit.splitlines())
    for wanted in ("User=rbee", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                   'ReadWritePaths="/var/lib/rbee/hive" "/var/lib/rbee/state"'):
        assert wanted in lines
    assert 'ExecStart="/var/lib/rbee/hive/venv/bin/rbee-hive" --config "/var/lib/rbee/hive/hive.toml"' in unit

"""ansible/site.yml rolls hives out to namespace hosts; a second run changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import netns
from harness.helpers import BIN, daemon
from rbee_common.config import load_config

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netns.Fleet]:
    with netns.fleet(2, tmp_path_factory.mktemp("ansible-fleet")) as made:
        yield made


def inventory(fleet: netns.Fleet, root: Path, wheelhouse: Path) -> Path:
    python = Path(sys.base_prefix) / "bin" / "python3"  # the hosts share this box's Python (>= 3.11)
    lines = ["[rbee_hives]"]
    lines += [f"{h.name} ansible_host={h.address}" for h in fleet.hosts]
    lines += [
        "", "[rbee_hives:vars]", "ansible_user=root",
        f"ansible_ssh_private_key_file={fleet.client_key}",
        f"ansible_ssh_common_args='-o UserKnownHostsFile={fleet.known_hosts} -o StrictHostKeyChecking=yes'",
        f"ansible_python_interpreter={python}",
        f"rbee_wheelhouse={wheelhouse}",
        f"rbee_queen_url=http://{fleet.gateway}:8500",
        f"rbee_python={python}",
        "rbee_service_mode=background",
        f"rbee_install_dir={root}/remote/{{{{ inventory_hostname }}}}/rbee",
        "rbee_hive_port=9100",
        "", "[all:vars]",
        f"rbee_queen_config={root}/queen.toml",
        f"rbee_token_dir={root}/tokens",
    ]
    path = root / "inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def playbook(path: Path, root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ, "ANSIBLE_HOME": str(root / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp"),
        "ANSIBLE_REMOTE_TMP": str(root / "ansible-remote-tmp"), "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_PIPELINING": "1",
    }
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(path), str(ROOT / "ansible" / "site.yml")],
        capture_output=True, text=True, env=env, timeout=900,
    )


def recap(output: str) -> dict[str, dict[str, int]]:
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, flags=re.MULTILINE):
        found[host] = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counts)}
    return found


def test_site_yml_installs_and_starts_hives_and_a_second_run_changes_nothing(
    hosts: netns.Fleet, wheelhouse: Path, tmp_path: Path
) -> None:
    path = inventory(hosts, tmp_path, wheelhouse)
    first = playbook(path, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    counts = recap(first.stdout)
    assert counts["h1"]["changed"] > 0 and counts["h2"]["changed"] > 0, counts
    assert counts["h1"]["failed"] == 0 and counts["h2"]["failed"] == 0

    for host in hosts.hosts:
        health = httpx.get(f"http://{host.address}:9100/health", timeout=5).json()
        assert health["status"] == "ok" and health["hive_id"] == host.name
        token = tmp_path / "tokens" / f"{host.name}.token"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        remote = tmp_path / "remote" / host.name / "rbee" / "hive.token"
        assert oct(remote.stat().st_mode & 0o777) == "0o600"
        assert remote.read_text().strip() == token.read_text().strip()
        # the hive wants its token
        assert httpx.get(f"http://{host.address}:9100/v1/capabilities", timeout=5).status_code == 401
        answer = httpx.get(f"http://{host.address}:9100/v1/capabilities", timeout=5,
                           headers={"Authorization": f"Bearer {token.read_text().strip()}"})
        assert answer.status_code == 200

    # the queen's config got an entry per hive, and it loads
    config = load_config(tmp_path / "queen.toml")
    assert sorted(config.hives) == ["h1", "h2"]
    assert config.hives["h1"].token_file == str(tmp_path / "tokens" / "h1.token")

    second = playbook(path, tmp_path)
    assert second.returncode == 0, second.stdout[-4000:]
    assert all(c["changed"] == 0 for c in recap(second.stdout).values()), second.stdout[-6000:]

    # a queen with that config reaches the hives with their tokens
    token = tmp_path / "queen.token"
    token.write_text("queen-token-for-the-ansible-test\n")
    token.chmod(0o600)
    queen_env = {**os.environ, "RBEE_CONFIG": str(tmp_path / "queen.toml")}
    with daemon([str(BIN / "queen-rbee"), "--host", hosts.gateway, "--port", "0", "--api-token-file", str(token)],
                env=queen_env) as queen:
        status = subprocess.run(
            [str(BIN / "rbee-keeper"), "--queen-url", queen.url, "hive", "refresh", "h2"],
            capture_output=True, text=True, timeout=60,
            env={**queen_env, "RBEE_API_TOKEN": "queen-token-for-the-ansible-test"},
        )
        assert status.returncode == 0, status.stderr
        assert '"hive_id":"h2"' in status.stdout

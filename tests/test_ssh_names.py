"""SSH as OpenSSH does it, against a real sshd on loopback: the local user when none is
given, hosts by name under both host-key policies, and ~/.ssh/config aliases.

The queen runs with HOME pointing at a folder of the test's, so its default key
(~/.ssh/id_ed25519) and ~/.ssh/config are the test's, as an operator's would be.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import netns
from harness.helpers import BIN, daemon, free_port, job_result, port_open, wait_for

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))


def keygen(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    root: Path
    port: int

    def host_key(self) -> str:
        """`ssh-ed25519 AAAA...`: the server's key, for a known_hosts line."""
        return " ".join((self.root / "host_key.pub").read_text().split()[:2])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    root = tmp_path_factory.mktemp("sshd")
    keygen(root / "host_key")
    port = free_port()
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
        f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", "",
    ]))
    (root / "authorized_keys").write_text("")
    Path("/run/sshd").mkdir(exist_ok=True)
    with open(root / "sshd.log", "wb") as log:
        process = subprocess.Popen([netns.SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        assert wait_for(lambda: port_open(port), timeout=10), (root / "sshd.log").read_text()
        yield Sshd(root, port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class Operator:
    """One test's machine: HOME (keys, ~/.ssh/config), XDG dirs, the rbee config file."""

    home: Path
    env: dict[str, str]
    known_hosts: Path

    def keeper(self, *args: str, queen_url: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "rbee-keeper"), *(["--queen-url", queen_url] if queen_url else []), *args]
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=120)


@pytest.fixture
def operator(sshd: Sshd, tmp_path: Path) -> Operator:
    home = tmp_path / "home"
    public = keygen(home / ".ssh" / "id_ed25519")  # the default key: no identity_file anywhere
    with open(sshd.root / "authorized_keys", "a") as keys:
        keys.write(public + "\n")
    known = tmp_path / "known_hosts"
    config = tmp_path / "rbee.toml"
    config.write_text(f'[queen]\nknown_hosts = "{known}"\n')
    env = {"HOME": str(home), "RBEE_CONFIG": str(config),
           **{f"XDG_{p}_HOME": str(tmp_path / p.lower()) for p in ("STATE", "DATA", "CONFIG", "CACHE")}}
    return Operator(home, env, known)


def ssh_test(operator: Operator, alias: str) -> subprocess.CompletedProcess[str]:
    with daemon([str(BIN / "queen-rbee"), "--port", "0"], env=operator.env) as queen:
        return operator.keeper("hive", "ssh-test", alias, queen_url=queen.url)


@pytest.mark.parametrize("policy", ["accept-new", "strict"])
def test_a_hive_added_by_name_and_without_a_user_passes_ssh_test(
    sshd: Sshd, operator: Operator, policy: str,
) -> None:
    if policy == "strict":  # known by its address only: `ssh` matches the name's address too
        operator.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key()}\n")
    added = operator.keeper("hive", "add", "lo", "--host", "localhost", "--ssh-port", str(sshd.port),
                            "--host-key-policy", policy)
    assert added.returncode == 0, added.stderr

    done = ssh_test(operator, "lo")

    assert done.returncode == 0, done.stderr
    assert f"Connecting to lo (localhost:{sshd.port})" in done.stdout + done.stderr
    assert "`echo test` answered 'test'" in done.stdout + done.stderr
    if policy == "accept-new":  # no known_hosts file at all: the first key is recorded in a new one
        assert operator.known_hosts.read_text() == f"[localhost]:{sshd.port} {sshd.host_key()}\n"
    assert getpass.getuser() == "root"  # the local user, as `ssh localhost` would log in


def test_a_host_alias_from_ssh_config_works(sshd: Sshd, operator: Operator) -> None:
    (operator.home / ".ssh" / "id_ed25519").unlink()  # only the config's IdentityFile can log in
    public = keygen(operator.home / ".ssh" / "lab_key")
    with open(sshd.root / "authorized_keys", "a") as keys:
        keys.write(public + "\n")
    (operator.home / ".ssh" / "config").write_text(
        f"Host gpu-node-1\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        "  IdentityFile ~/.ssh/lab_key\n")
    operator.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key()}\n")
    added = operator.keeper("hive", "add", "gpu-node-1", "--host", "gpu-node-1")
    assert added.returncode == 0, added.stderr

    with daemon([str(BIN / "queen-rbee"), "--port", "0"], env=operator.env) as queen:
        done = operator.keeper("hive", "ssh-test", "gpu-node-1", queen_url=queen.url)
        shown = job_result(queen.url, {"operation": "hive_get", "hive_id": "gpu-node-1"})

    assert done.returncode == 0, done.stderr
    assert "`echo test` answered 'test'" in done.stdout + done.stderr
    assert isinstance(shown, dict)
    assert shown["url"] == "http://127.0.0.1:9000"  # HTTP goes where SSH went: the alias's HostName

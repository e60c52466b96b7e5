"""Several "machines" on one box: network namespaces, each with its own sshd.

`fleet(n, root)` makes a bridge in the root namespace (10.231.S.1/24) and n
namespaces, each joined to it by a veth pair (host i at 10.231.S.(10+i)) and
running a private OpenSSH `sshd` (own config, host key and authorized key; it
lets in root with the fleet's client key). Everything it made is removed on
exit, whatever happened: every process inside each namespace is killed (the
sshd, and any session or hive it started), then the namespaces and the bridge
are deleted. Needs root, `ip` and `/usr/sbin/sshd`.

The namespaces share the filesystem with the test; only the network is
theirs. So a process started over SSH on host h1 runs in h1's namespace, which
`netns_of(pid)` tells.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
PREFIX = "rbee-t"


@dataclass
class Host:
    name: str
    netns: str
    address: str
    dir: Path
    veth: str = ""
    """Our end of its veth pair (in the root namespace)."""
    sshd: subprocess.Popen[bytes] | None = None

    def host_key_line(self) -> str:
        """This host's known_hosts line."""
        kind, key = (self.dir / "host_key.pub").read_text().split()[:2]
        return f"{self.address} {kind} {key}"

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def sshd_log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Fleet:
    hosts: list[Host]
    gateway: str
    """The root namespace's address on the bridge: where the hosts reach the queen."""
    client_key: Path
    other_key: Path
    """A valid key that no host accepts."""
    known_hosts: Path


def available() -> str | None:
    """None when fleets can be made here; else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not (shutil.which("ip") and os.path.exists(SSHD) and shutil.which("ssh-keygen")):
        return "needs iproute2 and openssh-server"
    return None


def fleet_mark() -> pytest.MarkDecorator:
    """Skip the fleet tests where fleets cannot be made, unless `RBEE_REQUIRE_FLEET` is set (CI sets
    it when it runs as root with sshd): then a missing piece fails the run instead of skipping it."""
    reason = available()
    if reason is not None and os.environ.get("RBEE_REQUIRE_FLEET"):
        raise RuntimeError(f"RBEE_REQUIRE_FLEET is set, but the fleet tests cannot run: {reason}")
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True, capture_output=True,
    )
    path.chmod(0o600)


def _subnet() -> int:
    """A 10.231.S.0/24 that no interface here uses yet."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    start = secrets.randbelow(200)
    for offset in range(200):
        subnet = 20 + (start + offset) % 200
        if f"10.231.{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.231.x.0/24 subnet")


def _wait_port(address: str, port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd on {address} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on {address}:{port} did not listen within {timeout} s")


def _sshd_config(host: Host, authorized: Path, env: dict[str, str]) -> str:
    return "\n".join([
        *(f"SetEnv {name}={value}" for name, value in env.items()),
        "Port 22",
        f"ListenAddress {host.address}",
        f"HostKey {host.dir / 'host_key'}",
        f"PidFile {host.dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "MaxStartups 50",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ])


def _remove_host(host: Host) -> None:
    for _ in range(3):  # sessions may fork while we kill; go round until none is left
        pids = host.pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if host.sshd is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.sshd.wait(5)
    if host.veth:  # now, not when the kernel finally frees the namespace
        subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
    subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)


@contextlib.contextmanager
def fleet(
    count: int, root: Path, env: Callable[[str], dict[str, str]] = lambda gateway: {},
) -> Iterator[Fleet]:
    """`count` namespace hosts with sshd, removed on exit; `env(gateway)`: variables every SSH
    session (and so every hive started over SSH) gets, given the root namespace's address."""
    subnet = _subnet()
    # Fresh names every time: a deleted namespace lingers in the kernel while its sockets
    # time out, and with it the old veth pair, so reusing a name would collide.
    tag = secrets.token_hex(3)
    bridge = f"rbbr{tag}"
    root.mkdir(parents=True, exist_ok=True)
    client_key, other_key = root / "client_key", root / "other_key"
    _keygen(client_key)
    _keygen(other_key)
    authorized = root / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    hosts: list[Host] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.231.{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for index in range(1, count + 1):
            host = Host(
                name=f"h{index}", netns=f"{PREFIX}{tag}-h{index}",
                address=f"10.231.{subnet}.{10 + index}", dir=root / f"h{index}",
            )
            hosts.append(host)
            host.dir.mkdir()
            _ip("netns", "add", host.netns)
            outside, inside = f"rbv{tag}h{index}", f"rbi{tag}h{index}"
            host.veth = outside
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host.netns)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("-n", host.netns, "link", "set", inside, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _keygen(host.dir / "host_key")
            config = host.dir / "sshd_config"
            config.write_text(_sshd_config(host, authorized, env(f"10.231.{subnet}.1")))
            with open(host.dir / "sshd.log", "wb") as log:
                host.sshd = subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
            _wait_port(host.address, 22, host.sshd)
        known_hosts = root / "known_hosts"
        known_hosts.write_text("".join(h.host_key_line() + "\n" for h in hosts))
        yield Fleet(hosts=hosts, gateway=f"10.231.{subnet}.1", client_key=client_key,
                    other_key=other_key, known_hosts=known_hosts)
    finally:
        for host in hosts:
            _remove_host(host)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)

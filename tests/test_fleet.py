"""Hives over SSH on namespace hosts: install, start, spawn, infer, and the SIGKILL cascade.

Each host is a network namespace with its own sshd (harness/netns.py); the
queen runs in the root namespace on the bridge address, with a token, as an
operator would run it for a fleet. Everything goes through `rbee-keeper`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import netns
from harness.fake_hf import FakeHub
from harness.fleet import TOKEN, Site, altered_wheelhouse, make_site
from harness.helpers import BIN, gone, wait_for

pytestmark = netns.fleet_mark()


HUB_REPO, HUB_FILE, HUB_SIZE = "test-org/tiny-GGUF", "tiny.Q4_K_M.gguf", 3_000_000


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The fake Hub, on every address of the root namespace: the hosts reach it over the bridge."""
    with FakeHub(tmp_path_factory.mktemp("hub"), host="0.0.0.0") as running:
        running.add_file(HUB_REPO, HUB_FILE, os.urandom(HUB_SIZE))
        yield running


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[netns.Fleet]:
    with netns.fleet(2, tmp_path_factory.mktemp("fleet"),
                     env=lambda gateway: {"HF_ENDPOINT": f"http://{gateway}:{hub.port}"}) as made:
        yield made


@pytest.fixture
def site(hosts: netns.Fleet, wheelhouse: Path, tmp_path: Path) -> Site:
    return make_site(hosts, tmp_path / "site", wheelhouse)


@pytest.fixture(scope="module")
def installed_site(
    hosts: netns.Fleet, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Site, dict[str, subprocess.CompletedProcess[str]]]:
    """A site with h1 and h2 installed, both at once as an operator with a fleet would, and the two
    installs' outcomes. The install is the slow part (about 40 s): the two tests that need installed
    hives share it."""
    site = make_site(hosts, tmp_path_factory.mktemp("installed") / "site", wheelhouse)
    site.add_hive("h1", site.host("h1"))
    site.add_hive("h2", site.host("h2"))
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    with site.queen():
        threads = [threading.Thread(target=lambda a=alias: results.__setitem__(a, site.keeper("hive", "install", a)))
                   for alias in ("h1", "h2")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return site, results


def rbee_processes(host: netns.Host) -> dict[int, str]:
    """Our programs running inside the host's namespace: pid -> which."""
    found = {}
    for pid in host.pids():
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        for program in ("rbee-hive", "llm-worker-rbee"):
            if f"bin/{program}" in cmdline:
                found[pid] = program
        if "-m rbee_worker.rpc_server" in cmdline:
            found[pid] = "rpc-server"
    return found


def installed(site: Site, alias: str) -> bool:
    return (site.root / "xdg-state" / "rbee" / "hives" / alias / "install.json").exists()


def install_fails(site: Site, alias: str) -> str:
    """`hive install alias` fails cleanly and records nothing; its stderr."""
    with site.queen():
        done = site.keeper("hive", "install", alias)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert not installed(site, alias)
    return done.stderr


def test_install_start_spawn_infer_on_two_hosts_then_sigkill_the_queen(
    installed_site: tuple[Site, dict[str, subprocess.CompletedProcess[str]]], hub: FakeHub,
) -> None:
    site, results = installed_site
    h1, h2 = site.host("h1"), site.host("h2")
    for alias in ("h1", "h2"):
        assert results[alias].returncode == 0, results[alias].stderr
        assert "Uploading" in results[alias].stderr and "the same as this queen" in results[alias].stderr
        assert installed(site, alias)
    record = json.loads(results["h1"].stdout)
    token = Path(record["install_dir"]) / "hive.token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    queen_side = site.root / "xdg-state" / "rbee" / "hives" / "h1" / "token"
    assert oct(queen_side.stat().st_mode & 0o777) == "0o600"
    assert queen_side.read_text() == token.read_text()
    with site.queen() as queen:
        for alias in ("h1", "h2"):
            started = site.keeper("hive", "start", alias)
            assert started.returncode == 0, started.stderr
        status = site.keeper("hive", "status", "h1")
        assert status.returncode == 0, status.stderr
        health = json.loads(status.stdout)
        assert health["reachable"] and health["installed"] and health["attached"], health
        import httpx

        page = httpx.get(f"{health['url']}/ui/hive.js", timeout=5)  # the wheel ships the web UI
        assert page.status_code == 200 and "text/javascript" in page.headers["content-type"], page.status_code

        spawned = site.keeper("worker", "spawn", "--hive", "h1", "--model", "smollm2-135m", "--threads", "1")
        assert spawned.returncode == 0, spawned.stderr
        on_h1 = rbee_processes(h1)
        assert sorted(on_h1.values()) == ["llm-worker-rbee", "rbee-hive"], on_h1
        for pid in on_h1:
            assert netns.netns_of(pid) == netns.netns_inode(h1.netns)  # it runs on "machine" h1
        assert sorted(rbee_processes(h2).values()) == ["rbee-hive"]

        answer = site.keeper("infer", "--hive", "h1", "--max-tokens", "8", "--temperature", "0", "Say hi")
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip(), "no tokens came back"

        # the worker's API wants the hive's token: the network cannot use it without one
        worker_url = spawned.stdout.split()[3]
        assert httpx.get(f"{worker_url}/v1/ready", timeout=5).status_code == 401

        # a model h1 downloads from the Hub, h2 copies from h1 across the bridge: no Hub request
        got = site.keeper("model", "download", f"hf:{HUB_REPO}", "--hive", "h1")
        assert got.returncode == 0, got.stderr
        asked = len(hub.requests)
        copied = site.keeper("model", "download", f"hf:{HUB_REPO}", "--hive", "h2")
        assert copied.returncode == 0, copied.stderr
        assert "from hive h1 instead of the Hub" in copied.stderr and len(hub.requests) == asked
        on_h2 = Path(copied.stdout.split()[-1])
        assert on_h2.read_bytes() == (hub.root / HUB_REPO / HUB_FILE).read_bytes()

        ours = {**on_h1, **rbee_processes(h2)}
        os.kill(queen.process.pid, signal.SIGKILL)
        began = time.monotonic()
        assert wait_for(lambda: all(gone(pid) for pid in ours), timeout=5.0), {
            pid: program for pid, program in ours.items() if not gone(pid)}
        print(f"hives and worker gone {time.monotonic() - began:.2f} s after SIGKILL of the queen")


def listening(host: netns.Host) -> list[tuple[str, int, int | None]]:
    """The TCP sockets listening in the host's namespace: (address, port, pid)."""
    done = subprocess.run(["ip", "netns", "exec", host.netns, "ss", "-ltnpH"], capture_output=True,
                          text=True, check=True)
    found = []
    for line in done.stdout.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        pid = re.search(r"pid=(\d+)", line)
        found.append((address.strip("[]"), int(port), int(pid.group(1)) if pid else None))
    return found


def test_a_model_split_over_two_hives_through_ssh_tunnels(
    installed_site: tuple[Site, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    """llama.cpp's RPC backend: h1's worker keeps part of the layers on h2's CPU, through tunnels the
    queen holds; the rpc server listens on h2's loopback only."""
    site, results = installed_site
    assert all(results[alias].returncode == 0 for alias in ("h1", "h2")), results
    h1, h2 = site.host("h1"), site.host("h2")
    greedy = ("infer", "--hive", "h1", "--max-tokens", "24", "--temperature", "0", "Why is the sky blue?")
    with site.queen() as queen:
        for alias in ("h1", "h2"):
            assert site.keeper("hive", "start", alias).returncode == 0
        whole = site.keeper("worker", "spawn", "--hive", "h1", "--model", "smollm2-135m", "--threads", "1")
        assert whole.returncode == 0, whole.stderr
        unsplit = site.keeper(*greedy)
        assert unsplit.returncode == 0 and unsplit.stdout.strip(), unsplit.stderr
        assert site.keeper("worker", "stop", whole.stdout.split()[0], "--hive", "h1").returncode == 0

        spawned = site.keeper("worker", "spawn", "--hive", "h1", "--helper", "h2", "--model", "smollm2-135m",
                              "--threads", "1")
        assert spawned.returncode == 0, spawned.stderr
        assert "Splitting smollm2-135m over 2 hives by free memory" in spawned.stderr, spawned.stderr
        assert "(part of its layers on h2)" in spawned.stdout
        split = site.keeper(*greedy)
        assert split.returncode == 0, split.stderr
        assert split.stdout == unsplit.stdout  # greedy: the same tokens, whichever machine ran a layer

        # The rpc server listens on h2's loopback only, and the tunnel's end on h1's loopback only.
        (rpc_pid,) = [pid for pid, program in rbee_processes(h2).items() if program == "rpc-server"]
        rpc_sockets = [(a, port) for a, port, pid in listening(h2) if pid == rpc_pid]
        assert rpc_sockets and all(a == "127.0.0.1" for a, _ in rpc_sockets), listening(h2)
        (worker_pid,) = [pid for pid, program in rbee_processes(h1).items() if program == "llm-worker-rbee"]
        cmdline = psutil.Process(worker_pid).cmdline()
        endpoint = cmdline[cmdline.index("--rpc") + 1]
        tunnel_port = int(endpoint.rpartition(":")[2])
        assert [a for a, port, _ in listening(h1) if port == tunnel_port] == ["127.0.0.1"], listening(h1)
        for address, port in [(h2.address, rpc_sockets[0][1]), (h1.address, tunnel_port)]:
            reach = subprocess.run(["ip", "netns", "exec", h1.netns if address == h2.address else h2.netns,
                                    "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"], capture_output=True)
            assert reach.returncode != 0, f"{address}:{port} is reachable from the network"

        # Losing the helper ends the request with an error that names it, and leaves nothing running.
        long = subprocess.Popen(
            [str(BIN / "rbee-keeper"), "--queen-url", site.queen_url, "infer", "--hive", "h1",
             "--max-tokens", "4000", "--temperature", "0", "Tell me a very long story."],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **site.env, "RBEE_API_TOKEN": TOKEN})
        assert long.stdout is not None
        long.stdout.read(1)  # it streams
        (helper_hive,) = [pid for pid, program in rbee_processes(h2).items() if program == "rbee-hive"]
        os.kill(helper_hive, signal.SIGKILL)
        _, stderr = long.communicate(timeout=60)
        assert long.returncode != 0 and "hive h2" in stderr and "Traceback" not in stderr, stderr
        assert wait_for(lambda: not rbee_processes(h2), timeout=10), rbee_processes(h2)
        assert wait_for(lambda: sorted(rbee_processes(h1).values()) == ["rbee-hive"], timeout=15), \
            rbee_processes(h1)
        assert wait_for(lambda: all(port != tunnel_port for _, port, _ in listening(h1)), timeout=10)

        # The SIGTERM cascade holds with a split worker: the queen stops the hives, they stop the
        # worker and the rpc server.
        assert site.keeper("hive", "start", "h2").returncode == 0
        again = site.keeper("worker", "spawn", "--hive", "h1", "--helper", "h2", "--model", "smollm2-135m",
                            "--threads", "1")
        assert again.returncode == 0, again.stderr
        ours = {**rbee_processes(h1), **rbee_processes(h2)}
        assert sorted(ours.values()) == ["llm-worker-rbee", "rbee-hive", "rbee-hive", "rpc-server"], ours
        queen.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: all(gone(pid) for pid in ours), timeout=20), {
            pid: program for pid, program in ours.items() if not gone(pid)}


def test_a_wrong_key_names_the_host_and_the_key_and_registers_nothing(site: Site) -> None:
    site.add_hive("h2-badkey", site.host("h2"), key=site.fleet.other_key)
    with site.queen():
        done = site.keeper("hive", "install", "h2-badkey")
        assert done.returncode == 1
        assert "h2-badkey" in done.stderr and str(site.fleet.other_key) in done.stderr, done.stderr
        assert "authentication failed" in done.stderr and "Traceback" not in done.stderr
        assert not installed(site, "h2-badkey")
        status = json.loads(site.keeper("hive", "status", "h2-badkey").stdout)
        assert status["installed"] is False


def test_an_unreachable_host_times_out_after_the_retries(site: Site) -> None:
    nobody = site.fleet.gateway.rsplit(".", 1)[0] + ".99"  # on the bridge, no machine there
    site.config.write_text(site.config.read_text() + (
        f'\n[hives.ghost]\nhost = "{nobody}"\nssh_user = "root"\nidentity_file = "{site.fleet.client_key}"\n'
        "connect_timeout_s = 1\nssh_attempts = 3\n"))
    with site.queen():
        done = site.keeper("hive", "install", "ghost")
    assert done.returncode == 1
    assert "ghost" in done.stderr and "tried 3 times" in done.stderr, done.stderr
    assert "SSH attempt 1 of 3" in done.stderr and "SSH attempt 2 of 3" in done.stderr
    assert not installed(site, "ghost")


def test_a_failed_install_removes_what_it_made_and_registers_nothing(site: Site, tmp_path: Path) -> None:
    # a wheelhouse that lacks one dependency: pip fails on the host, after the upload
    broken = altered_wheelhouse(site.wheelhouse, tmp_path / "broken-wh", drop="msgspec")
    site.add_hive("h1-broken", site.host("h1"), extra=f'wheelhouse = "{broken}"')
    remote_dir = site.root / "remote" / "h1-broken" / "rbee"
    stderr = install_fails(site, "h1-broken")
    assert "pip failed on h1-broken" in stderr and "msgspec" in stderr and "removing" in stderr, stderr
    assert not remote_dir.exists()


def test_no_python_and_a_wheelhouse_for_another_platform_are_named(site: Site, tmp_path: Path) -> None:
    other = altered_wheelhouse(site.wheelhouse, tmp_path / "arm-wh", platform="linux-aarch64")
    site.add_hive("nopython", site.host("h2"), extra='python = "python9.9"')
    site.add_hive("arm", site.host("h2"), extra=f'wheelhouse = "{other}"')
    with site.queen():
        missing = site.keeper("hive", "install", "nopython")
        arm = site.keeper("hive", "install", "arm")
    assert missing.returncode == 1 and "No Python at `python9.9` on nopython" in missing.stderr, missing.stderr
    assert "apt install python3" in missing.stderr
    assert arm.returncode == 1 and "linux-aarch64" in arm.stderr and "arm (root@" in arm.stderr, arm.stderr
    assert not installed(site, "nopython") and not installed(site, "arm")


def test_a_full_disk_is_named_before_anything_is_copied(site: Site) -> None:
    small = site.root / "small"
    small.mkdir(parents=True)
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter")
    h2 = site.host("h2")
    assert h2.sshd is not None
    # `ip netns exec` gave h2's sshd a mount namespace of its own: the small disk goes there
    inside = ["nsenter", "-t", str(h2.sshd.pid), "-m", "--"]
    subprocess.run([*inside, "mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)], check=True)
    try:
        site.add_hive("tiny", site.host("h2"), install_dir=f"{small}/rbee")
        stderr = install_fails(site, "tiny")
        assert "The disk is full on tiny" in stderr and "MB are free" in stderr, stderr
        listing = subprocess.run([*inside, "ls", "-A", str(small)], capture_output=True, text=True)
        assert listing.stdout == ""
    finally:
        subprocess.run([*inside, "umount", "-l", str(small)], check=False)


def test_host_keys_strict_by_default_accept_new_when_asked_and_never_a_changed_one(site: Site) -> None:
    known = site.root / "queen_known_hosts"
    known.write_text("")
    site.config.write_text(site.config.read_text().replace(
        f'known_hosts = "{site.fleet.known_hosts}"', f'known_hosts = "{known}"'))
    h1 = site.host("h1")
    site.add_hive("strict", h1)
    site.add_hive("firstuse", h1, extra='host_key_policy = "accept-new"')
    with site.queen():
        refused = site.keeper("hive", "ssh-test", "strict")
        assert refused.returncode == 1
        assert f"The host key of strict (root@{h1.address}:22) is not in {known}" in refused.stderr
        assert "ssh-keyscan" in refused.stderr and 'host_key_policy = "accept-new"' in refused.stderr

        accepted = site.keeper("hive", "ssh-test", "firstuse")
        assert accepted.returncode == 0, accepted.stderr
        assert known.read_text().split()[:2] == h1.host_key_line().split()[:2]  # recorded
        assert site.keeper("hive", "ssh-test", "strict").returncode == 0  # now known

        # a different key on record for that address: refused, even under accept-new
        other = site.fleet.hosts[1].host_key_line().split(maxsplit=1)[1]
        known.write_text(f"{h1.address} {other}\n")
        changed = site.keeper("hive", "ssh-test", "firstuse")
        assert changed.returncode == 1
        assert "does not match the one in" in changed.stderr and "ssh-keygen -R" in changed.stderr
        assert known.read_text() == f"{h1.address} {other}\n"  # nothing was added


def test_a_python_older_than_3_11_is_named(site: Site) -> None:
    old = site.root / "python3.8"
    # stands in for an old interpreter on the host: it answers the install's probe as Python 3.8 would
    old.write_text('#!/bin/sh\necho \'{"version": [3, 8, 10], "platform": "linux-x86_64", "dir": "/x", '
                   '"existed": false, "free": 1000000000000}\'\n')
    old.chmod(0o755)
    site.add_hive("oldpython", site.host("h2"), extra=f'python = "{old}"')
    stderr = install_fails(site, "oldpython")
    assert "has Python 3.8.10" in stderr and "rbee needs 3.11 or newer" in stderr, stderr


def test_a_detached_hive_outlives_the_queen_and_stops_when_asked(
    installed_site: tuple[Site, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    site, results = installed_site
    h2 = site.host("h2")
    with site.queen() as queen:
        assert results["h2"].returncode == 0, results["h2"].stderr
        code = next((site.root / "remote" / "h2" / "rbee" / "venv" / "lib").glob("python*/site-packages/rbee_hive"))
        before = (code / "__init__.py").stat().st_mtime_ns
        again = site.keeper("hive", "install", "h2", "--force")  # the same version: reinstalled anyway
        assert again.returncode == 0, again.stderr
        assert "--force: reinstalling rbee" in again.stderr
        assert (code / "__init__.py").stat().st_mtime_ns > before
        started = site.keeper("hive", "start", "h2", "--detached")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["attached"] is False, started.stdout + started.stderr
        queen.process.send_signal(signal.SIGTERM)
        queen.process.wait(30)
    hives = [pid for pid, program in rbee_processes(h2).items() if program == "rbee-hive"]
    assert len(hives) == 1, "the detached hive stopped with the queen"
    with site.queen():
        status = json.loads(site.keeper("hive", "status", "h2").stdout)
        assert status["reachable"] and not status.get("attached")
        stopped = site.keeper("hive", "stop", "h2")
        assert stopped.returncode == 0, stopped.stderr
        assert wait_for(lambda: gone(hives[0]), timeout=10)

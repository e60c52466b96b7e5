"""Areas 010, 040, 070 and 080 on namespace hosts, through rbee-keeper and a queen with a token.

One fleet (two namespace hosts with sshd) and one queen serve every scenario
of this module; each scenario adds hives under its own aliases. The `h1`
hive is installed and started once, the first time a scenario needs it.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World
from harness import netns
from harness.fleet import Site, altered_wheelhouse, make_site
from rbee_common.daemon import package_version

pytestmark = netns.fleet_mark()

scenarios("ssh_registry.feature", "ssh_preflight.feature", "hive_preflight.feature", "hive_install.feature")


class Fleet:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.h1_installed = False


@pytest.fixture(scope="module")
def fleet_site(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("bdd-fleet")
    with netns.fleet(2, root / "fleet") as hosts:
        site = make_site(hosts, root / "site", wheelhouse)
        with site.queen():
            yield Fleet(site)


def site_of(world: World) -> Site:
    site = world.extra["fleet"].site
    assert isinstance(site, Site)
    return site


def expand(site: Site, text: str) -> str:
    key = str(site.fleet.client_key)
    home = str(Path.home())
    tilde = "~" + key[len(home):] if key.startswith(home + "/") else key
    return (text.replace("{h1}", site.host("h1").address).replace("{h2}", site.host("h2").address)
            .replace("{key_tilde}", tilde))


def config(site: Site) -> dict[str, Any]:
    return tomllib.loads(site.config.read_text())


def ensure_added(site: Site, alias: str, host: str, **kwargs: Any) -> None:
    if alias not in config(site).get("hives", {}):
        site.add_hive(alias, site.host(host), **kwargs)


def append_hive(site: Site, alias: str, body: str) -> None:
    if alias not in config(site).get("hives", {}):
        site.config.write_text(site.config.read_text() + f"\n[hives.{alias}]\n{body}\n")


# --- given ------------------------------------------------------------------------


@given("a fleet of namespace hosts and a queen with a token")
def a_fleet(world: World, fleet_site: Fleet) -> None:
    world.extra["fleet"] = fleet_site


@given(parsers.parse('the hive "{alias}" is added for host "{host}"'))
def hive_added(world: World, alias: str, host: str) -> None:
    ensure_added(site_of(world), alias, host)


@given(parsers.parse('the hive "{alias}" points at an address where no machine answers, with a 1 s timeout'))
def hive_nowhere(world: World, alias: str) -> None:
    site = site_of(world)
    nobody = site.fleet.gateway.rsplit(".", 1)[0] + ".99"
    append_hive(site, alias, f'host = "{nobody}"\nssh_user = "root"\nidentity_file = "{site.fleet.client_key}"\n'
                "connect_timeout_s = 1")


@given(parsers.parse('the hive "{alias}" uses a key readable by others'))
def hive_loose_key(world: World, alias: str) -> None:
    site = site_of(world)
    loose = site.root / "loose_key"
    if not loose.exists():
        loose.write_bytes(site.fleet.client_key.read_bytes())
    loose.chmod(0o644)
    append_hive(site, alias, f'host = "{site.host("h1").address}"\nssh_user = "root"\nidentity_file = "{loose}"')


@given(parsers.parse('the hive "{alias}" uses a key the host does not accept'))
def hive_other_key(world: World, alias: str) -> None:
    site = site_of(world)
    ensure_added(site, alias, "h1", key=site.fleet.other_key)


@given(parsers.parse('the hive "{alias}" is added for host "{host}" with a wheelhouse that lacks msgspec'))
def hive_broken_wheelhouse(world: World, alias: str, host: str) -> None:
    site = site_of(world)
    broken = site.root / "broken-wheelhouse"
    if not broken.exists():
        altered_wheelhouse(site.wheelhouse, broken, drop="msgspec")
    ensure_added(site, alias, host, extra=f'wheelhouse = "{broken}"')


@given(parsers.parse('the hive "{alias}" is added for host "{host}" sharing h1\'s install dir'))
def hive_sharing(world: World, alias: str, host: str) -> None:
    site = site_of(world)
    ensure_added(site, alias, host, install_dir=str(site.root / "remote" / "h1" / "rbee"))


@given("rbee-hive in h1's venv is not executable")
def hive_not_executable(world: World) -> None:
    script = site_of(world).root / "remote" / "h1" / "rbee" / "venv" / "bin" / "rbee-hive"
    script.chmod(0o644)
    world.extra["stack"].callback(script.chmod, 0o755)


@given(parsers.parse('rbee-hive in h1\'s venv reports version "{version}"'))
def hive_other_version(world: World, version: str) -> None:
    script = site_of(world).root / "remote" / "h1" / "rbee" / "venv" / "bin" / "rbee-hive"
    original = script.read_bytes()
    world.extra["stack"].callback(script.write_bytes, original)
    script.write_text(f"#!/bin/sh\necho rbee-hive {version}\n")


@then("the output contains this queen's version")
def output_has_version(world: World) -> None:
    assert world.result is not None
    assert f"this queen is {package_version()}" in world.result.stdout + world.result.stderr


def install_h1(world: World) -> subprocess.CompletedProcess[str]:
    site = site_of(world)
    ensure_added(site, "h1", "h1")
    done = site.keeper("hive", "install", "h1")
    assert done.returncode == 0, done.stderr
    world.extra["fleet"].h1_installed = True
    return done


@given(parsers.parse('the hive "{alias}" is installed and started'))
def h1_ready(world: World, alias: str) -> None:
    assert alias == "h1"
    fleet: Fleet = world.extra["fleet"]
    if not fleet.h1_installed:
        install_h1(world)
    started = fleet.site.keeper("hive", "start", "h1")
    assert started.returncode == 0, started.stderr  # "already running" after the first time


# --- when -------------------------------------------------------------------------


@when(parsers.parse('I run the keeper with "{args}"'))
def run_the_keeper(world: World, args: str) -> None:
    site = site_of(world)
    world.result = site.keeper(*expand(site, args).split())


@when(parsers.parse('the hive "{alias}" is installed'))
def hive_installed(world: World, alias: str) -> None:
    assert alias == "h1"
    world.result = install_h1(world)


# --- then -------------------------------------------------------------------------


def output(world: World) -> str:
    assert world.result is not None
    return world.result.stdout + world.result.stderr


def result(world: World) -> dict[str, Any]:
    assert world.result is not None and world.result.returncode == 0, output(world)
    value = json.loads(world.result.stdout)
    assert isinstance(value, dict)
    return value


@then(parsers.parse("the keeper exits {code:d}"))
def keeper_exits(world: World, code: int) -> None:
    assert world.result is not None
    assert world.result.returncode == code, output(world)
    assert "Traceback" not in output(world)


@then(parsers.parse('the output contains "{text}"'))
def output_contains(world: World, text: str) -> None:
    assert expand(site_of(world), text) in output(world), output(world)


@then(parsers.parse('the install narrated "{text}"'))
def install_narrated(world: World, text: str) -> None:
    assert world.result is not None and text in world.result.stderr, world.result.stderr


@then(parsers.parse('the config has the hive "{alias}" with host "{host}", ssh_port 22, ssh_user "{user}" '
                    "and the key path expanded"))
def config_has(world: World, alias: str, host: str, user: str) -> None:
    site = site_of(world)
    entry = config(site)["hives"][alias]
    assert entry["host"] == expand(site, host) and entry["ssh_user"] == user
    assert entry.get("ssh_port", 22) == 22
    assert entry["identity_file"] == str(site.fleet.client_key)


@then(parsers.parse('the config has no hive "{alias}"'))
def config_lacks(world: World, alias: str) -> None:
    assert alias not in config(site_of(world)).get("hives", {})


@then(parsers.parse('the hive "{alias}" is not registered as installed'))
def not_installed(world: World, alias: str) -> None:
    site = site_of(world)
    assert not (site.root / "xdg-state" / "rbee" / "hives" / alias / "install.json").exists()
    status = site.keeper("hive", "status", alias)
    assert json.loads(status.stdout)["installed"] is False, status.stdout


@then(parsers.parse('the output contains the install dir of "{alias}"'))
def output_has_install_dir(world: World, alias: str) -> None:
    assert str(site_of(world).root / "remote" / alias / "rbee") in output(world)


@then(parsers.parse('the result says the echo answered "{text}"'))
def echo_answered(world: World, text: str) -> None:
    assert result(world)["echo"] == text


@then("the network round trip is under 100 ms and logged")
def round_trip(world: World) -> None:
    value = result(world)
    # The catalogue's bound. One TCP connect over a veth takes about 0.1 ms here, so 100 ms holds
    # on a loaded machine too; the number itself is reported, not judged, by the command.
    assert 0 < value["network_ms"] < 100, value
    logged = re.search(r"network round trip (\d+\.\d) ms", output(world))
    # The result holds it rounded to 0.01 ms and the log line to 0.1 ms: 4.05 may read 4.1 there.
    assert logged is not None and abs(float(logged[1]) - value["network_ms"]) <= 0.051, output(world)


@then(parsers.parse('the result says "{field}" is true'))
def result_true(world: World, field: str) -> None:
    assert result(world)[field] is True


@then("the result's version is the queen's version")
def same_version(world: World) -> None:

    assert result(world)["version"] == package_version()


@then(parsers.parse('the result lists the backend "{backend}"'))
def lists_backend(world: World, backend: str) -> None:
    assert backend in result(world)["backends"]


@then(parsers.parse('the result lists the device "{device}"'))
def lists_device(world: World, device: str) -> None:
    assert device in [d["id"] for d in result(world)["devices"]]


@then("the result reports RAM total and available and free disk, all above zero")
def resources(world: World) -> None:
    value = result(world)
    cpu = next(d for d in value["devices"] if d["id"] == "CPU-0")
    assert cpu["memory_total_bytes"] > 0 and 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]
    assert value["disk_free_bytes"] > 0


@then("llm-worker-rbee in h1's venv reports the queen's version")
def worker_version(world: World) -> None:

    site = site_of(world)
    h1 = site.host("h1")
    binary = site.root / "remote" / "h1" / "rbee" / "venv" / "bin" / "llm-worker-rbee"
    done = subprocess.run(["ip", "netns", "exec", h1.netns, str(binary), "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split()[-1] == package_version(), done.stderr


@then(parsers.parse('the queen\'s install record of "{alias}" names its version, Python, platform and install dir'))
def install_record(world: World, alias: str) -> None:
    site = site_of(world)
    record = json.loads((site.root / "xdg-state" / "rbee" / "hives" / alias / "install.json").read_text())
    assert record["version"] and record["python"].startswith("3.") and record["platform"]
    assert record["install_dir"] == str(site.root / "remote" / alias / "rbee")
    assert record["host"] == site.host(alias).address

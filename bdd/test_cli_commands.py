from __future__ import annotations

import os
import subprocess

from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, spawned
from harness.helpers import BIN, gone

scenarios("cli_commands.feature")


def keeper(world: World, *args: str, env: dict[str, str] | None = None) -> None:
    world.result = subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", world.queen_url or "http://127.0.0.1:1", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


@given(parsers.parse('a config file in the XDG config dir naming the hive "{alias}"'))
def xdg_config(world: World, alias: str) -> None:
    path = world.tmp / "config" / "rbee" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[hives.{alias}]\nhost = "10.231.0.1"\n')


@given(parsers.parse('a config file named by RBEE_CONFIG naming the hive "{alias}"'))
def rbee_config(world: World, alias: str) -> None:
    path = world.tmp / "elsewhere.toml"
    path.write_text(f'[hives.{alias}]\nhost = "10.231.0.2"\n')
    os.environ["RBEE_CONFIG"] = str(path)  # the root conftest removes RBEE_* around every test
    world.extra["stack"].callback(os.environ.pop, "RBEE_CONFIG", None)


@then(parsers.parse('the output does not mention "{text}"'))
def not_mentioned(world: World, text: str) -> None:
    assert world.result is not None and text not in world.result.stdout + world.result.stderr


@then("the keeper exits 0 with the answer alone on stdout")
def answer_alone(world: World) -> None:
    assert world.result is not None and world.result.returncode == 0, world.result.stderr
    assert len(world.result.stdout.split()) >= 3
    for noise in ("queen", "worker", "Preflight"):
        assert noise not in world.result.stdout


@then(parsers.parse('both workers are listed with their state "{state}"'))
def both_listed(world: World, state: str) -> None:
    assert world.result is not None and world.result.returncode == 0
    lines = world.result.stdout.splitlines()
    for worker in spawned(world):
        (line,) = [line for line in lines if worker["worker_id"] in line]
        assert state in line.split()


@when("I ask the keeper for that worker")
def keeper_get(world: World) -> None:
    keeper(world, "worker", "get", spawned(world)[0]["worker_id"])


@then(parsers.parse('the output shows its state "{state}", its pid and its url'))
def shows_worker(world: World, state: str) -> None:
    assert world.result is not None and world.result.returncode == 0
    worker = spawned(world)[0]
    assert ["state", state] in [line.split() for line in world.result.stdout.splitlines()]
    assert str(worker["pid"]) in world.result.stdout and worker["url"] in world.result.stdout


@when("I stop that worker with the keeper")
def keeper_stop(world: World) -> None:
    keeper(world, "worker", "stop", spawned(world)[0]["worker_id"])


@then("the output says it stopped")
def says_stopped(world: World) -> None:
    assert world.result is not None and world.result.returncode == 0
    assert f"{spawned(world)[0]['worker_id']} stopped" in world.result.stdout


@then("its process is gone")
def process_gone(world: World) -> None:
    assert gone(int(spawned(world)[0]["pid"]))

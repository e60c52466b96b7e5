from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from pytest_bdd import given, parsers, scenarios, then

from bdd.conftest import World, start_queen
from harness.helpers import BIN, daemon, free_port, port_open

scenarios("queen_health_check.feature", "queen_lifecycle_management.feature")


@pytest.fixture(autouse=True)
def stop_started_queens(world: World) -> Iterator[None]:
    """A scenario that ran `queen start` leaves no queen behind."""
    yield
    if world.queen_url:
        subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", world.queen_url, "queen", "stop"],
                       capture_output=True, timeout=30)


@given("a running queen on a port of its own")
def queen_own_port(world: World) -> None:
    world.extra["port"] = free_port()
    start_queen(world, port=world.extra["port"])


@given("a queen address that accepts connections and never answers")
def stuck(world: World) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    world.extra["stack"].callback(sock.close)
    world.queen_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    world.extra["no_stop"] = True


@given("a queen whose pid file is known but whose URL does not answer")
def pid_without_url(world: World) -> None:
    port = free_port()
    world.queen_url = f"http://127.0.0.1:{port}"
    queen = world.extra["stack"].enter_context(daemon([str(BIN / "queen-rbee"), "--port", "0"]))
    pid_path = world.tmp / "state" / "rbee" / f"queen-{port}.pid"
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.write_text(f"{queen.process.pid}\n")
    world.extra["other_queen"] = queen


@then(parsers.re(r"the keeper exits (?P<code>\d+)( within (?P<seconds>\d+) seconds)?"),
      converters={"code": int})
def keeper_exits(world: World, code: int, seconds: str | None) -> None:
    assert world.result is not None and world.result.returncode == code, world.result.stderr
    if seconds:  # a deadline for the behaviour (a health check gives up), with a margin for a loaded machine
        assert world.extra.get("took", 0) < int(seconds)


@then("the output contains the queen's URL with that port")
def url_with_port(world: World) -> None:
    assert world.result is not None and f":{world.extra['port']}" in world.result.stdout


@then(parsers.parse('the output does not contain "{text}"'))
def output_lacks(world: World, text: str) -> None:
    assert world.result is not None and text not in world.result.stdout + world.result.stderr


@then("only one queen runs on that port")
def one_queen(world: World) -> None:
    assert world.queen is not None
    # Only queens of this scenario count: one listening on its port, or one started for its port (as
    # the keeper would start one). Another queen elsewhere on the machine is none of its business.
    port = int(world.queen_url.rsplit(":", 1)[1])
    listening = {c.pid for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    queens = sorted(p.pid for p in psutil.process_iter(["cmdline"])
                    if any("queen-rbee" in part for part in p.info["cmdline"] or [])
                    and (p.pid in listening or str(port) in (p.info["cmdline"] or []))
                    and p.status() != psutil.STATUS_ZOMBIE)
    assert queens == [world.queen.process.pid]


@then(parsers.parse('the queen\'s /health says "{status}"'))
def health_says(world: World, status: str) -> None:
    assert httpx.get(f"{world.queen_url}/health").json()["status"] == status


@then("no queen answers on that port")
def nobody(world: World) -> None:
    deadline = time.monotonic() + 5
    while port_open(world.queen_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open(world.queen_url)


@then("that queen process exits 0")
def other_exits(world: World) -> None:
    assert world.extra["other_queen"].process.wait(timeout=5) == 0

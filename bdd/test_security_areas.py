"""Areas 140 (input validation), 300 (authentication), 310 (secrets) and 330 (audit)."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import socket
import string
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from bdd.conftest import World, models_dir, run_job, spawn_worker, start_queen
from harness.helpers import BIN, daemon, free_port, job_result, wait_for
from rbee_common.auth import fingerprint as fp
from rbee_common.auth import write_token_file

scenarios("input_validation.feature", "authentication.feature", "secrets_management.feature",
          "audit_logging.feature")

TOKEN = "s3cret-token-for-bdd-0123456789ab"
WRONG = "wrong-token-0123456789abcdef"


def token_path(world: World, token: str = TOKEN, name: str = "api.token") -> Path:
    path = world.tmp / name
    write_token_file(path, token)
    world.extra["token"] = token
    return path


def target_url(world: World, target: str) -> str:
    return str(world.queen_url if target == "queen" else world.extra["hive"].url)


def target_log(world: World, target: str) -> str:
    daemon_ = world.queen if target == "queen" else world.extra["hive"]
    assert daemon_ is not None
    return str(daemon_.log())


def auth(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.extra['token']}"}


# --- daemons ------------------------------------------------------------------------------------


@given("a running hive with an API token")
def token_hive(world: World) -> None:
    token_hive_with(world, "")


@given(parsers.parse('a running hive with an API token and "{settings}"'))
def token_hive_with(world: World, settings: str) -> None:
    path = token_path(world)
    env = {f"RBEE_HIVE__{k.strip().upper()}": v.strip() for k, v in
           (pair.split("=", 1) for pair in filter(None, settings.split(",")))}
    world.extra["hive_argv"] = [str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(path)]
    world.extra["hive_env"] = env
    world.extra["hive"] = world.extra["stack"].enter_context(daemon(world.extra["hive_argv"], env=env))


@given("a running queen with an API token")
def token_queen(world: World) -> None:
    start_queen(world, "--local-hive", "--api-token-file", str(token_path(world)))
    world.extra["token_file"] = world.tmp / "api.token"


@given(parsers.parse('a running queen whose token is "{token}"'))
def queen_with_token(world: World, token: str) -> None:
    start_queen(world, "--api-token-file", str(token_path(world, token, "special.token")))


@when(parsers.parse('I start queen-rbee with "{args}"'))
def start_queen_args(world: World, args: str) -> None:
    world.result = subprocess.run([str(BIN / "queen-rbee"), *shlex.split(args)], capture_output=True, text=True,
                                  timeout=30)


@then(parsers.parse('it refuses to start, naming "{text}"'))
def refuses(world: World, text: str) -> None:
    assert world.result is not None and world.result.returncode != 0
    output = world.result.stdout + world.result.stderr
    assert text in output and "Traceback" not in output, output


@when(parsers.parse('I run the keeper with "{args}"'))
def keeper(world: World, args: str) -> None:
    url = world.queen_url or f"http://127.0.0.1:{free_port()}"
    world.result = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, *shlex.split(args)],
                                  capture_output=True, text=True, timeout=120)


@then(parsers.parse("the keeper exits {code:d}"))
def keeper_exits(world: World, code: int) -> None:
    assert world.result is not None and world.result.returncode == code, world.result.stderr


# --- requests -----------------------------------------------------------------------------------


@when(parsers.re(r"I send (?P<method>[A-Z]+) (?P<path>\S+) to the (?P<target>queen|hive) without a token"))
def send_without(world: World, method: str, path: str, target: str) -> None:
    world.response = httpx.request(method, target_url(world, target) + path, timeout=30)


@when(parsers.re(r'I send (?P<method>[A-Z]+) (?P<path>\S+) to the (?P<target>queen|hive) with the token "(?P<token>[^"]+)"'))
def send_with_token(world: World, method: str, path: str, target: str, token: str) -> None:
    world.response = httpx.request(method, target_url(world, target) + path,
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)


@when(parsers.re(r"I send (?P<method>[A-Z]+) (?P<path>\S+) to the (?P<target>queen|hive) with the right token"))
def send_right(world: World, method: str, path: str, target: str) -> None:
    world.response = httpx.request(method, target_url(world, target) + path, headers=auth(world), timeout=30)


@when(parsers.re(r'I send (?P<method>[A-Z]+) (?P<path>\S+) to the (?P<target>queen|hive) with the header "(?P<header>[^"]+)"'))
def send_header(world: World, method: str, path: str, target: str, header: str) -> None:
    value = header.replace("RIGHT", str(world.extra["token"]))
    world.response = httpx.request(method, target_url(world, target) + path, headers={"Authorization": value},
                                   timeout=30)


@when("I send GET /v1/build-info to the queen with an empty Bearer token")
def send_empty_bearer(world: World) -> None:
    host, port = world.queen_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # httpx refuses to send "Bearer "
        sock.sendall(b"GET /v1/build-info HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \r\n"
                     b"Connection: close\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    world.extra["raw"] = raw.decode(errors="replace")


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


@then(parsers.parse('the raw response is a 401 with "{code}"'))
def raw_401(world: World, code: str) -> None:
    assert world.extra["raw"].startswith("HTTP/1.1 401") and code in world.extra["raw"]


@when(parsers.parse("I send the hive job '{body}'"))
def send_hive_job(world: World, body: str) -> None:
    hive = world.extra["hive"]
    world.response = httpx.post(f"{hive.url}/v1/jobs", content=body.encode(), timeout=30,
                                headers={"Content-Type": "application/json"})
    world.extra["terminator"] = ""
    if world.response.status_code == 201:
        events: list[dict[str, Any]] = []
        with httpx.stream("GET", hive.url + world.response.json()["sse_url"], timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                elif line.startswith("data: "):
                    world.extra["terminator"] = line[6:]
        world.extra["events"] = events


INJECTIONS = {"a newline": "x\n2026-01-01 00:00:00,000 INJECTED forged line", "an ANSI escape": "x\x1b[31mINJECTED",
              "a null byte": "x\x00INJECTED"}


@when(parsers.parse("I send the hive a worker_spawn whose model holds {what}"))
def send_injection(world: World, what: str) -> None:
    world.response = httpx.post(f"{world.extra['hive'].url}/v1/jobs", timeout=30,
                                json={"operation": "worker_spawn", "model": INJECTIONS[what]})
    world.extra["injected"] = INJECTIONS[what]


@then(parsers.parse('the error names the field "{field}" and not the value'))
def names_field(world: World, field: str) -> None:
    assert world.response is not None
    error = world.response.json()["error"]
    assert error["details"]["field"] == field
    assert "INJECTED" not in world.response.text and ";" not in error["message"] and "`id`" not in world.response.text


@then("no line of the hive's log starts with the injected text")
def log_clean(world: World) -> None:
    log = target_log(world, "hive")
    assert not any(line.startswith("2026-01-01") or "INJECTED" in line for line in log.splitlines())
    assert "\x1b" not in log and "\x00" not in log


@then("the error body has code, message, details and a correlation id")
def envelope(world: World) -> None:
    assert world.response is not None
    error = world.response.json()["error"]
    assert error["code"].isupper() and error["message"] and isinstance(error.get("details", {}), dict)
    assert len(error["correlation_id"]) == 36


@then(parsers.parse('the response does not contain "{text}"'))
def no_echo(world: World, text: str) -> None:
    assert world.response is not None
    assert text not in world.response.text and json.dumps(text)[1:-1] not in world.response.text


HOSTILE = string.ascii_letters + string.digits + ";|`$(){}<>\\'\"\n\r\t\x00\x1b/.:@!#%^&*~ -_é🐝\u202e"
FIELDS = [("worker_spawn", "model"), ("worker_spawn", "device"), ("worker_spawn", "backend"),
          ("worker_get", "worker_id"), ("worker_stop", "worker_id"), ("model_get", "model"),
          ("model_download", "model")]


@when(parsers.parse("I send the hive {count:d} jobs whose fields hold random hostile values"))
def random_hostile(world: World, count: int) -> None:
    rng = random.Random(20261202)  # seeded: a failure repeats
    sent = []
    with httpx.Client(timeout=30) as http:
        for _ in range(count):
            operation, field = rng.choice(FIELDS)
            value = rng.choice(["", "hf:", "file://", "GPU-"]) + "".join(
                rng.choice(HOSTILE) for _ in range(rng.randint(1, 40)))
            body = {"operation": operation, "model": "smollm2-135m", "device": "CPU-0", field: value}
            if operation in ("worker_get", "worker_stop"):
                body = {"operation": operation, field: value}
            response = http.post(f"{world.extra['hive'].url}/v1/jobs", json=body)
            terminator, events = "", []
            if response.status_code == 201:
                events, terminator = run_job_stream(http, world.extra["hive"].url, response.json()["sse_url"])
            sent.append((field, value, response, events, terminator))
    world.extra["hostile"] = sent


def run_job_stream(http: httpx.Client, url: str, sse_url: str) -> tuple[list[dict[str, Any]], str]:
    events: list[dict[str, Any]] = []
    with http.stream("GET", url + sse_url) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            elif line.startswith("data: "):
                return events, line[6:]
    return events, ""


@then("every answer is a 400 naming its field, or a job that fails with an error code")
def hostile_answers(world: World) -> None:
    refused = 0
    for field, value, response, events, terminator in world.extra["hostile"]:
        if response.status_code == 400:
            refused += 1
            assert response.json()["error"]["details"]["field"] == field, (field, value, response.text)
        else:
            assert response.status_code == 201 and terminator.startswith("[ERROR]"), (field, value, terminator)
            assert [e["error"]["code"] for e in events if e.get("error")], (field, value)
    assert refused > len(world.extra["hostile"]) // 2  # most random values are malformed


@then("no answer is a 5xx and none repeats its value")
def hostile_no_echo(world: World) -> None:
    for _field, value, response, _events, _terminator in world.extra["hostile"]:
        assert response.status_code < 500, (value, response.text)
        if response.status_code == 400 and len(value) >= 6:
            assert value not in response.text and json.dumps(value)[1:-1] not in response.text, value


@then("the hive still lists the built-in model")
def still_lists(world: World) -> None:
    models = job_result(world.extra["hive"].url, {"operation": "model_list"})
    assert isinstance(models, list) and "smollm2-135m" in [m["id"] for m in models]


@given(parsers.parse('a symlink in the hive\'s model folder that points to "{target}"'))
def symlink(world: World, target: str) -> None:
    link = models_dir(world) / "link.gguf"
    link.symlink_to(target)
    world.extra["link"] = link


@when("I spawn a worker of that symlink")
def spawn_link(world: World) -> None:
    spawn_worker(world, f"file://{world.extra['link']}", "CPU-0")


@when(parsers.parse("I send a worker_get for an id of {length:d} characters"))
def long_id(world: World, length: int) -> None:
    world.response = httpx.post(f"{world.extra['hive'].url}/v1/jobs", timeout=30,
                                json={"operation": "worker_get", "worker_id": "w" * length})


@when("I run rbee-keeper against the token hive with no token")
def keeper_no_token(world: World) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RBEE_API_TOKEN"}
    url = world.extra["hive"].url
    world.result = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", url, "status"], capture_output=True,
                                  text=True, timeout=60, env=env)


# --- authentication -----------------------------------------------------------------------------


@then("the response asks for a Bearer token")
def asks_bearer(world: World) -> None:
    assert world.response is not None and world.response.headers["WWW-Authenticate"] == "Bearer"


@then(parsers.parse('the {target:w}\'s log says "{text}"'))
def log_says(world: World, target: str, text: str) -> None:
    assert wait_for(lambda: text in target_log(world, target), timeout=5), target_log(world, target)[-2000:]


@then(parsers.parse('the queen\'s log says "{text}" with the fingerprint of the right token'))
def log_says_fp(world: World, text: str) -> None:
    assert wait_for(lambda: f"{text}{fp(world.extra['token'])}" in target_log(world, "queen"), timeout=5)


@then(parsers.parse('the queen\'s log says "{text}" once, not once per request'))
def log_says_once(world: World, text: str) -> None:
    assert target_log(world, "queen").count(f"{text}{fp(world.extra['token'])}") == 1


@then(parsers.parse('the queen\'s log has the fingerprint of "{token}" but never the token'))
def log_fp_of(world: World, token: str) -> None:
    log = target_log(world, "queen")
    assert f"token:{fp(token)}" in log and token not in log


@then("the queen's log has the fingerprint of the right token but never the token")
def log_fp_right(world: World) -> None:
    log_fp_of(world, world.extra["token"])


@given("a worker spawned through the token queen")
def worker_through_queen(world: World) -> None:
    created = httpx.post(f"{world.queen_url}/v1/jobs", headers=auth(world), json={
        "operation": "worker_spawn", "model": "smollm2-135m", "threads": 1})
    assert created.status_code == 201
    with httpx.stream("GET", world.queen_url + created.json()["sse_url"], headers=auth(world),
                      timeout=120) as stream:
        for line in stream.iter_lines():
            if '"type":"result"' in line:
                world.extra["worker"] = json.loads(line[6:])["value"]
    assert "worker" in world.extra


@then("the queen, its hive and the worker each answer 401 without a token")
def all_401(world: World) -> None:
    worker = world.extra["worker"]
    assert httpx.get(f"{world.queen_url}/v1/build-info").status_code == 401
    assert httpx.post(f"{world.queen_url}/v1/jobs", json={"operation": "worker_list"}).status_code == 401
    assert httpx.get(f"{worker['url']}/v1/ready").status_code == 401


@when("50 requests with the right token and 50 with a wrong one arrive at once")
def concurrent_auth(world: World) -> None:
    def one(index: int) -> tuple[bool, int]:
        right = index % 2 == 0
        token = world.extra["token"] if right else f"{WRONG}{index}"
        status = httpx.get(f"{world.queen_url}/v1/build-info", headers={"Authorization": f"Bearer {token}"},
                           timeout=5).status_code
        return right, status

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        world.extra["answers"] = list(pool.map(one, range(100)))


@then("every right one is answered 200 and every wrong one 401")
def answered(world: World) -> None:
    assert all(status == (200 if right else 401) for right, status in world.extra["answers"])


@given(parsers.parse('a token hive "{alias}" that the token queen knows'))
def token_hive_known(world: World, alias: str) -> None:
    hive_token = "hive-own-token-0123456789abcdef"
    hive_file = token_path(world, hive_token, "hive.token")
    world.extra["hive_token"] = hive_token
    port = free_port()
    world.extra["hive"] = world.extra["stack"].enter_context(daemon(
        [str(BIN / "rbee-hive"), "--port", str(port), "--hive-id", alias, "--api-token-file", str(hive_file)]))
    config = world.tmp / "queen.toml"
    config.write_text(f'[hives.{alias}]\nhost = "127.0.0.1"\nhive_port = {port}\ntoken_file = "{hive_file}"\n')
    start_queen(world, "--config", str(config), "--api-token-file", str(token_path(world, TOKEN, "queen.token")))


@when(parsers.parse('the keeper lists the workers of "{alias}" with the queen\'s token'))
def keeper_lists(world: World, alias: str) -> None:
    world.result = subprocess.run(
        [str(BIN / "rbee-keeper"), "--queen-url", world.queen_url, "worker", "list", "--hive", alias],
        capture_output=True, text=True, timeout=60, env={**os.environ, "RBEE_API_TOKEN": TOKEN})


@then("the hive's log has the fingerprint of its own token, not the queen's")
def hive_fp(world: World) -> None:
    log = target_log(world, "hive")
    assert f"authenticated identity=token:{fp(world.extra['hive_token'])}" in log
    assert fp(TOKEN) not in log and TOKEN not in log and world.extra["hive_token"] not in log


# --- secrets ------------------------------------------------------------------------------------


@given(parsers.parse("a token file {problem}"))
def bad_token_file(world: World, problem: str) -> None:
    path = world.tmp / "given.token"
    content = TOKEN + "\n"
    if problem == "with mode 0600" or problem.startswith("with mode"):
        path.write_text(content)
        path.chmod(int(problem.rsplit(" ", 1)[1], 8))
    elif problem == "that is a directory":
        path.mkdir()
        path.chmod(0o700)
    elif problem == "with two lines":
        content = TOKEN + "\nsecond-line-0123456789abcdef\n"
    elif problem == "that is empty":
        content = ""
    elif problem == "with only whitespace":
        content = "      \t    \n"
    if problem in ("with two lines", "that is empty", "with only whitespace"):
        path.write_text(content)
        path.chmod(0o600)
    world.extra["token"], world.extra["given"], world.extra["content"] = TOKEN, path, content


@when("I start queen-rbee with that token file")
def start_with_file(world: World) -> None:
    path = world.extra["given"]
    if path.is_file() and path.stat().st_mode & 0o077 == 0 and path.read_text().strip() == TOKEN:
        start_queen(world, "--api-token-file", str(path))
    else:
        world.result = subprocess.run([str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(path)],
                                      capture_output=True, text=True, timeout=30)


@then("the output does not contain the file's content")
def no_content(world: World) -> None:
    assert world.result is not None
    secret = world.extra["content"].strip()
    assert not secret or secret.split("\n")[0] not in world.result.stdout + world.result.stderr


@given(parsers.parse('a systemd credential "{name}" with mode 0400'))
def credential(world: World, name: str) -> None:
    folder = world.tmp / "credentials"
    folder.mkdir(mode=0o700)
    (folder / name).write_text(TOKEN + "\n")
    (folder / name).chmod(0o400)
    world.extra["credentials"], world.extra["token"] = folder, TOKEN


@when("I start queen-rbee with that credentials directory")
def start_with_credentials(world: World) -> None:
    start_queen(world, env={"CREDENTIALS_DIRECTORY": str(world.extra["credentials"])})


@then("requests with the credential's token are answered 200")
def credential_works(world: World) -> None:
    assert httpx.get(f"{world.queen_url}/v1/build-info", headers=auth(world)).status_code == 200
    assert httpx.get(f"{world.queen_url}/v1/build-info").status_code == 401


@when("100 requests with the right token and wrong ones have been answered")
def hundred(world: World) -> None:
    texts = []
    for index in range(100):
        token = world.extra["token"] if index % 2 else f"{WRONG}{index}"
        response = httpx.post(f"{world.queen_url}/v1/jobs", json={"operation": "hive_get", "hive_id": "nowhere"},
                              headers={"Authorization": f"Bearer {token}"})
        texts.append(response.text)
    world.extra["texts"] = texts


@then("no response contained either token")
def no_token_in_responses(world: World) -> None:
    assert not any(world.extra["token"] in t or WRONG in t for t in world.extra["texts"])


@when("the token file is replaced and the queen gets SIGHUP")
def rotate(world: World) -> None:
    world.extra["old"] = world.extra["token"]
    world.extra["new"] = "rotated-bdd-token-0123456789abcdef"
    write_token_file(world.extra["token_file"], world.extra["new"])
    assert world.queen is not None
    os.kill(world.queen.process.pid, signal.SIGHUP)
    assert wait_for(lambda: "API token reloaded" in target_log(world, "queen"), timeout=5)


@then("the old token gets 401 and the new one 200")
def rotated(world: World) -> None:
    url = f"{world.queen_url}/v1/build-info"
    assert httpx.get(url, headers={"Authorization": f"Bearer {world.extra['old']}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {world.extra['new']}"}).status_code == 200


@then(parsers.parse('the queen\'s log says "{text}" without either token'))
def says_without(world: World, text: str) -> None:
    log = target_log(world, "queen")
    assert text in log and world.extra["old"] not in log and world.extra["new"] not in log


@then("the worker's token is its own, neither the queen's nor usable at the queen")
def own_token(world: World) -> None:
    pid = world.extra["worker"]["pid"]
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    own = variables[b"RBEE_API_TOKEN"].decode()
    assert own != world.extra["token"]
    assert httpx.get(f"{world.queen_url}/v1/build-info", headers={"Authorization": f"Bearer {own}"}).status_code == 401


@then("requests with the token without its newline are answered 200")
def without_newline(world: World) -> None:
    assert world.extra["given"].read_text().endswith("\n")
    assert httpx.get(f"{world.queen_url}/v1/build-info", headers=auth(world)).status_code == 200


# --- audit --------------------------------------------------------------------------------------


def audit_file(world: World, name: str) -> Path:
    return world.tmp / "state" / "rbee" / "audit" / name


def entries(world: World, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_file(world, name).read_text().splitlines()]


@when("I spawn a worker through the queen")
def spawn_through_queen(world: World) -> None:
    events, terminator = run_job(world.queen_url, {"operation": "worker_spawn", "model": "smollm2-135m",
                                                   "threads": 1})
    assert terminator == "[DONE]"
    world.extra["job_id"] = events[0]["job_id"]
    world.extra["worker"] = next(e["value"] for e in events if e["type"] == "result")


@then(parsers.parse('the queen\'s audit log has a "{kind}" entry with the actor, worker id, model, hive and the job\'s id'))
def spawn_entry(world: World, kind: str) -> None:
    (entry,) = [e for e in entries(world, "queen.jsonl") if e["event_type"] == kind]
    assert entry["actor"] == "loopback (no token)" and entry["outcome"] == "completed"
    assert entry["details"]["worker_id"] == world.extra["worker"]["worker_id"]
    assert entry["details"]["model"] == "smollm2-135m" and entry["details"]["hive_id"] == "localhost"
    assert entry["correlation_id"] == world.extra["job_id"] and entry["timestamp"].endswith("Z")


@then(parsers.parse('the hive\'s audit log has "auth.failure" with reason "{reason}" and "auth.success" with a fingerprint'))
def auth_entries(world: World, reason: str) -> None:
    found = entries(world, "hive-localhost.jsonl")
    failure = next(e for e in found if e["event_type"] == "auth.failure")
    success = next(e for e in found if e["event_type"] == "auth.success")
    assert failure["details"]["reason"] == reason and failure["outcome"] == "refused"
    assert success["actor"] == f"token:{fp(world.extra['token'])}"


@then("every audit entry has timestamp, event_type, actor, details, previous_hash and entry_hash")
def fields(world: World) -> None:
    for entry in entries(world, "hive-localhost.jsonl"):
        assert {"timestamp", "event_type", "actor", "details", "previous_hash", "entry_hash"} <= set(entry)


@then("the first entry's previous_hash is 64 zeros and each next one is the entry before's hash")
def chained(world: World) -> None:
    found = entries(world, "hive-localhost.jsonl")
    assert found[0]["previous_hash"] == "0" * 64
    assert all(b["previous_hash"] == a["entry_hash"] for a, b in itertools.pairwise(found))


@given(parsers.parse("a hive audit log with {count:d} entries"))
def log_with(world: World, count: int) -> None:
    token_hive_with(world, "audit_failure_window_s=0")  # one entry per refusal
    for _ in range(count):
        assert httpx.get(f"{world.extra['hive'].url}/v1/capabilities").status_code == 401
    assert wait_for(lambda: len(entries(world, "hive-localhost.jsonl")) >= count)


@when(parsers.parse("entry {number:d} is edited"))
def edit(world: World, number: int) -> None:
    path = audit_file(world, "hive-localhost.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1].replace('"refused"', '"allowed"')
    path.write_text("".join(lines))


@then(parsers.parse("rbee-keeper audit verify names line {number:d} and exits 1"))
def verify_names(world: World, number: int) -> None:
    done = subprocess.run([str(BIN / "rbee-keeper"), "audit", "verify"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and f"line {number}:" in done.stdout, done.stdout + done.stderr


@when(parsers.parse("{count:d} requests without a token have been refused"))
def refused_many(world: World, count: int) -> None:
    for _ in range(count):
        assert httpx.get(f"{world.extra['hive'].url}/v1/capabilities").status_code == 401


@then("the audit log was archived at least once")
def archived(world: World) -> None:
    assert list(audit_file(world, "x").parent.glob("hive-localhost-*.jsonl"))


@then("rbee-keeper audit verify passes across the archives")
@then("rbee-keeper audit verify passes")
def verify_passes(world: World) -> None:
    done = subprocess.run([str(BIN / "rbee-keeper"), "audit", "verify"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "the chain holds" in done.stdout, done.stdout + done.stderr


@then("the audit log holds neither token")
def neither(world: World) -> None:
    text = audit_file(world, "hive-localhost.jsonl").read_text()
    assert world.extra["token"] not in text and WRONG not in text and f"token:{fp(WRONG)}" in text


@when("the hive is restarted")
def restart_hive(world: World) -> None:
    world.extra["hive"].process.send_signal(signal.SIGTERM)
    world.extra["hive"].process.wait(10)
    world.extra["hive"] = world.extra["stack"].enter_context(daemon(world.extra["hive_argv"],
                                                                    env=world.extra["hive_env"]))


@then("the audit log's entries are numbered without a gap")
def numbered(world: World) -> None:
    found = entries(world, "hive-localhost.jsonl")
    assert [e["seq"] for e in found] == list(range(1, len(found) + 1)) and len(found) >= 2



@then(parsers.parse('the response error message is "{text}"'))
def response_message(world: World, text: str) -> None:
    assert world.response is not None and world.response.json()["error"]["message"] == text


@given("a hive with an API token whose state dir is on a 1 MB disk that is 96% full")
def small_disk_hive(world: World) -> None:
    disk = world.tmp / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    world.extra["stack"].callback(subprocess.run, ["umount", "-l", str(disk)], capture_output=True)
    total = shutil.disk_usage(disk).total
    (disk / "filler").write_bytes(b"x" * int(total * 0.96))
    world.extra["small_disk"] = disk
    path = token_path(world)
    world.extra["hive"] = world.extra["stack"].enter_context(daemon(
        [str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(path)],
        env={"XDG_STATE_HOME": str(disk / "state")}))


@then(parsers.parse('the audit log on the small disk has the "{kind}" entry'))
def small_disk_entry(world: World, kind: str) -> None:
    log = world.extra["small_disk"] / "state" / "rbee" / "audit" / "hive-localhost.jsonl"
    assert kind in [json.loads(line)["event_type"] for line in log.read_text().splitlines()]

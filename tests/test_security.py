"""Regression tests for the holes a hostile review found (issue: security, DESIGN §8).

Each test fails on the code before the fix: heartbeat hijack, 5xx on hostile
input, log injection, token rotation, the audit trail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.helpers import BIN, Daemon, daemon, job_result, run_job, wait_for
from rbee_common.audit import Broken, chain_files, default_key_path, load_key, verify
from rbee_common.auth import write_token_file
from tests.test_auth import TOKEN, token_file

AUTH = {"Authorization": f"Bearer {TOKEN}"}
HIVE_TOKEN = "hive-lab-1-token-0123456789abcdef"


def beat(url: str, *, worker_id: str = "worker-evil", hive_id: str = "lab-1", model: str = "smollm2-135m") -> dict[str, object]:
    return {"worker_id": worker_id, "hive_id": hive_id, "url": url, "model": model, "backend": "llama-cpp",
            "device": "CPU-0", "state": "ready", "slots_total": 4, "slots_busy": 0, "pid": 4242}


@pytest.fixture
def token_queen(isolated_dirs: Path) -> Iterator[Daemon]:
    """A queen with a token and one configured hive, lab-1 on loopback (not running), no cold starts."""
    hive_token = isolated_dirs / "lab-1.token"
    write_token_file(hive_token, HIVE_TOKEN)
    config = isolated_dirs / "queen.toml"
    config.write_text(f'[hives.lab-1]\nhost = "127.0.0.1"\ntoken_file = "{hive_token}"\n')
    argv = [str(BIN / "queen-rbee"), "--port", "0", "--config", str(config),
            "--api-token-file", str(token_file(isolated_dirs))]
    with daemon(argv, env={"RBEE_QUEEN__COLD_START": "false", "RBEE_QUEEN__QUEUE_TIMEOUT_S": "1"}) as queen:
        yield queen


def listed(queen: Daemon) -> list[dict[str, object]]:
    created = httpx.post(f"{queen.url}/v1/jobs", headers=AUTH, json={"operation": "worker_list_active"})
    with httpx.stream("GET", queen.url + created.json()["sse_url"], headers=AUTH) as stream:
        for line in stream.iter_lines():
            if '"type":"result"' in line:
                value = json.loads(line[6:])["value"]
                assert isinstance(value, list)
                return value
    return []


def test_the_heartbeat_route_authenticates_before_it_reads_a_body(token_queen: Daemon) -> None:
    url = f"{token_queen.url}/v1/worker-heartbeat"
    assert httpx.get(url).status_code == 401  # not 405
    assert httpx.post(url, content=b"{not json").status_code == 401  # not 400
    stranger = {"Authorization": "Bearer a-token-nobody-ever-issued-0123"}
    json_type = {"Content-Type": "application/json"}  # a non-JSON one is a 415 first (rbee_common/browser.py)
    assert httpx.post(url, content=b"{not json", headers={**stranger, **json_type}).status_code == 401
    assert httpx.post(url, json=beat("http://127.0.0.1:9350"), headers=stranger).status_code == 401
    assert listed(token_queen) == []


@pytest.mark.parametrize(("url", "why"), [
    ("http://10.231.99.7:9350", "host"),       # elsewhere: where prompts would leak
    ("http://127.0.0.1:8080", "port"),         # the hive's host, outside its worker port range
])
def test_a_hive_token_cannot_register_a_worker_anywhere(token_queen: Daemon, url: str, why: str) -> None:
    response = httpx.post(f"{token_queen.url}/v1/worker-heartbeat", json=beat(url),
                          headers={"Authorization": f"Bearer {HIVE_TOKEN}"})
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "WORKER_NOT_ALLOWED" and why in response.json()["error"]["message"]
    assert listed(token_queen) == []


def test_a_worker_its_hive_does_not_confirm_gets_no_prompts(token_queen: Daemon) -> None:
    response = httpx.post(f"{token_queen.url}/v1/worker-heartbeat", json=beat("http://127.0.0.1:9350"),
                          headers={"Authorization": f"Bearer {HIVE_TOKEN}"})
    assert response.status_code == 204
    (seen,) = listed(token_queen)
    assert seen["worker_id"] == "worker-evil" and seen["confirmed"] is False
    answer = httpx.post(f"{token_queen.url}/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "my secret prompt"}]})
    assert answer.status_code == 503, answer.text  # never sent to the unconfirmed "worker"
    assert "worker worker-evil of hive lab-1 not routed" in token_queen.log()


HOSTILE_JSON = [b"[" * 200_000, b'{"a":' * 100_000, b"\xff\xfe{}", b'{"operation": "infer", "model": "m", "max_tokens": 1e999999}']


def test_hostile_json_and_last_event_ids_are_400s_on_every_route(isolated_dirs: Path) -> None:
    argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]
    with daemon(argv) as queen, daemon([str(BIN / "rbee-hive"), "--port", "0"]) as hive:
        for body in HOSTILE_JSON:
            for url in (f"{queen.url}/v1/jobs", f"{queen.url}/v1/chat/completions", f"{queen.url}/v1/completions",
                        f"{queen.url}/v1/worker-heartbeat", f"{hive.url}/v1/jobs"):
                response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
                assert 400 <= response.status_code < 500, (url, body[:20], response.status_code, response.text[:200])
        for base in (queen.url, hive.url):
            created = httpx.post(f"{base}/v1/jobs", json={"operation": "model_list"}).json()
            for value in ("²", "³¹", "1²", "-1", "1" * 40):  # "²" is a digit to str.isdigit, not to int()
                response = httpx.get(base + created["sse_url"], headers={"Last-Event-ID": value.encode("latin-1")})
                assert response.status_code == 400, (value, response.text[:200])
                assert response.json()["error"]["details"]["field"] == "Last-Event-ID"
        assert httpx.get(f"{queen.url}/health").status_code == 200 and httpx.get(f"{hive.url}/health").status_code == 200


def test_client_strings_cannot_forge_a_log_line(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]) as queen:
        for path in ("/v1/nope%0A2026-01-01 00:00:00,000 ERROR queen forged: line", "/v1/x%1B[31mred%1B[0m",
                     "/v1/y%0D%0Aforged"):
            assert httpx.get(queen.url + path, headers=AUTH).status_code == 404
            assert httpx.get(queen.url + path).status_code == 401  # the auth failure logs the path too
        log = queen.log()
        assert not any(line.startswith(("2026-01-01 00:00:00,000 ERROR", "forged")) for line in log.splitlines())
        assert "\x1b" not in log and "\\x1b[31mred" in log and "\\n2026-01-01" in log


def test_sighup_rotates_the_token_without_dropping_an_open_stream(isolated_dirs: Path) -> None:
    path = token_file(isolated_dirs)
    argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--api-token-file", str(path)]
    with daemon(argv) as queen:
        created = httpx.post(f"{queen.url}/v1/jobs", headers=AUTH, json={
            "operation": "infer", "model": "smollm2-135m", "prompt": "Count: 1, 2, 3,", "max_tokens": 60,
            "temperature": 0})
        assert created.status_code == 201
        new = "rotated-token-0123456789abcdefgh"
        lines: list[str] = []
        with httpx.stream("GET", queen.url + created.json()["sse_url"], headers=AUTH, timeout=120) as stream:
            for line in stream.iter_lines():
                lines.append(line)
                if '"type":"token"' in line and len(lines) < 1000 and not any("rotated" in x for x in lines):
                    write_token_file(path, new)
                    os.kill(queen.process.pid, signal.SIGHUP)
                    assert wait_for(lambda: "API token reloaded" in queen.log(), timeout=5)
                    lines.append("rotated")
        assert [x for x in lines if x.startswith("data: ")][-1] == "data: [DONE]"  # the stream opened with the old token ran to its end
        assert httpx.get(f"{queen.url}/v1/build-info", headers=AUTH).status_code == 401
        assert httpx.get(f"{queen.url}/v1/build-info", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert TOKEN not in queen.log() and new not in queen.log()
        # a broken file on the next SIGHUP keeps the token that works
        path.write_text("")
        os.kill(queen.process.pid, signal.SIGHUP)
        assert wait_for(lambda: "API token not reloaded" in queen.log(), timeout=5)
        assert httpx.get(f"{queen.url}/v1/build-info", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_token_files_are_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / "token.tmp").symlink_to(target)
    write_token_file(tmp_path / "token", "a-new-token-0123456789abcdef")
    assert target.read_text() == "keep me"
    assert (tmp_path / "token").read_text() == "a-new-token-0123456789abcdef\n"
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600


def test_the_audit_log_chains_across_a_restart_and_any_one_byte_edit_is_found(isolated_dirs: Path) -> None:
    argv = [str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]
    for round_ in range(2):  # a restart in between: the chain goes on
        with daemon(argv) as hive:
            assert httpx.get(f"{hive.url}/v1/capabilities").status_code == 401
            wrong = {"Authorization": f"Bearer wrong-{round_}-0123456789abcdef"}
            assert httpx.get(f"{hive.url}/v1/capabilities", headers=wrong).status_code == 401
            created = httpx.post(f"{hive.url}/v1/jobs", headers=AUTH,
                                 json={"operation": "model_delete", "model": "hf:nobody/nothing"})
            assert created.status_code == 201
            with httpx.stream("GET", hive.url + created.json()["sse_url"], headers=AUTH) as stream:
                assert any("[ERROR]" in line for line in stream.iter_lines())
    log = isolated_dirs / "state" / "rbee" / "audit" / "hive-localhost.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event_type"] for e in entries]
    assert kinds.count("auth.failure") == 4 and kinds.count("auth.success") == 2 and kinds.count("model.delete") == 2
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    delete = next(e for e in entries if e["event_type"] == "model.delete")
    assert delete["outcome"] == "failed" and delete["actor"].startswith("token:") and delete["correlation_id"]
    text = log.read_bytes()
    assert TOKEN.encode() not in text and b"wrong-0" not in text
    done = subprocess.run([str(BIN / "rbee-keeper"), "audit", "verify"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and f"{len(entries)} entries" in done.stdout, done.stdout + done.stderr
    key = load_key(default_key_path(), create=False)
    for position in range(len(text)):  # every byte: a change anywhere is found
        edited = bytearray(text)
        edited[position] = ord("0") if text[position] != ord("0") else ord("1")
        log.write_bytes(bytes(edited))
        with pytest.raises(Broken):
            verify(chain_files(log), key)
    log.write_bytes(text.replace(b'"outcome":"failed"', b'"outcome":"passed"', 1))
    done = subprocess.run([str(BIN / "rbee-keeper"), "audit", "verify", str(log)], capture_output=True, text=True,
                          timeout=30)
    line = text[: text.index(b'"outcome":"failed"')].count(b"\n") + 1
    assert done.returncode == 1 and f"line {line}:" in done.stdout and "TAMPERED" in done.stdout


def test_a_job_failure_records_who_and_a_correlation_id_in_the_queens_audit_log(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"]) as queen:
        events, terminator = run_job(queen.url, {"operation": "worker_stop", "worker_id": "worker-nobody"})
        assert terminator.startswith("[ERROR]")
        cid = next(e["error"]["correlation_id"] for e in events if e.get("error"))  # type: ignore[index]
        assert job_result(queen.url, {"operation": "status"})
    entries = [json.loads(line) for line in
               (isolated_dirs / "state" / "rbee" / "audit" / "queen.jsonl").read_text().splitlines()]
    (stop,) = [e for e in entries if e["event_type"] == "worker.stop"]
    assert stop["correlation_id"] == cid and stop["outcome"] == "failed" and stop["actor"] == "loopback (no token)"
    assert stop["details"]["worker_id"] == "worker-nobody" and stop["details"]["error"] == "WORKER_NOT_FOUND"


def test_hive_get_shows_no_key_or_token_paths_and_not_found_names_no_hives(isolated_dirs: Path) -> None:
    key = isolated_dirs / "id_ed25519"
    key.write_text("not a key")
    config = isolated_dirs / "queen.toml"
    config.write_text(f'[hives.lab-1]\nhost = "127.0.0.1"\nidentity_file = "{key}"\n'
                      f'token_file = "{isolated_dirs}/lab-1.token"\n[hives.secret-lab]\nhost = "127.0.0.2"\n')
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)]) as queen:
        shown = job_result(queen.url, {"operation": "hive_get", "hive_id": "lab-1"})
        assert isinstance(shown, dict) and shown["host"] == "127.0.0.1"
        assert "identity_file" not in shown and "token_file" not in shown and str(isolated_dirs) not in str(shown)
        events, _ = run_job(queen.url, {"operation": "hive_get", "hive_id": "nowhere"})
        (error,) = [e["error"] for e in events if e.get("error")]
        assert error["code"] == "HIVE_NOT_FOUND" and "secret-lab" not in json.dumps(error)  # type: ignore[arg-type]


def test_sighup_rotates_the_hives_token_too(isolated_dirs: Path) -> None:
    path = token_file(isolated_dirs)
    with daemon([str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(path)]) as hive:
        new = "rotated-hive-token-0123456789abcd"
        write_token_file(path, new)
        os.kill(hive.process.pid, signal.SIGHUP)
        assert wait_for(lambda: "API token reloaded" in hive.log(), timeout=5)
        assert httpx.get(f"{hive.url}/v1/capabilities", headers=AUTH).status_code == 401
        assert httpx.get(f"{hive.url}/v1/capabilities", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert hive.process.poll() is None

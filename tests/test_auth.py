"""Bearer tokens (DESIGN §8): beyond loopback only with a token; every endpoint but /health wants it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from harness.helpers import BIN, daemon, wait_for
from rbee_common.auth import cached_token_file
from rbee_common.errors import ConfigError

TOKEN = "s3cret-token-for-tests-0123456789"


def token_file(directory: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = directory / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:6]


def test_a_token_queen_wants_it_everywhere_but_health(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]) as queen:
        assert httpx.get(f"{queen.url}/health").status_code == 200
        missing = httpx.get(f"{queen.url}/v1/build-info")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "MISSING_API_KEY"
        wrong = "wrong-token-that-is-long-enough"
        refused = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                             headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "INVALID_API_KEY"
        for header in (f"bearer {TOKEN}", f"Bearer{TOKEN}", f"Basic {TOKEN}"):
            odd = httpx.get(f"{queen.url}/v1/build-info", headers={"Authorization": header})
            assert odd.status_code == 401, header
        ok = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 201
        log = queen.log()
        assert f"token:{fingerprint(wrong)}" in log and f"token:{fingerprint(TOKEN)}" in log
        assert wrong not in log and TOKEN not in log


def test_beyond_loopback_a_daemon_refuses_to_start_without_a_token(isolated_dirs: Path) -> None:
    for program in ("queen-rbee", "rbee-hive"):
        done = subprocess.run([str(BIN / program), "--host", "0.0.0.0", "--port", "0"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, (program, done.stderr)
        assert "API token required for non-loopback bind" in done.stderr
        assert "--api-token-file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("text", "mode", "problem"), [
    (TOKEN + "\n", 0o644, "insecure permissions 0644; expected 0600"),
    (TOKEN + "\n", 0o640, "insecure permissions 0640; expected 0600"),
    ("", 0o600, "is empty"),
    ("   \n", 0o600, "contains only whitespace"),
    (TOKEN + "\nsecond line\n", 0o600, "must contain exactly one line"),
    ("short\n", 0o600, "shorter than 16 characters"),
])
def test_a_bad_token_file_stops_the_start_and_never_shows_the_token(
    isolated_dirs: Path, text: str, mode: int, problem: str
) -> None:
    path = token_file(isolated_dirs, text, mode)
    done = subprocess.run([str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert problem in done.stderr and str(path) in done.stderr
    assert TOKEN not in done.stderr and "Traceback" not in done.stderr


def test_a_missing_token_file_is_named(isolated_dirs: Path) -> None:
    missing = isolated_dirs / "nope.token"
    done = subprocess.run([str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(missing)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and f"API token file not found: {missing}" in done.stderr


def test_each_worker_gets_a_token_of_its_own_that_cannot_act_as_its_hive_or_queen(isolated_dirs: Path) -> None:
    """--local-hive with a token: the queen mints a token per worker (DESIGN §8: separate tokens)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--api-token-file", str(token_file(isolated_dirs))]
    with daemon(argv) as queen:
        created = httpx.post(f"{queen.url}/v1/jobs", headers=headers, json={
            "operation": "worker_spawn", "hive_id": "localhost", "model": "smollm2-135m", "threads": 1})
        assert created.status_code == 201
        result = None
        with httpx.stream("GET", queen.url + created.json()["sse_url"], headers=headers, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {") and '"type":"result"' in line:
                    result = json.loads(line[6:])["value"]
        assert result is not None
        worker = result["url"]

        def registered() -> bool:
            created = httpx.post(f"{queen.url}/v1/jobs", headers=headers, json={"operation": "worker_list_active"})
            with httpx.stream("GET", queen.url + created.json()["sse_url"], headers=headers) as stream:
                return any(result["worker_id"] in line for line in stream.iter_lines() if '"result"' in line)

        assert wait_for(registered, timeout=10), queen.log()[-2000:]
        with open(f"/proc/{result['pid']}/environ", "rb") as environ:
            variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        own = variables[b"RBEE_API_TOKEN"].decode()
        assert own != TOKEN and len(own) >= 32
        with open(f"/proc/{result['pid']}/cmdline", "rb") as cmdline:
            assert TOKEN.encode() not in cmdline.read() and own.encode() not in cmdline.read()
        assert httpx.get(f"{worker}/v1/ready").status_code == 401
        assert httpx.get(f"{worker}/v1/ready", headers=headers).status_code == 401  # not the queen's token
        assert httpx.get(f"{worker}/v1/ready", headers={"Authorization": f"Bearer {own}"}).status_code == 200
        # the worker's credential is no key to the queen's (or its hive's) API
        stolen = httpx.post(f"{queen.url}/v1/jobs", headers={"Authorization": f"Bearer {own}"},
                            json={"operation": "worker_list", "hive_id": "localhost"})
        assert stolen.status_code == 401
        assert result["token_sha256"] == hashlib.sha256(own.encode()).hexdigest()
        # and the queen still drives it: inference goes through with the worker's own token
        answer = httpx.post(f"{queen.url}/v1/completions", headers=headers, timeout=60,
                            json={"model": "smollm2-135m", "prompt": "The sky is", "max_tokens": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        assert queen.log().count(") registered: ") == 1  # that worker served it: no cold start of another
        assert own not in queen.log()


def test_the_keeper_presents_rbee_api_token(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]) as queen:
        ok = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", queen.url, "status"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "RBEE_API_TOKEN": TOKEN})
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run([str(BIN / "rbee-keeper"), "--queen-url", queen.url, "status"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "Missing API key" in refused.stderr and "Traceback" not in refused.stderr
        assert "export RBEE_API_TOKEN=" in refused.stderr and "Authorization" not in refused.stderr


def test_a_cached_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """The queen asks for a hive's token on every heartbeat; a rotated or opened-up file is seen."""
    path = token_file(tmp_path)
    assert cached_token_file(path) == TOKEN
    rotated = "another-token-0123456789abcdefgh"
    path.write_text(rotated + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert cached_token_file(path) == rotated
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="insecure permissions"):
        cached_token_file(path)


"""Security, third pass: each finding of the hostile review, reproduced against real daemons.

1. A web page drives a no-token daemon: cross-site form POSTs and DNS rebinding (queen and hive).
2. One request crashes the worker (a grammar from a hostile JSON schema), and the queen retried it.
3. Embeddings without bounds, and work that went on after its client left.
4. The audit log: a line per refused request, archives never pruned, a chain anyone could recompute.
5. A hostile GGUF header breaks /api/tags for everyone.
6. Status codes: 503 for a malformed schema or a too-long prompt; unknown field names echoed whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from harness.fake_hf import FakeHub
from harness.helpers import BIN, Daemon, active_workers, daemon, isolated_env, job_result, run_job, wait_for
from rbee_common.audit import canonical
from rbee_common.browser import BrowserGuard, host_allowed, origin_allowed
from rbee_common.grammar_limits import MAX_REPEAT
from rbee_common.sizing import GgufError, gguf_metadata
from rbee_common.wire import MAX_EMBED_INPUTS, MAX_EMBED_TOKENS
from tests.test_auth import TOKEN, token_file

MODEL = "smollm2-135m"
ATTACKER = "http://attacker.example"
CHAT = [{"role": "user", "content": "Say hi."}]
EVIL_REPO = "evil-org/nested-GGUF"


def nested_gguf(depth: int = 5000) -> bytes:
    """A 60 KB GGUF whose one header value is an array nested `depth` deep (anyone may publish one)."""
    key = b"hostile.nested"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * depth
    return data + struct.pack("<IQI", 4, 1, 0)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    with FakeHub(tmp_path_factory.mktemp("hub")) as running:
        running.add_file(EVIL_REPO, "nested.Q4_K_M.gguf", nested_gguf())
        yield running


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Daemon]:
    """A no-token queen with its local hive and one worker of the built-in model (one thread)."""
    root = tmp_path_factory.mktemp("hostile")
    env = {**isolated_env(root), "HF_ENDPOINT": hub.url}
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env) as running:
        running.root = root  # type: ignore[attr-defined]
        job_result(running.url, {"operation": "worker_spawn", "model": MODEL, "threads": 1})
        yield running


def active(queen: Daemon) -> list[dict[str, Any]]:
    return active_workers(queen.url)


def worker_log(queen: Daemon, worker_id: str) -> str:
    return (queen.root / "state" / "rbee" / "workers" / f"{worker_id}.log").read_text()  # type: ignore[attr-defined]


# --- 1. browsers ------------------------------------------------------------------------------

FORMS = [
    ("/v1/jobs", {"operation": "worker_spawn", "model": MODEL, "threads": 1}),
    ("/v1/jobs", {"operation": "model_download", "model": "hf:evil-org/nested-GGUF"}),
    ("/api/pull", {"model": "hf.co/evil-org/nested-GGUF"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2}),
    ("/v1/shutdown", None),
]
FORM_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]


@pytest.mark.parametrize(("path", "body"), FORMS)
def test_a_cross_site_form_post_drives_nothing_on_the_queen(queen: Daemon, path: str, body: Any) -> None:
    before = [w["worker_id"] for w in active(queen)]
    content = json.dumps(body).encode() if body is not None else b""
    for content_type in FORM_TYPES:
        # What a <form> or a no-cors fetch from any page sends: refused for its origin...
        sent = httpx.post(queen.url + path, content=content,
                          headers={"Content-Type": content_type, "Origin": ATTACKER})
        assert sent.status_code == 403 and sent.json()["error"]["code"] == "ORIGIN_REFUSED", sent.text
        # ...and, without an Origin, for its content type (no browser sends JSON cross-site unasked).
        sent = httpx.post(queen.url + path, content=content, headers={"Content-Type": content_type})
        assert sent.status_code == 415 and sent.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE", sent.text
    assert httpx.post(queen.url + path, content=content,
                      headers={"Content-Type": "application/json", "Origin": "null"}).status_code == 403
    assert httpx.get(f"{queen.url}/health").status_code == 200
    assert [w["worker_id"] for w in active(queen)] == before
    listed = httpx.get(f"{queen.url}/api/tags").json()["models"]
    assert not any("nested" in model["name"] for model in listed)


def test_the_shutdown_route_wants_a_json_body(queen: Daemon) -> None:
    bare = httpx.post(f"{queen.url}/v1/shutdown")
    assert bare.status_code == 415
    text = httpx.post(f"{queen.url}/v1/shutdown", content=b"", headers={"Content-Type": "application/json"})
    assert text.status_code == 400 and "JSON object" in text.json()["error"]["message"]
    assert queen.process.poll() is None and httpx.get(f"{queen.url}/health").status_code == 200


def test_a_rebinding_host_is_refused_and_loopback_names_are_not(queen: Daemon) -> None:
    port = queen.url.rpartition(":")[2]
    for path in ("/health", "/v1/models", "/api/tags", "/v1/jobs"):
        refused = httpx.get(queen.url + path, headers={"Host": f"attacker.example:{port}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "HOST_REFUSED", path
        assert "attacker" not in refused.text
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"app.localhost:{port}"):
        assert httpx.get(f"{queen.url}/v1/models", headers={"Host": host}).status_code == 200, host
    sneaky = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                        headers={"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"})
    assert sneaky.status_code == 403


def test_the_dashboards_own_origin_may_post(queen: Daemon) -> None:
    port = queen.url.rpartition(":")[2]
    same = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                      headers={"Origin": f"http://127.0.0.1:{port}"})
    assert same.status_code == 201, same.text
    other_port = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                            headers={"Origin": "http://127.0.0.1:1"})
    assert other_port.status_code == 403


def test_the_hive_refuses_cross_site_requests_too(isolated_dirs: Path) -> None:
    with daemon([str(BIN / "rbee-hive"), "--port", "0"]) as hive:
        port = hive.url.rpartition(":")[2]
        spawn = json.dumps({"operation": "worker_spawn", "model": MODEL, "threads": 1}).encode()
        for path, body in (("/v1/jobs", spawn), ("/v1/shutdown", b"")):
            sent = httpx.post(hive.url + path, content=body, headers={"Content-Type": "text/plain", "Origin": ATTACKER})
            assert sent.status_code == 403, sent.text
            assert httpx.post(hive.url + path, content=body,
                              headers={"Content-Type": "text/plain"}).status_code == 415
        rebound = httpx.get(f"{hive.url}/v1/capabilities", headers={"Host": f"rebind.example:{port}"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "HOST_REFUSED"
        assert httpx.get(f"{hive.url}/v1/capabilities").status_code == 200
        workers = job_result(hive.url, {"operation": "worker_list"})
        assert workers == [] and hive.process.poll() is None


def test_a_token_does_not_let_a_foreign_page_in(isolated_dirs: Path) -> None:
    argv = [str(BIN / "queen-rbee"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with daemon(argv) as queen:
        refused = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"}, headers={**auth, "Origin": ATTACKER})
        assert refused.status_code == 403
        assert httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"}, headers=auth).status_code == 201


def test_listed_origins_and_hosts_are_let_in(isolated_dirs: Path) -> None:
    config = isolated_dirs / "config.toml"
    config.write_text('[queen]\nallowed_origins = ["https://dash.example:8443"]\nallowed_hosts = ["rbee.lan"]\n')
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--config", str(config)]) as queen:
        port = queen.url.rpartition(":")[2]
        listed = httpx.post(f"{queen.url}/v1/jobs", json={"operation": "status"},
                            headers={"Origin": "https://dash.example:8443"})
        assert listed.status_code == 201
        assert httpx.get(f"{queen.url}/v1/models", headers={"Host": f"rbee.lan:{port}"}).status_code == 200
        assert httpx.get(f"{queen.url}/v1/models", headers={"Host": f"other.lan:{port}"}).status_code == 403


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8500", True), ("[::1]:8500", True), ("10.0.0.5:8500", True), ("localhost", True),
    ("x.localhost:1", True), ("LOCALHOST.:8500", True), ("evil.example:8500", False), ("127.0.0.1.evil.example", False),
    ("", False), ("a b", False), ("user@127.0.0.1", False), ("localhost.evil.example", False),
])
def test_which_hosts_a_daemon_answers(host: str, allowed: bool) -> None:
    assert host_allowed(host, BrowserGuard()) is allowed


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    ("http://127.0.0.1:8500", "127.0.0.1:8500", True), ("http://localhost:8500", "localhost:8500", True),
    ("http://127.0.0.1:8501", "127.0.0.1:8500", False), ("https://rbee.lan", "rbee.lan", False),
    ("https://127.0.0.1:8500", "127.0.0.1:8500", True),
    ("http://evil.example", "127.0.0.1:8500", False), ("null", "127.0.0.1:8500", False),
    ("http://evil.example:8500", "evil.example:8500", False), ("http://127.0.0.1", "127.0.0.1", True),
    ("file://", "127.0.0.1:8500", False), ("javascript:alert(1)", "127.0.0.1:8500", False),
])
def test_which_origins_are_the_daemons_own(origin: str, host: str, allowed: bool) -> None:
    assert origin_allowed(origin, host, BrowserGuard()) is allowed


# --- 2. hostile schemas, and no retry after a worker died ----------------------------------------


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


HOSTILE_SCHEMAS = {
    "maxLength": {"type": "string", "maxLength": 100000},
    "maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": 100000},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 100000000},
    "pattern": {"type": "string", "pattern": "^a{0,100000}$"},
    "deep": json.loads('{"type":"object","properties":{"a":' * 40 + '{"type":"string"}' + "}}" * 40),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_SCHEMAS))
def test_a_hostile_schema_is_a_400_on_every_dialect_and_no_worker_sees_it(queen: Daemon, kind: str) -> None:
    before = active(queen)
    schema = HOSTILE_SCHEMAS[kind]
    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,  # type: ignore[arg-type]
                                       response_format=_schema(schema))  # type: ignore[arg-type]
    assert bad.value.code == "limit_exceeded" and "response_format" in str(bad.value), bad.value
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                       "properties": {"x": schema}}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, tools=[tool],  # type: ignore[list-item]
                                       tool_choice="required")
    claude = anthropic.Anthropic(base_url=queen.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=4, messages=CHAT,  # type: ignore[arg-type]
                               tools=[{"name": "f", "input_schema": {"type": "object", "properties": {"x": schema}}}],
                               tool_choice={"type": "any"})
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=queen.url).chat(model=MODEL, messages=CHAT, format=schema)
    assert refused.value.status_code == 400
    after = active(queen)
    assert [(w["worker_id"], w["pid"]) for w in after] == [(w["worker_id"], w["pid"]) for w in before]


def test_the_worker_refuses_a_hostile_schema_itself_and_survives_the_largest_bound(queen: Daemon) -> None:
    (worker,) = active(queen)
    body = {"messages": CHAT, "max_tokens": 3, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": HOSTILE_SCHEMAS["maxLength"]}}
    refused = httpx.post(f"{worker['url']}/v1/inference", json=body, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["details"]["limit"] == MAX_REPEAT
    # The largest bound that is let through builds and runs: the grammar thread has room for it.
    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
    for schema in ({"type": "string", "maxLength": MAX_REPEAT},
                   {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": MAX_REPEAT}):
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,  # type: ignore[arg-type]
                                               temperature=0, response_format=_schema(schema))  # type: ignore[arg-type]
        assert reply.choices[0].message.content
    assert active(queen)[0]["pid"] == worker["pid"]
    assert os.kill(int(worker["pid"]), 0) is None


def test_a_malformed_schema_and_a_prompt_too_long_are_400s_in_each_dialects_shape(queen: Daemon) -> None:
    (worker,) = active(queen)
    client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,  # type: ignore[arg-type]
                                       response_format=_schema({"type": "object", "properties": [1]}))  # type: ignore[arg-type]
    # Longer than the model's own context (8,192): no worker could take it; the error says so.
    long = [{"role": "user", "content": "word " * 10000}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=3)  # type: ignore[arg-type]
    assert too_long.value.code == "context_length_exceeded"
    assert re.search(r"maximum context length is 8192 tokens\. However, your messages resulted in \d{5} tokens",
                     str(too_long.value)), too_long.value
    with pytest.raises(anthropic.BadRequestError) as claude_too_long:
        anthropic.Anthropic(base_url=queen.url, api_key="x", max_retries=0).messages.create(
            model=MODEL, max_tokens=16000, messages=long)  # type: ignore[arg-type]
    assert re.fullmatch(r"prompt is too long: \d{5} tokens > 8192 maximum",
                        claude_too_long.value.body["error"]["message"])  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as ollama_too_long:
        ollama.Client(host=queen.url).chat(model=MODEL, messages=long)
    assert ollama_too_long.value.status_code == 400
    assert "exceeds the context length" in str(ollama_too_long.value) and "8192" in str(ollama_too_long.value)
    assert [w["pid"] for w in active(queen)] == [worker["pid"]]  # nobody started a worker for them


def test_a_prompt_too_long_for_a_worker_but_not_for_the_model_gets_a_worker_with_room(
    isolated_dirs: Path,
) -> None:
    """As Ollama with num_ctx: the built-in model was trained for 8,192 tokens; this hive's workers
    hold 2,048 a sequence. A 3,000-token prompt is answered by a worker started with room for it."""
    config = isolated_dirs / "config.toml"
    config.write_text("[hive]\nworker_ctx = 2048\n")
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)]) as queen:
        job_result(queen.url, {"operation": "worker_spawn", "model": MODEL, "threads": 1})
        client = openai.OpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
        long = [{"role": "user", "content": "Count the words: " + "word " * 3000}]
        reply = client.chat.completions.create(model=MODEL, messages=long, max_tokens=3)  # type: ignore[arg-type]
        assert reply.usage is not None and 3000 < reply.usage.prompt_tokens < 4096 - 1024
        contexts = sorted(w["ctx"] for w in active(queen))
        assert contexts == [2048, 4096], contexts
        assert "starting one with a context of 4096 tokens" in queen.log()


def test_an_unknown_field_name_is_quoted_short(queen: Daemon) -> None:
    name = "f" * 300_000
    body = json.dumps({"model": MODEL, "messages": CHAT, name: 1})
    answer = httpx.post(f"{queen.url}/v1/chat/completions", content=body,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and len(answer.content) < 1000, len(answer.content)


@pytest.fixture
def synthetic_queen(isolated_dirs: Path) -> Iterator[Daemon]:
    """A queen whose local hive starts synthetic workers (test doubles for the model's text): two
    slots, a token every 2 s, so a request is held before its first token."""
    config = isolated_dirs / "config.toml"
    config.write_text("[hive]\nsynthetic_backend = true\nsynthetic_slots = 2\nsynthetic_tokens_per_s = 0.5\n")
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)]) as queen:
        job_result(queen.url, {"operation": "worker_spawn", "model": MODEL})
        yield queen


def test_a_request_whose_worker_died_is_not_retried_and_every_client_is_told(synthetic_queen: Daemon) -> None:
    queen = synthetic_queen
    (worker,) = active(queen)
    answers: list[httpx.Response] = []

    def ask(stream: bool) -> None:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": stream}
        answers.append(httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=60))

    clients = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
    for client in clients:
        client.start()
    assert wait_for(lambda: any(w["slots_busy"] == 2 for w in active(queen)), timeout=10)
    os.kill(int(worker["pid"]), signal.SIGSEGV)  # as a crash in llama.cpp would end it
    for client in clients:
        client.join(30)
    assert len(answers) == 2
    for answer in answers:
        assert "worker_died" in answer.text, answer.text
    log = queen.log()
    died = [line for line in log.splitlines() if "died while serving request_id=" in line]
    assert len(died) == 2 and all("not retried" in line and "correlation_id=" in line for line in died)
    # Not retried: no worker was cold-started for them.
    time.sleep(1)
    assert job_result(queen.url, {"operation": "worker_list"}) == []
    assert "starting one on hive" not in log


# --- 3. embeddings ------------------------------------------------------------------------------


def test_embedding_inputs_are_capped_on_every_route(queen: Daemon) -> None:
    many = ["a"] * (MAX_EMBED_INPUTS + 1)
    answer = httpx.post(f"{queen.url}/api/embed", json={"model": MODEL, "input": many}, timeout=30)
    assert answer.status_code == 400 and str(MAX_EMBED_INPUTS) in answer.text
    answer = httpx.post(f"{queen.url}/v1/embeddings", json={"model": MODEL, "input": many}, timeout=30)
    assert answer.status_code == 400 and str(MAX_EMBED_INPUTS) in answer.text
    words = ["one two three four five six seven eight nine ten"] * MAX_EMBED_INPUTS  # ~20k tokens
    answer = httpx.post(f"{queen.url}/api/embed", json={"model": MODEL, "input": words}, timeout=60)
    assert answer.status_code == 400 and str(MAX_EMBED_TOKENS) in answer.text, answer.text


def test_an_embedding_request_stops_when_its_client_leaves(queen: Daemon) -> None:
    (worker,) = active(queen)
    texts = [f"sentence number {k} about the weather in a city" for k in range(600)]  # ~7k tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{queen.url}/v1/embeddings", json={"model": MODEL, "input": texts},
                   timeout=httpx.Timeout(10, read=1.0))
    assert wait_for(lambda: "embedding stopped before input" in worker_log(queen, worker["worker_id"]), timeout=30)
    line = next(x for x in worker_log(queen, worker["worker_id"]).splitlines() if "embedding stopped" in x)
    stopped_at, total = (int(n) for n in line.split("before input ")[1].split(":")[0].split(" of "))
    assert stopped_at < total == len(texts)
    one = httpx.post(f"{queen.url}/v1/embeddings", json={"model": MODEL, "input": ["hello"]}, timeout=60)
    assert one.status_code == 200 and len(one.json()["data"]) == 1
    assert [(w["worker_id"], w["pid"]) for w in active(queen)] == [(worker["worker_id"], worker["pid"])]


# --- 4. the audit log ---------------------------------------------------------------------------


def _audit(root: Path, name: str = "hive-localhost.jsonl") -> Path:
    return root / "state" / "rbee" / "audit" / name


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rbee-keeper"), "audit", "verify", *args], capture_output=True, text=True,
                          timeout=30)


def test_refusals_from_one_source_are_counted_not_each_written(isolated_dirs: Path) -> None:
    argv = [str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", str(token_file(isolated_dirs))]
    with daemon(argv) as hive:
        for _ in range(50):
            assert httpx.get(f"{hive.url}/v1/capabilities").status_code == 401
    failures = [json.loads(line) for line in _audit(isolated_dirs).read_text().splitlines()
                if '"auth.failure"' in line]
    assert len(failures) == 2 and sum(e["details"]["count"] for e in failures) == 50
    assert {e["details"]["source"] for e in failures} == {"127.0.0.1"}
    assert failures[1]["details"]["reasons"] == {"missing_header": 49}


def _refuse_many(root: Path, count: int, settings: str) -> None:
    """A hive with a token and `settings` ([hive] lines) refuses `count` requests, then stops."""
    config = root / "config.toml"
    config.write_text(f"[hive]\naudit_failure_window_s = 0\n{settings}")
    argv = [str(BIN / "rbee-hive"), "--port", "0", "--config", str(config),
            "--api-token-file", str(token_file(root))]
    with daemon(argv) as hive:
        for _ in range(count):
            assert httpx.get(f"{hive.url}/v1/capabilities").status_code == 401


def test_archives_are_pruned_and_the_chain_says_so(isolated_dirs: Path) -> None:
    _refuse_many(isolated_dirs, 60, "audit_max_bytes = 2048\naudit_max_total_bytes = 4096\n")
    log = _audit(isolated_dirs)
    archives = sorted(log.parent.glob("hive-localhost-*.jsonl"))
    assert archives and sum(a.stat().st_size for a in archives) <= 4096
    assert '"audit.prune"' in "".join(p.read_text() for p in [*archives, log])
    done = _verify()
    assert done.returncode == 0 and "pruned" in done.stdout, done.stdout + done.stderr


@pytest.fixture
def written_log(isolated_dirs: Path) -> Path:
    """A hive's audit log of a dozen entries, its head anchored at the hive's shutdown."""
    _refuse_many(isolated_dirs, 12, "")
    assert _verify().returncode == 0
    return _audit(isolated_dirs)


def _rechain(lines: list[str], key: bytes | None = None) -> list[str]:
    """What an editor without the key can do: recompute every hash after a change (plain SHA-256, or
    an HMAC under a key of their own)."""
    import hmac

    previous = "0" * 64
    out = []
    for seq, line in enumerate(lines, start=1):
        entry = json.loads(line)
        entry["seq"], entry["previous_hash"] = seq, previous
        body = {k: v for k, v in entry.items() if k != "entry_hash"}
        data = (previous + canonical(body)).encode()
        previous = hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()
        entry["entry_hash"] = previous
        out.append(canonical(entry))
    return out


def test_cutting_off_the_last_entries_is_found(written_log: Path) -> None:
    lines = written_log.read_text().splitlines(keepends=True)
    written_log.write_text("".join(lines[:-3]))
    done = _verify()
    assert done.returncode == 1 and "cut off the end" in done.stdout, done.stdout


@pytest.mark.parametrize("key", [None, b"a key of the editor's own choosing"])
def test_an_edit_or_deletion_with_the_hashes_recomputed_is_found(written_log: Path, key: bytes | None) -> None:
    lines = written_log.read_text().splitlines()
    edited = [line.replace('"refused"', '"ok"') if k == 4 else line for k, line in enumerate(lines)]
    written_log.write_text("\n".join(_rechain(edited, key)) + "\n")
    done = _verify()
    assert done.returncode == 1 and "line 1:" in done.stdout and "MAC" in done.stdout, done.stdout
    written_log.write_text("\n".join(_rechain(lines[:5] + lines[6:], key)) + "\n")
    assert _verify().returncode == 1


def test_verify_without_the_key_proves_nothing_and_says_so(written_log: Path, isolated_dirs: Path) -> None:
    (isolated_dirs / "config" / "rbee" / "audit.key").unlink()
    done = _verify()
    assert done.returncode == 1 and "audit key" in done.stderr


# --- 5. a hostile GGUF header -------------------------------------------------------------------


def test_a_nested_gguf_header_is_refused_without_recursion(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    path.write_bytes(nested_gguf(100_000))
    with pytest.raises(GgufError, match="nests arrays"):
        gguf_metadata(path)
    path.write_bytes(nested_gguf(1)[:-6])
    with pytest.raises(GgufError):
        gguf_metadata(path)


def test_a_nested_gguf_in_the_catalog_breaks_no_listing(queen: Daemon) -> None:
    job_result(queen.url, {"operation": "model_download", "model": f"hf:{EVIL_REPO}"})
    tags = httpx.get(f"{queen.url}/api/tags", timeout=30)
    assert tags.status_code == 200 and any("nested" in m["name"] for m in tags.json()["models"])
    name = next(m["name"] for m in tags.json()["models"] if "nested" in m["name"])
    shown = httpx.post(f"{queen.url}/api/show", json={"model": name}, timeout=30)
    assert shown.status_code == 200, shown.text
    events, terminator = run_job(queen.url, {"operation": "worker_spawn", "model": f"hf:{EVIL_REPO}",
                                             "threads": 1})
    assert terminator.startswith("[ERROR]")
    failure = next(e for e in events if e.get("action") == "job_failed")
    assert failure["error"]["code"] != "INTERNAL_ERROR", failure  # type: ignore[index]
    assert httpx.get(f"{queen.url}/api/tags", timeout=30).status_code == 200

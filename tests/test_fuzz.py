"""Property tests over the decoders and validators, and a fuzz of hostile requests
against a real queen and a real hive (security issue, SCENARIOS VAL-020).

The fuzz sends more than 1,000 generated requests in five categories (bodies,
headers, paths, ids, Last-Event-ID), a quarter of them as a web page would
(a foreign or `null` Origin, a DNS-rebinding Host), and asserts: no 5xx, no
echo of the payload (each carries a unique marker), every page's request
refused with 403, no file written outside the data dirs, and both daemons
healthy afterwards.
"""

from __future__ import annotations

import contextlib
import json
import random
import string
from collections import Counter
from pathlib import Path, PurePosixPath

import httpx
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.helpers import BIN, daemon
from rbee_common.audit import canonical, entry_hash
from rbee_common.config import HOST_PATTERN, HiveEntry
from rbee_common.errors import InvalidRequest, RbeeError
from rbee_common.grammar_limits import check_schema
from rbee_common.modelref import parse_hf
from rbee_common.sizing import GgufError, gguf_metadata
from rbee_common.validation import decode_body
from rbee_common.wire import WorkerHeartbeat, operation_decoder
from rbee_hive.catalog import check_reference
from rbee_hive.downloads import UnsafeFileName, check_file_name
from rbee_queen.heartbeats import Placement, placement_problem
from tests.test_auth import TOKEN, token_file

# --- properties -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_operation_decoder_answers_any_bytes_with_a_value_or_a_400(body: bytes) -> None:
    try:
        decode_body(body, operation_decoder)
    except InvalidRequest as error:
        assert error.status == 400


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["operation", "model", "hive_id", "worker_id", "device", "threads",
                                        "worker_token", "max_tokens", "prompt"]),
                       json_values, max_size=6))
@example({"operation": "worker_get", "worker_id": "worker-1\n"})
def test_decoded_operations_hold_only_valid_ids(fields: dict[str, object]) -> None:
    try:
        operation = decode_body(json.dumps(fields).encode(), operation_decoder)
    except InvalidRequest:
        return
    for name in ("hive_id", "worker_id"):
        value = getattr(operation, name, None)
        assert value is None or (isinstance(value, str) and all(c.isalnum() or c in "._-" for c in value))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60) | st.lists(st.sampled_from(["a", "..", ".", "", "/", "b.gguf", "\\", "\n"]),
                                       max_size=6).map("/".join))
def test_an_accepted_hub_file_name_never_leaves_its_folder(name: str) -> None:
    try:
        check_file_name(name)
    except UnsafeFileName:
        return
    root = PurePosixPath("/models/x")
    parts: list[str] = []
    for part in PurePosixPath(name).parts:
        assert part not in ("..", "/")
        parts.append(part)
    assert str(root.joinpath(*parts)).startswith("/models/x/")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_model_references_are_refused_or_harmless(ref: str) -> None:
    try:
        check_reference(ref)
    except RbeeError as error:
        assert error.status == 400 and (len(ref) < 4 or ref not in error.message)
        return
    assert ref.isascii() and ".." not in ref and not any(c in ref for c in ";|&$`'\"<> \t\n\r\\")
    parsed = parse_hf(ref)
    assert parsed is None or "/" in parsed.repo


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
@example("0\n")  # `$` matched before a final newline: every pattern now ends with `\Z`
def test_an_accepted_host_has_nothing_a_shell_or_ssh_would_read(host: str) -> None:
    try:
        msgspec.convert({"host": host}, HiveEntry)
    except msgspec.ValidationError:
        return
    import re

    assert re.match(HOST_PATTERN, host) and not host.startswith("-")
    assert not any(c in host for c in " ;|&$`'\"<>()\\\n\t*?!#~=")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60), st.integers(0, 70000))
def test_placement_never_fails_and_accepts_only_its_range(url: str, port: int) -> None:
    placement = Placement("127.0.0.1", 9300, 9399)
    problem = placement_problem(url, placement)
    problem_port = placement_problem(f"http://127.0.0.1:{port}", placement)
    assert (problem_port is None) == (9300 <= port <= 9399)
    assert problem is None or isinstance(problem, str)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_an_audit_entry_hash_covers_every_field(details: dict[str, object]) -> None:
    entry = {"seq": 1, "previous_hash": "0" * 64, "details": details, "event_type": "x"}
    digest = entry_hash(entry)
    assert digest == entry_hash(json.loads(canonical(entry)))
    changed = {**entry, "details": {**details, "added": 1}}
    assert entry_hash(changed) != digest


@settings(max_examples=300, deadline=None)
@given(json_values)
@example({"maxLength": 10**30})
@example({"pattern": "(a{0,999}){0,999}"})
def test_a_schema_check_answers_any_json_with_nothing_or_a_400(schema: object) -> None:
    try:
        check_schema("response_format", schema)
    except InvalidRequest as error:
        assert error.status == 400 and error.details["field"] == "response_format"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_a_gguf_header_of_any_bytes_is_read_or_refused(tail: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as file:
        file.write(b"GGUF\x03\x00\x00\x00" + tail)
        file.flush()
        with contextlib.suppress(GgufError):
            gguf_metadata(file.name)


def test_heartbeat_model_is_a_model_reference() -> None:
    beat = {"worker_id": "w", "hive_id": "h", "url": "http://127.0.0.1:9300", "backend": "llama-cpp",
            "device": "CPU-0", "state": "ready", "slots_total": 1, "slots_busy": 0, "pid": 1}
    for model in ("x\n2026 forged", "\x1b[31mred", "a b", "m" * 600):
        with pytest.raises(InvalidRequest):
            decode_body(json.dumps({**beat, "model": model}).encode(), msgspec.json.Decoder(WorkerHeartbeat))


# --- the fuzz ---------------------------------------------------------------------

HOSTILE = ["../../etc/passwd", "/etc/passwd", "a/../../b", "x;touch /tmp/FUZZ", "$(id)", "`id`", "a|b",
           "\n2026 forged", "\x1b[31m", "\x00", "'; DROP TABLE x; --", "<script>alert(1)</script>", "%s%n",
           "é", "\u202e", "A" * 5000, "file:///etc/shadow", "hf:../x", "hf:a/b:../../c.gguf", "-oProxyCommand=x"]
OPERATIONS = ["status", "hive_list", "hive_get", "hive_status", "worker_list_active", "infer", "worker_spawn",
              "worker_list", "worker_get", "worker_stop", "model_download", "model_list", "model_get",
              "model_delete", "ssh_test", "hive_install", "embed", "nonsense"]
FIELDS = ["model", "hive_id", "worker_id", "device", "backend", "threads", "prompt", "messages", "max_tokens",
          "stop", "seed", "response_format", "worker_token", "force", "purge", "provider", "input", "tools",
          "tool_choice", "logprobs", "logit_bias"]


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.count = 0

    def marker(self) -> str:
        self.count += 1
        return f"ZQ{self.count}FZ"

    def value(self, marker: str) -> object:
        kind = self.random.randrange(8)
        hostile = self.random.choice(HOSTILE)
        if kind == 0:
            return hostile + marker
        if kind == 1:
            return marker + hostile
        if kind == 2:
            return self.random.choice([-1, 0, 2**63, 1e308, True, None])
        if kind == 3:
            return [hostile + marker] * self.random.randrange(1, 4)
        if kind == 4:
            return {"role": "user", "content": marker}
        if kind == 5:
            return "".join(self.random.choice(string.printable) for _ in range(20)) + marker
        if kind == 6:
            return f"hf:org/{marker}"
        return f"file:///tmp/{marker}.gguf"

    def body(self, marker: str) -> bytes:
        kind = self.random.randrange(5)
        if kind == 0:
            return bytes(self.random.randrange(256) for _ in range(self.random.randrange(1, 200))) + marker.encode()
        if kind == 1:
            depth = self.random.randrange(1000, 100_000)
            return self.random.choice([b"[", b'{"a":']) * depth + marker.encode()
        fields: dict[str, object] = {"operation": self.random.choice(OPERATIONS)}
        for name in self.random.sample(FIELDS, self.random.randrange(1, 5)):
            fields[name] = self.value(marker)
        if kind == 3:
            fields = {"model": self.value(marker), "messages": [{"role": self.value(marker),
                                                                  "content": self.value(marker)}],
                      "max_tokens": self.value(marker), "stream": self.random.choice([True, "yes", 1])}
        if kind == 4:  # what the dialects take: tools, options, inputs, names
            fields = {"model": self.value(marker), "messages": [{"role": "user", "content": self.value(marker)}],
                      "tools": [{"type": "function", "function": {"name": self.value(marker),
                                                                  "parameters": self.value(marker)}}],
                      "tool_choice": self.value(marker), "options": {marker: self.value(marker)},
                      "input": self.value(marker), "name": self.value(marker), "max_tokens": 1,
                      "logprobs": self.value(marker), "logit_bias": {marker: 1}}
        return json.dumps(fields).encode()


def _request(fuzz: Fuzzer, client: httpx.Client, base: str, category: str, job_url: str) -> tuple[httpx.Response, str]:
    marker = fuzz.marker()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rnd = fuzz.random
    if category == "bodies":
        path = rnd.choice(["/v1/jobs", "/v1/chat/completions", "/v1/completions", "/v1/worker-heartbeat",
                           "/v1/shutdown-not", "/v1/jobs/x", "/v1/embeddings", "/v1/messages", "/api/chat",
                           "/v1/responses", "/v1/messages/count_tokens",
                           "/api/generate", "/api/embed", "/api/show", "/api/pull"])
        content_type = rnd.choice(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                   f"multipart/form-data; boundary={marker}"])
        return client.post(base + path, content=fuzz.body(marker),
                           headers={**auth, "Content-Type": content_type}), marker
    if category == "headers":
        value = rnd.choice([f"Bearer {marker}", f"bearer {TOKEN}", f"Bearer  {TOKEN}", f"Basic {marker}",
                            "Bearer", f"Bearer {TOKEN}{marker}", f"Bearer {marker}" * 200])
        extra = {rnd.choice(["X-Forwarded-For", "Accept", "Content-Type", "X-Correlation-Id"]): marker}
        return client.request(rnd.choice(["GET", "POST", "PUT", "DELETE", "PATCH"]),
                              base + rnd.choice(["/v1/jobs", "/v1/build-info", "/v1/models", "/v1/capabilities"]),
                              headers={"Authorization": value, **extra}), marker
    if category == "paths":
        segment = rnd.choice(["..%2F..%2Fetc%2Fpasswd", "%0A" + marker, "%1B[31m" + marker, "%00" + marker,
                              "../" * 5 + marker, marker + "%2e%2e", "%ff%fe" + marker, marker * 50])
        path = rnd.choice(["/v1/jobs/", "/v1/", "/", "/v1/jobs/job-", "/v1/models/"]) + segment
        return client.request(rnd.choice(["GET", "DELETE", "POST"]), base + path, headers=auth), marker
    if category == "ids":
        job_id = rnd.choice([f"job-{marker}", "job-00000000-0000-4000-8000-000000000000", marker,
                             "job-" + "a" * 4000 + marker])
        suffix = rnd.choice(["", "/stream"])
        return client.request(rnd.choice(["GET", "DELETE"]), f"{base}/v1/jobs/{job_id}{suffix}",
                              headers=auth), marker
    value = rnd.choice(["²", "¹²", "-1", "1e9", "99999999999999999999999", "0x10", "7 7", "٣", "NaN", marker])
    return client.get(job_url, headers={**auth, "Last-Event-ID": value.encode("utf-8", "replace")}), marker


CATEGORIES = ["bodies", "headers", "paths", "ids", "last-event-id"]


def test_a_thousand_hostile_requests_get_no_5xx_no_echo_and_write_nothing(isolated_dirs: Path) -> None:
    before = {p for p in Path("/tmp").glob("*ZQ*FZ*")}
    env = {"HF_ENDPOINT": "http://127.0.0.1:1", "RBEE_QUEEN__COLD_START": "false",
           "RBEE_QUEEN__MAX_LIVE_JOBS": "1000", "RBEE_HIVE__MAX_LIVE_JOBS": "1000"}
    token = str(token_file(isolated_dirs))
    queen_argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--api-token-file", token]
    hive_argv = [str(BIN / "rbee-hive"), "--port", "0", "--api-token-file", token]
    fuzz = Fuzzer(seed=20261201)
    seen: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    pages = [{"Origin": "http://attacker.example"}, {"Origin": "null"}, {"Host": "attacker.example"},
             {"Origin": "http://attacker.example", "Host": "attacker.example"}]
    with daemon(queen_argv, env=env) as queen, daemon(hive_argv, env=env) as hive, \
            httpx.Client(timeout=30, headers={"Connection": "close"}) as client, \
            contextlib.ExitStack() as stack:
        browsers = [stack.enter_context(httpx.Client(timeout=30, headers={"Connection": "close", **page}))
                    for page in pages]
        # One connection per request: a route that refuses before reading a body leaves it unread on a
        # kept-alive connection (the HTTP-edges issue, order 2); here each request stands alone.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        jobs = {}
        for base in (queen.url, hive.url):
            created = client.post(f"{base}/v1/jobs", json={"operation": "model_list"}, headers=auth)
            jobs[base] = base + created.json()["sse_url"]
        for index in range(1100):
            base = (queen.url, hive.url)[index % 2]
            category = CATEGORIES[index % len(CATEGORIES)]
            page = index % 4 == 3  # what a web page (cross-site, or rebinding) would send
            sender = browsers[(index // 4) % len(browsers)] if page else client
            response, marker = _request(fuzz, sender, base, category, jobs[base])
            seen[category] += 1
            seen["from a web page"] += page
            statuses[response.status_code] += 1
            assert response.status_code < 500, (category, response.request.method, response.request.url,
                                                response.status_code, response.text[:300])
            if page:
                assert response.status_code == 403, (category, response.request.headers, response.text[:300])
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                continue  # a stream of a real job (the Last-Event-ID a valid one)
            assert marker not in response.text, (category, response.status_code, response.text[:300])
            assert marker not in str(response.headers)
        assert client.get(f"{queen.url}/health").status_code == 200
        assert client.get(f"{hive.url}/health").status_code == 200
        assert client.post(f"{queen.url}/v1/jobs", json={"operation": "status"}, headers=auth).status_code == 201
        logs = queen.log() + hive.log()
    print(f"fuzz: {sum(seen.values())} requests {dict(seen)} statuses {dict(sorted(statuses.items()))}")
    assert sum(seen[c] for c in CATEGORIES) >= 1000 and all(seen[c] >= 200 for c in CATEGORIES)
    assert seen["from a web page"] >= 250
    assert TOKEN not in logs
    outside = [p for p in isolated_dirs.rglob("*") if "ZQ" in p.name]
    assert outside == [] and {p for p in Path("/tmp").glob("*ZQ*FZ*")} == before

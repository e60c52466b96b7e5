"""model_download against an HF-compatible server on loopback (harness/fake_hf.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.fake_hf import FakeHub
from harness.helpers import BIN, Daemon, daemon, free_port, job_result, run_job
from tests.test_hive import job_error, spawn

SIZE = 10 * 1000 * 1000
REPO = "test-org/tiny-GGUF"
FILE = "tiny.Q4_K_M.gguf"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "hub") as running:
        running.add_file(REPO, FILE, os.urandom(SIZE))
        running.add_file(REPO, "README.md", b"# tiny\n")
        yield running


def start_hive(hub: FakeHub, **settings: object) -> contextlib.AbstractContextManager[Daemon]:
    env = {"HF_ENDPOINT": hub.url, **{f"RBEE_HIVE__{k.upper()}": str(v) for k, v in settings.items()}}
    return daemon([str(BIN / "rbee-hive"), "--port", "0"], env=env)


@pytest.fixture
def hive(hub: FakeHub, isolated_dirs: Path) -> Iterator[Daemon]:
    with start_hive(hub, download_stall_s=2) as running:
        yield running


def download(url: str, ref: str = f"hf:{REPO}") -> tuple[list[dict[str, object]], str]:
    return run_job(url, {"operation": "model_download", "model": ref})


def catalog_ids(url: str) -> list[str]:
    models = job_result(url, {"operation": "model_list"})
    assert isinstance(models, list)
    return [m["id"] for m in models]


def test_download_streams_progress_and_lands_in_the_catalog(hub: FakeHub, hive: Daemon) -> None:
    hub.rate = 20e6  # 0.5 s: long enough for several progress events
    events, terminator = download(hive.url)
    assert terminator == "[DONE]", events[-3:]
    progress = [e for e in events if e["type"] == "progress"]
    assert len(progress) >= 2 and progress[-1]["done"] == progress[-1]["total"] == SIZE
    assert all(p.get("unit", "bytes") == "bytes" and p["rate"] is not None for p in progress)  # bytes: the default
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    (entry,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(entry, dict) and entry["size_bytes"] == SIZE and entry["format"] == "gguf"
    assert entry["source"] == f"hf:{REPO}:{FILE}"
    stored = Path(str(entry["path"])).read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256((hub.root / REPO / FILE).read_bytes()).digest()
    assert entry["id"] in catalog_ids(hive.url)
    assert job_result(hive.url, {"operation": "model_get", "model": f"hf:{REPO}"}) == entry
    # a second request finds it in the catalog: no transfer
    assert download(hive.url)[1] == "[DONE]" and len(hub.file_requests) == 1


def test_a_cut_download_is_not_registered_and_resumes_on_the_next_try(hub: FakeHub, isolated_dirs: Path) -> None:
    hub.cut_once_after = SIZE * 4 // 10
    with start_hive(hub, download_attempts=1) as hive:
        events, terminator = download(hive.url)
        assert terminator.startswith("[ERROR]")
        assert job_error(events)["code"] == "DOWNLOAD_FAILED"
        assert catalog_ids(hive.url) == ["smollm2-135m"]  # a partial file is never registered
        events, terminator = download(hive.url)
        assert terminator == "[DONE]", events[-3:]
    assert hub.file_requests == [(f"{REPO}/{FILE}", None), (f"{REPO}/{FILE}", f"bytes={SIZE * 4 // 10}-")]
    assert hub.bytes_sent == SIZE  # nothing sent twice


def test_retries_resume_within_one_job(hub: FakeHub, hive: Daemon) -> None:
    hub.cut_once_after = SIZE // 2
    events, terminator = download(hive.url)
    assert terminator == "[DONE]"
    assert any("retrying" in str(e.get("human")).lower() for e in events)
    assert hub.file_requests[-1][1] == f"bytes={SIZE // 2}-" and hub.bytes_sent == SIZE


def test_concurrent_downloads_of_one_model_make_one_transfer(hub: FakeHub, hive: Daemon) -> None:
    hub.rate = 10e6  # 1 s
    results: list[tuple[list[dict[str, object]], str]] = []
    threads = [threading.Thread(target=lambda: results.append(download(hive.url))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [terminator for _, terminator in results] == ["[DONE]", "[DONE]"]
    assert len(hub.file_requests) == 1 and hub.bytes_sent == SIZE
    values = [[e["value"] for e in events if e["type"] == "result"] for events, _ in results]
    assert values[0] == values[1]
    assert any("Joining the download" in str(e.get("human")) for events, _ in results for e in events)


@pytest.mark.parametrize(
    ("ref", "code"),
    [(f"hf:{REPO}-missing", "MODEL_NOT_FOUND"), (f"hf:{REPO}:nothing.gguf", "MODEL_NOT_FOUND")],
)
def test_unknown_repo_or_file_is_model_not_found(hive: Daemon, ref: str, code: str) -> None:
    events, terminator = download(hive.url, ref)
    assert terminator.startswith("[ERROR]")
    error = job_error(events)
    assert error["code"] == code and "missing" not in str(error["message"])


def test_a_gated_repo_needs_hf_token(hub: FakeHub, isolated_dirs: Path) -> None:
    hub.gate(REPO, "hf_test_token_0123456789")
    with start_hive(hub) as hive:
        error = job_error(download(hive.url)[0])
        assert error["code"] == "ACCESS_DENIED" and "HF_TOKEN" in error["details"]["hint"]  # type: ignore[index]
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token_0123456789"}
    with daemon([str(BIN / "rbee-hive"), "--port", "0"], env=env) as hive:
        events, terminator = download(hive.url)
        assert terminator == "[DONE]"
        assert "hf_test_token" not in str(events)


def test_a_stalled_download_is_reported(hub: FakeHub, isolated_dirs: Path) -> None:
    hub.stall_after = SIZE // 4
    with start_hive(hub, download_stall_s=0.5, download_attempts=2) as hive:
        events, terminator = download(hive.url)
        assert terminator.startswith("[ERROR]")
        error = job_error(events)
        assert error["code"] == "DOWNLOAD_STALLED" and "resume" in str(error["details"]["hint"])  # type: ignore[index]
        assert catalog_ids(hive.url) == ["smollm2-135m"]


def test_one_file_has_one_readable_id_however_it_is_asked_for(hub: FakeHub, hive: Daemon) -> None:
    """No quant picks Q4_K_M; the same file asked for by quant, by file name or without either is
    stored once, under `<name>-<quant>`; another organisation's file of that name gets its own id."""
    hub.add_file(REPO, "tiny.Q8_0.gguf", b"\1" * 1000)
    first = job_result(hive.url, {"operation": "model_download", "model": f"hf:{REPO}"})
    assert isinstance(first, dict) and first["id"] == "tiny-q4_k_m" and first["source"] == f"hf:{REPO}:{FILE}"
    for spelling in (f"hf:{REPO}:Q4_K_M", f"hf:{REPO}:{FILE}", f"hf:{REPO.lower()}:q4_k_m"):
        again = job_result(hive.url, {"operation": "model_download", "model": spelling})
        assert isinstance(again, dict) and again["id"] == "tiny-q4_k_m", spelling
    assert len(hub.file_requests) == 1  # downloaded once
    other = job_result(hive.url, {"operation": "model_download", "model": f"hf:{REPO}:Q8_0"})
    assert isinstance(other, dict) and other["id"] == "tiny-q8_0"
    hub.add_file("other-org/tiny-GGUF", FILE, b"\2" * 1000)
    third = job_result(hive.url, {"operation": "model_download", "model": "hf:other-org/tiny-GGUF"})
    assert isinstance(third, dict) and third["id"] == "other-org-tiny-q4_k_m"
    assert sorted(catalog_ids(hive.url)) == ["other-org-tiny-q4_k_m", "smollm2-135m", "tiny-q4_k_m", "tiny-q8_0"]
    stored = [p for p in Path(str(first["path"])).parents[1].rglob("*.gguf")]
    assert len(stored) == 3


def test_a_wrong_quant_lists_the_quants_there_are(hub: FakeHub, hive: Daemon) -> None:
    hub.add_file(REPO, "tiny.Q8_0.gguf", b"\1" * 1000)
    error = job_error(download(hive.url, f"hf:{REPO}:Q5_K_M")[0])
    assert error["code"] == "MODEL_NOT_FOUND"
    assert error["message"] == f"{REPO} has no GGUF file that matches 'Q5_K_M'; its quantizations: Q4_K_M, Q8_0."
    hint = str(error["details"]["hint"])  # type: ignore[index]
    assert hint == f"rbee-keeper model download hf:{REPO}:Q4_K_M"
    assert hub.file_requests == []


def test_disk_space_preflight_names_the_numbers(hub: FakeHub, isolated_dirs: Path) -> None:
    with start_hive(hub, disk_reserve_bytes=10**18) as hive:
        error = job_error(download(hive.url)[0])
        assert error["code"] == "INSUFFICIENT_DISK"
        details = error["details"]
        assert isinstance(details, dict) and details["required_bytes"] == SIZE
        assert details["available_bytes"] > 0 and "Free at least" in details["hint"]
    assert hub.file_requests == []


def test_delete_refuses_while_a_worker_uses_the_model(hub: FakeHub, hive: Daemon) -> None:
    hub.add_builtin("test-org/smol-GGUF", "smol.Q4_1.gguf")
    events, terminator = download(hive.url, "hf:test-org/smol-GGUF")
    assert terminator == "[DONE]"
    (entry,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(entry, dict)
    events, terminator = spawn(hive.url, model=entry["id"])
    assert terminator == "[DONE]", events[-2:]
    (worker,) = [e["value"] for e in events if e["type"] == "result"]
    assert worker["model"] == entry["id"]  # type: ignore[index]
    events, terminator = run_job(hive.url, {"operation": "model_delete", "model": entry["id"]})
    assert job_error(events)["code"] == "MODEL_IN_USE"
    assert Path(str(entry["path"])).exists()
    job_result(hive.url, {"operation": "worker_stop", "worker_id": worker["worker_id"]})  # type: ignore[index]
    assert job_result(hive.url, {"operation": "model_delete", "model": entry["id"]}) == entry
    assert not Path(str(entry["path"])).exists() and entry["id"] not in catalog_ids(hive.url)


@pytest.mark.parametrize("listed", ["../../escape.gguf", "/ABSOLUTE/escape.gguf", "a/../../escape.gguf",
                                    "a\\..\\escape.gguf", "esc\x1bape.gguf"])
def test_a_mirror_cannot_make_the_hive_write_outside_the_model_folder(
    hub: FakeHub, hive: Daemon, isolated_dirs: Path, listed: str
) -> None:
    listed = listed.replace("/ABSOLUTE", str(isolated_dirs / "outside"))
    hub.rename = {FILE: listed}
    events, terminator = download(hive.url)
    assert terminator.startswith("[ERROR]")
    error = job_error(events)
    assert error["code"] == "UNSAFE_FILE_NAME" and "HF_ENDPOINT" in str(error["details"])
    assert hub.file_requests == []  # refused before any byte moved
    written = [p for p in isolated_dirs.rglob("*escape*") if "hub" not in p.parts]
    assert written == [] and catalog_ids(hive.url) == ["smollm2-135m"]


def test_bytes_past_the_announced_size_are_cut_off(hub: FakeHub, hive: Daemon) -> None:
    hub.trailing_junk = b"X" * (3 * 1000 * 1000)
    events, terminator = download(hive.url)
    assert terminator == "[DONE]", events[-3:]
    (entry,) = [e["value"] for e in events if e["type"] == "result"]
    stored = Path(str(entry["path"]))  # type: ignore[index]
    assert stored.stat().st_size == SIZE
    assert stored.read_bytes() == (hub.root / REPO / FILE).read_bytes()
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["done"] == SIZE


@pytest.mark.parametrize(("endpoint", "cause"), [
    (f"http://127.0.0.1:{free_port()}", "the connection was refused"),
    ("http://no-such-hub.invalid", "its name does not resolve (DNS"),
])
def test_an_unreachable_hub_is_named_with_the_cause_and_the_fix(
    isolated_dirs: Path, endpoint: str, cause: str,
) -> None:
    with daemon([str(BIN / "rbee-hive"), "--port", "0"], env={"HF_ENDPOINT": endpoint}) as hive:
        events, terminator = download(hive.url)
        assert terminator.startswith("[ERROR]")
        error = job_error(events)
        assert error["code"] == "DOWNLOAD_FAILED"
        assert f"Could not reach the Hub at {endpoint}: {cause}" in str(error["message"]), error
        assert "HF_ENDPOINT" in str(error.get("details", {}).get("hint", ""))  # type: ignore[union-attr]
        assert "Traceback" not in hive.log()
        assert not [m for m in catalog_ids(hive.url) if m.startswith("test-org")]  # nothing half-written


def test_a_hub_model_no_hive_has_is_pulled_on_first_use(hub: FakeHub, isolated_dirs: Path) -> None:
    """[queen] pull_on_demand (on for a queen on loopback): the first request for an hf: model, in any
    of its spellings, downloads it with the progress on the request's job, and is answered."""
    from rbee_common.builtin import builtin_model_path

    model = builtin_model_path("smollm2-135m")
    assert model is not None
    hub.add_file("test-org/smol-GGUF", "smol.Q8_0.gguf", model.read_bytes())
    env = {"HF_ENDPOINT": hub.url}
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env=env, timeout=60) as queen:
        events, terminator = run_job(queen.url, {"operation": "infer", "model": "hf:test-org/smol-GGUF",
                                                 "prompt": "Hello,", "max_tokens": 4}, timeout=300)
        assert terminator == "[DONE]", events[-3:]
        said = " ".join(str(e.get("human", "")) for e in events)
        assert "No hive has hf:test-org/smol-GGUF: downloading it to hive localhost first" in said, said
        assert any(e["type"] == "progress" for e in events)
        assert "smol-q8_0" in catalog_ids_of(queen.url)  # the repository's name and the file's quant
        # the page's URL names the same model: no second download, the same worker
        asked = len(hub.file_requests)
        body = {"model": "https://huggingface.co/test-org/smol-GGUF", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}]}
        import httpx

        answer = httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        assert len(hub.file_requests) == asked
        # a short name for it, made while the queen runs: no restart, and the same worker
        made = subprocess.run([str(BIN / "rbee-keeper"), "model", "alias", "smol",
                               "hf.co/test-org/smol-GGUF:Q8_0"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and "smol now names hf:test-org/smol-GGUF:Q8_0" in made.stdout, made
        answer = httpx.post(f"{queen.url}/v1/chat/completions", json={**body, "model": "smol"}, timeout=300)
        assert answer.status_code == 200 and answer.json()["model"] == "smol", answer.text
        assert len(hub.file_requests) == asked
        assert "smol" in [m["id"] for m in httpx.get(f"{queen.url}/v1/models").json()["data"]]
        got = job_result(queen.url, {"operation": "model_get", "model": "smol", "hive_id": "localhost"})
        assert isinstance(got, dict) and got["id"] == "smol-q8_0"  # the keeper's model commands too
        workers = job_result(queen.url, {"operation": "worker_list", "hive_id": "localhost"})
        assert isinstance(workers, list) and [w["model"] for w in workers] == ["smol-q8_0"]
        # a spelling never asked for before finds the worker by its catalog id: no second worker
        answer = httpx.post(f"{queen.url}/v1/chat/completions", timeout=300,
                            json={**body, "model": "hf:test-org/smol-GGUF:Q8_0"})
        assert answer.status_code == 200, answer.text
        after = job_result(queen.url, {"operation": "worker_list", "hive_id": "localhost"})
        assert isinstance(after, list) and [w["worker_id"] for w in after] == [w["worker_id"] for w in workers]


def test_a_pull_on_demand_with_no_hub_names_the_cause(isolated_dirs: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive"], env={"HF_ENDPOINT": endpoint},
                timeout=60) as queen:
        events, terminator = run_job(queen.url, {"operation": "infer", "model": "hf:test-org/smol-GGUF",
                                                 "prompt": "Hello,", "max_tokens": 4})
        assert terminator.startswith("[ERROR]")
        error = job_error(events)
        assert f"Could not reach the Hub at {endpoint}: the connection was refused" in str(error["message"])
        assert "Traceback" not in queen.log()


def catalog_ids_of(queen_url: str) -> list[str]:
    models = job_result(queen_url, {"operation": "model_list", "hive_id": "localhost"})
    assert isinstance(models, list)
    return [m["id"] for m in models]

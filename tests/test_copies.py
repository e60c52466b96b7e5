"""Models copied between hives: a hive that needs a model another hive has copies it over the LAN.

One queen with two `rbee-hive` processes on loopback (reached over HTTP, as remote hives are) and
the fake Hub (harness/fake_hf.py), which counts every request it gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.fake_hf import FakeHub
from harness.helpers import (
    Daemon,
    daemon,
    isolated_env,
    job_result,
    loopback_fleet,
    loopback_hive_argv,
    run_job,
    wait_for,
)

SIZE = 10 * 1000 * 1000
REPO = "test-org/tiny-GGUF"
FILE = "tiny.Q4_K_M.gguf"
REF = f"hf:{REPO}"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "hub") as running:
        running.add_file(REPO, FILE, os.urandom(SIZE))
        yield running


@contextlib.contextmanager
def two_hives(tmp_path: Path, hub: FakeHub, hive: str = "") -> Iterator[Daemon]:
    with loopback_fleet(tmp_path, 2, hive=hive, env={"HF_ENDPOINT": hub.url}) as queen:
        yield queen


def download(queen: Daemon, hive_id: str, **extra: object) -> tuple[list[dict[str, object]], str]:
    return run_job(queen.url, {"operation": "model_download", "model": REF, "hive_id": hive_id, **extra})


def result(events: list[dict[str, object]]) -> dict[str, object]:
    (value,) = [e["value"] for e in events if e["type"] == "result"]
    assert isinstance(value, dict)
    return value


def said(events: list[dict[str, object]]) -> str:
    return "\n".join(str(e.get("human", "")) for e in events)


def test_a_hive_copies_a_model_another_hive_has_without_asking_the_hub(tmp_path: Path, hub: FakeHub) -> None:
    """The Hub serves hive h1 once; h2 then gets the same bytes from h1 (checked against the sha256
    h1's catalog entry carries) and the Hub hears nothing more."""
    with two_hives(tmp_path, hub) as queen:
        events, terminator = download(queen, "h1")
        assert terminator == "[DONE]", events[-3:]
        first = result(events)
        before = len(hub.requests)
        events, terminator = download(queen, "h2")
        assert terminator == "[DONE]", events[-3:]
        copied = result(events)
        assert "from hive h1 instead of the Hub" in said(events), said(events)
        assert len(hub.requests) == before  # no API call, no file
        assert copied["id"] == first["id"] and copied["sha256"] == first["sha256"]
        assert copied["reference"] == REF and copied["source"] == first["source"]
        data = Path(str(copied["path"])).read_bytes()
        assert hashlib.sha256(data).hexdigest() == first["sha256"][FILE]  # type: ignore[index]
        assert data == (hub.root / REPO / FILE).read_bytes()
        listed = job_result(queen.url, {"operation": "model_list", "hive_id": "h2"})
        assert isinstance(listed, list) and first["id"] in [m["id"] for m in listed]


def test_a_copy_cut_by_a_killed_hive_resumes_where_it_stopped(tmp_path: Path, hub: FakeHub) -> None:
    """h1 sends at most 4 MB/s; h2 is SIGKILLed in the middle of its copy, started again, and asked
    again: it resumes from the bytes it kept, and the file is whole and checked."""
    with two_hives(tmp_path, hub, hive="share_max_bytes_per_s = 4000000\n") as queen:
        assert download(queen, "h1")[1] == "[DONE]"
        before = len(hub.requests)
        argv = loopback_hive_argv(tmp_path, 2)
        (h2,) = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and argv[-1] in p.info["cmdline"]]
        partial = tmp_path / "h2" / "data" / "rbee" / "models" / ".partial"

        def kept() -> int:
            return sum(f.stat().st_size for f in partial.rglob("*.partial")) if partial.exists() else 0

        with contextlib.ExitStack() as stack:
            cut = threading.Thread(target=download, args=(queen, "h2"))
            cut.start()
            stack.callback(cut.join, 60)
            assert wait_for(lambda: kept() > 2_000_000, timeout=20)
            os.kill(h2.pid, signal.SIGKILL)
        at = kept()
        assert 0 < at < SIZE
        with daemon(argv, env={**isolated_env(tmp_path / "h2"), "HF_ENDPOINT": hub.url}):
            events, terminator = download(queen, "h2")
            assert terminator == "[DONE]", events[-3:]
            assert "resuming at" in said(events), said(events)
            copied = result(events)
            assert Path(str(copied["path"])).read_bytes() == (hub.root / REPO / FILE).read_bytes()
        assert len(hub.requests) == before


def test_a_hives_model_files_are_refused_without_a_ticket_for_them(tmp_path: Path, hub: FakeHub) -> None:
    """The file route wants the ticket the hive gave the queen for that model (or the hive's own
    token): no header, a made-up token or no ticket at all is a 401, and the file is not sent."""
    with two_hives(tmp_path, hub) as queen:
        entry = result(download(queen, "h1")[0])
        hive = job_result(queen.url, {"operation": "hive_get", "hive_id": "h1"})
        assert isinstance(hive, dict)
        url = f"{hive['url']}/v1/models/{entry['id']}/files/{FILE}"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer made-up-token-0123456789"}).status_code == 401
        grant = job_result(queen.url, {"operation": "model_share", "model": REF, "hive_id": "h1"})
        assert isinstance(grant, dict) and grant["sizes"] == {FILE: SIZE}
        ticket = {"Authorization": f"Bearer {grant['ticket']}"}
        whole = httpx.get(url, headers=ticket)
        assert whole.status_code == 200 and len(whole.content) == SIZE
        tail = httpx.get(url, headers={**ticket, "Range": f"bytes={SIZE - 10}-"})
        assert tail.status_code == 206 and tail.content == whole.content[-10:]
        other = url.replace(str(entry["id"]), "smollm2-135m")
        assert httpx.get(other, headers=ticket).status_code == 401  # a ticket names one model

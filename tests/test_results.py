"""Every hive operation's result, decoded through the type its operation declares, for the HTTP hive
and the in-process hive alike (the two `Hive` transports of `rbee_queen/fleet/hives.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from harness.fake_hf import FakeHub
from rbee_common.config import HiveEntry, HiveSettings
from rbee_common.errors import ModelNotFound, WorkerNotFound
from rbee_common.wire import (
    Capabilities,
    CatalogEntry,
    HiveHealth,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    WorkerGet,
    WorkerList,
    WorkerRecord,
    WorkerSpawn,
    WorkerStop,
)
from rbee_hive.serve import open_hive_service, serve
from rbee_queen.fleet.hives import Hive, HttpHive, InProcessHive

REPO = "results-org/smol-GGUF"


@pytest.fixture
def hub(tmp_path: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "hub") as running:
        running.add_builtin(REPO, "smol.Q4_1.gguf")
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


@pytest.fixture(params=["http", "in-process"])
async def hive(request: pytest.FixtureRequest, nursery: trio.Nursery, hub: FakeHub,
               isolated_dirs: Path) -> AsyncIterator[Hive]:
    settings = HiveSettings(port=0, hive_id="h1", data_dir=str(isolated_dirs / "hive"), synthetic_backend=True)
    stop = trio.Event()
    if request.param == "http":
        urls = await nursery.start(lambda task_status: serve(settings, stop=stop, task_status=task_status))
        port = int(urls[0].rsplit(":", 1)[1])
        async with httpx.AsyncClient() as http:
            yield HttpHive("h1", HiveEntry(host="127.0.0.1", hive_port=port), http=http,
                           token_for=lambda hive_id: None, installed_for=lambda hive_id: None)
        stop.set()
    else:
        async with open_hive_service(settings, token=None, stop=stop) as service:
            yield InProcessHive("h1", service, token=lambda: None)
            stop.set()


async def test_every_hive_operation_answers_its_declared_type(hive: Hive) -> None:
    models = await hive.run(ModelList(hive_id="h1"), None)
    assert isinstance(models, list) and all(isinstance(m, CatalogEntry) for m in models)
    assert "smollm2-135m" in [m.id for m in models]
    builtin = await hive.run(ModelGet(hive_id="h1", model="smollm2-135m"), None)
    assert isinstance(builtin, CatalogEntry) and builtin.provider == "builtin"

    downloaded = await hive.run(ModelDownload(hive_id="h1", model=f"hf:{REPO}"), None)
    assert isinstance(downloaded, CatalogEntry) and downloaded.format == "gguf"
    assert await hive.has_model(downloaded.id)

    spawned = await hive.run(WorkerSpawn(hive_id="h1", model="smollm2-135m", backend="synthetic"), None)
    assert isinstance(spawned, WorkerRecord)
    assert spawned.hive_id == "h1" and spawned.state == "ready" and spawned.slots_total >= 1
    listed = await hive.run(WorkerList(hive_id="h1"), None)
    assert [w.worker_id for w in listed] == [spawned.worker_id] and isinstance(listed[0], WorkerRecord)
    got = await hive.run(WorkerGet(hive_id="h1", worker_id=spawned.worker_id), None)
    assert isinstance(got, WorkerRecord) and got.url == spawned.url
    stopped = await hive.run(WorkerStop(hive_id="h1", worker_id=spawned.worker_id), None)
    assert isinstance(stopped, WorkerRecord) and stopped.worker_id == spawned.worker_id
    with pytest.raises(WorkerNotFound):
        await hive.run(WorkerGet(hive_id="h1", worker_id=spawned.worker_id), None)

    deleted = await hive.run(ModelDelete(hive_id="h1", model=downloaded.id), None)
    assert isinstance(deleted, CatalogEntry) and deleted.id == downloaded.id
    with pytest.raises(ModelNotFound):
        await hive.run(ModelGet(hive_id="h1", model=downloaded.id), None)
    assert not await hive.has_model(downloaded.id)

    capabilities = await hive.capabilities()
    assert isinstance(capabilities, Capabilities) and capabilities.hive_id == "h1"
    assert capabilities.devices[0].id == "CPU-0"
    health = await hive.health(2.0)
    assert isinstance(health, HiveHealth) and health.reachable


def test_every_operation_declares_a_result_type() -> None:
    from rbee_common.wire import HIVE_OPERATIONS, QUEEN_OPERATIONS

    for operation in (*QUEEN_OPERATIONS, *HIVE_OPERATIONS):
        declared: Any = operation.result_type()
        assert declared is not None and declared is not Any, operation


def test_hive_get_shows_every_hive_entry_field_but_the_private_paths() -> None:
    from rbee_common.wire import HiveDetails
    from rbee_queen.service import _PRIVATE_FIELDS

    entry_fields = {field.name for field in msgspec.structs.fields(HiveEntry)}
    shown = {field.name for field in msgspec.structs.fields(HiveDetails)} - {"hive_id", "url", "local"}
    assert shown == entry_fields - _PRIVATE_FIELDS

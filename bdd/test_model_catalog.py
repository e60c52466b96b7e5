from __future__ import annotations

from pathlib import Path

from pytest_bdd import parsers, scenarios, then

from bdd.conftest import World, hive_job, hub, job_value
from rbee_common.sizing import gguf_metadata, kv_bytes_per_token

scenarios("model_catalog.feature")


@then(parsers.parse("the hub served the file {count:d} time"))
def served(world: World, count: int) -> None:
    assert len(hub(world).file_requests) == count


@then(parsers.parse('the result is a catalog entry of provider "{provider}" with size_bytes {size:d}'))
def entry_shape(world: World, provider: str, size: int) -> None:
    entry = job_value(world)
    assert entry["provider"] == provider and entry["size_bytes"] == size
    assert entry["id"] and entry["reference"] and entry["added_at"] > 0 and Path(entry["path"]).is_file()
    world.extra["entry"] = entry


@then(parsers.parse('model_get of "{ref}" returns the same entry'))
def get_same(world: World, ref: str) -> None:
    entry = world.extra["entry"]
    hive_job(world, {"operation": "model_get", "model": ref})
    assert job_value(world) == entry


@then("the entry's meta.json lies in the folder of its file")
def meta_next_to_file(world: World) -> None:
    folder = Path(world.extra["entry"]["path"]).parent
    assert (folder / "meta.json").is_file() and folder.name == world.extra["entry"]["id"]


@then(parsers.re(r"the result lists (?P<count>\d+) models(, all of provider \"(?P<provider>\w+)\")?"),
      converters={"count": int})
def lists(world: World, count: int, provider: str | None) -> None:
    models = job_value(world)
    assert len(models) == count, models
    if provider:
        assert {m["provider"] for m in models} == {provider}


@then(parsers.parse('the catalog\'s size_bytes of "{ref}" is its file\'s size on disk'))
def size_from_disk(world: World, ref: str) -> None:
    entry = world.extra["downloaded"][ref]
    assert entry["size_bytes"] == Path(entry["path"]).stat().st_size
    world.extra["size"] = entry["size_bytes"]


@then("the preflight required 1.2 times that size in RAM plus the KV cache of its slots and its prompt cache")
def preflight_used_size(world: World) -> None:
    (preflight,) = [e for e in world.extra["events"] if e.get("action") == "worker_preflight"]
    entry = world.extra["downloaded"]["hf:test-org/smol-GGUF"]
    cache = preflight["fields"]["slots"] * preflight["fields"]["ctx"] * kv_bytes_per_token(gguf_metadata(entry["path"]))
    assert cache > 0
    prompt_cache = preflight["fields"]["cache_ram_mib"] << 20  # host RAM for saved prompt prefixes
    assert preflight["fields"]["required_bytes"] == int(world.extra["size"] * 1.2) + cache + prompt_cache
    assert preflight["fields"]["available_bytes"] > preflight["fields"]["required_bytes"]

"""How a Hub model's spellings become one catalog id, and find one catalog entry (pure functions;
the downloads themselves are in tests/test_downloads.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee_common.modelref import HfRef, catalog_id, hub_reference, quant_of, readable_id
from rbee_common.wire import CatalogEntry
from rbee_hive.catalog import of_repository


@pytest.mark.parametrize(("ref", "wanted"), [
    ("hf:bartowski/SmolLM2-360M-Instruct-GGUF:Q4_K_M", "smollm2-360m-instruct-q4_k_m"),
    ("hf:bartowski/SmolLM2-360M-Instruct-GGUF:SmolLM2-360M-Instruct-Q4_K_M.gguf", "smollm2-360m-instruct-q4_k_m"),
    ("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q8_0.gguf", "qwen2.5-0.5b-instruct-q8_0"),
    ("hf:unsloth/gemma-3-1b-it-GGUF:gemma-3-1b-it-IQ4_XS.gguf", "gemma-3-1b-it-iq4_xs"),
    ("hf:org/model-GGUF:model-BF16.gguf", "model-bf16"),
    ("hf:test-org/tiny-GGUF:tiny.gguf", "tiny"),  # no quant in the name: the repository's name
    ("hf:mlx-community/Qwen2.5-0.5B-Instruct-4bit", "qwen2.5-0.5b-instruct-4bit"),
    ("smollm2-135m", "smollm2-135m"),
])
def test_a_hub_file_gets_the_repository_name_and_its_quant(ref: str, wanted: str) -> None:
    assert catalog_id(ref) == wanted


def test_another_organisation_s_file_of_that_name_is_qualified() -> None:
    assert readable_id("unsloth/SmolLM2-360M-Instruct-GGUF", "Q4_K_M", qualified=True) == \
        "unsloth-smollm2-360m-instruct-q4_k_m"


@pytest.mark.parametrize(("name", "quant"), [
    ("x.Q4_K_M.gguf", "Q4_K_M"), ("x-q5_k_s.gguf", "Q5_K_S"), ("x-IQ2_XXS.gguf", "IQ2_XXS"),
    ("x-f16.gguf", "F16"), ("Q8_0", "Q8_0"), ("Qwen2-7B.gguf", None), ("model.gguf", None),
])
def test_the_quant_in_a_file_name(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


@pytest.mark.parametrize("spelling", [
    "hf:org/Repo-GGUF:Q4_K_M", "hf.co/org/Repo-GGUF:Q4_K_M", "https://huggingface.co/org/Repo-GGUF:Q4_K_M",
    "https://huggingface.co/org/Repo-GGUF/blob/main/Repo-Q4_K_M.gguf",
])
def test_every_spelling_of_a_hub_file_is_one_id(spelling: str) -> None:
    reference = hub_reference(spelling)
    assert reference is not None and catalog_id(reference) == "repo-q4_k_m"


def entry(model_id: str, source: str) -> CatalogEntry:
    return CatalogEntry(id=model_id, reference=source, provider="hf", format="gguf", path="/x", size_bytes=1,
                        files=[source.rsplit(":", 1)[1]], added_at=0, source=source)


def test_a_reference_finds_the_file_it_picks() -> None:
    q4 = entry("repo-q4_k_m", "hf:org/Repo-GGUF:Repo-Q4_K_M.gguf")
    q8 = entry("org--repo-gguf--q8_0", "hf:org/Repo-GGUF:Repo-Q8_0.gguf")  # an id from before 0.2
    entries = [q4, q8, entry("repo-q4_k_m-2", "hf:other/Repo-GGUF:Repo-Q4_K_M.gguf")]
    assert of_repository(entries, HfRef("org/Repo-GGUF", None)) == q4  # no quant: Q4_K_M, as downloads pick
    assert of_repository(entries, HfRef("ORG/repo-gguf", "q8_0")) == q8
    assert of_repository(entries, HfRef("org/Repo-GGUF", "Repo-Q8_0.gguf")) == q8
    assert of_repository(entries, HfRef("org/Repo-GGUF", "Q5_K_M")) is None
    assert of_repository([q8], HfRef("org/Repo-GGUF", None)) == q8  # the repository's only file


@given(st.from_regex(r"\Ahf:[A-Za-z0-9._-]{1,40}/[A-Za-z0-9._-]{1,40}(:[A-Za-z0-9._-]{1,40})?\Z"))
def test_an_id_is_always_a_safe_folder_name(ref: str) -> None:
    made = catalog_id(ref)
    assert re.fullmatch(r"[a-z0-9._-]{1,200}", made) and made not in (".", "..") and not made.startswith(".")

"""The scheduler's pure choice: model-aware, least loaded, only with a free slot."""

from __future__ import annotations

import json

import pytest

from rbee_common.prefixes import Block, held_share, prompt_blocks
from rbee_common.wire import ChatMessage, GenerationParams, WorkerRecord
from rbee_queen.scheduler import Prefer, pick_worker, pick_worker_why


def worker(worker_id: str, *, model: str = "smollm2-135m", slots: int = 1, state: str = "ready") -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id, hive_id="localhost", url=f"http://127.0.0.1:9300/{worker_id}", model=model,
        backend="llama-cpp", device="CPU-0", state=state, slots_total=slots, slots_busy=0, pid=1,  # type: ignore[arg-type]
        last_seen_s=0.1,
    )


def test_only_workers_of_the_model() -> None:
    workers = [worker("a", model="other"), worker("b")]
    assert pick_worker(workers, "smollm2-135m", load={}).worker_id == "b"  # type: ignore[union-attr]
    assert pick_worker(workers, "missing", load={}) is None


def test_least_loaded_by_share_of_slots() -> None:
    workers = [worker("a", slots=4), worker("b", slots=1)]
    assert pick_worker(workers, "smollm2-135m", load={"a": 1}).worker_id == "b"  # type: ignore[union-attr]
    assert pick_worker(workers, "smollm2-135m", load={"a": 1, "b": 1}).worker_id == "a"  # type: ignore[union-attr]


def test_a_full_worker_is_never_picked() -> None:
    workers = [worker("a", slots=2)]
    assert pick_worker(workers, "smollm2-135m", load={"a": 2}) is None


def test_loading_and_draining_workers_are_skipped_and_excluded_ones_too() -> None:
    workers = [worker("a", state="loading"), worker("b", state="draining"), worker("c"), worker("d")]
    assert pick_worker(workers, "smollm2-135m", load={}).worker_id == "c"  # type: ignore[union-attr]
    picked = pick_worker(workers, "smollm2-135m", load={}, exclude=frozenset({"c"}))
    assert picked is not None and picked.worker_id == "d"


def test_a_requested_reference_matches_the_name_its_workers_report() -> None:
    workers = [worker("a", model="test-org--smol-gguf")]
    aliases = {"hf:test-org/smol-GGUF": "test-org--smol-gguf"}
    assert pick_worker(workers, "hf:test-org/smol-GGUF", load={}, aliases=aliases) is not None


@pytest.mark.parametrize(("prompt", "ctx", "trained", "room"), [
    (3000, 2048, 8192, 4096),     # the next power of two with 1,024 tokens to answer in
    (7500, 2048, 8192, 8192),     # no more than the model was trained for
    (8192, 2048, 8192, None),     # the model's own context does not hold it
    (900, 2048, 8192, None),      # it fits already: refused for another reason
    (3000, 4096, 4096, None),     # the worker already has all the model has
])
def test_a_prompt_refused_for_length_asks_for_a_worker_with_room(
    prompt: int, ctx: int, trained: int, room: int | None,
) -> None:
    from rbee_queen.inference import room_for

    details = {"prompt_tokens": prompt, "context_tokens": ctx, "model_context_tokens": trained}
    assert room_for(details) == room
    assert room_for({"prompt_tokens": prompt, "context_tokens": ctx}) is None  # an older worker


# --- prefix routing ---------------------------------------------------------------------------------

def _conversation(turns: int) -> list[Block]:
    messages = [ChatMessage("system", "You are the assistant of a hardware shop. " * 20)]
    for k in range(turns):
        messages += [ChatMessage("user", f"Question {k}?"), ChatMessage("assistant", f"Answer {k}.")]
    return prompt_blocks(GenerationParams(messages=[*messages, ChatMessage("user", "And now?")]))


def test_a_conversation_goes_where_its_prefix_is_while_load_is_balanced() -> None:
    workers = [worker("a", slots=4), worker("b", slots=4)]
    earlier, now = _conversation(2), _conversation(3)
    held = {"b": {block.hash for block in earlier}}  # b served the turn before
    prefer = Prefer(blocks=now, held=held, margin=2)
    assert held_share(now, held["b"]) > 0.9
    assert pick_worker_why(workers, "smollm2-135m", load={"b": 2}, prefer=prefer)[0].worker_id == "b"  # type: ignore[union-attr]
    # b runs 3 more requests than a: beyond the margin (2), the least loaded takes it
    spilled = pick_worker_why(workers, "smollm2-135m", load={"b": 3}, prefer=prefer)
    assert spilled[0] is not None and spilled == (workers[0], "load")
    # a held prefix that is a small share of the prompt (a short system prompt) does not decide
    other = prompt_blocks(GenerationParams(messages=[ChatMessage("system", "Be brief."),
                                                     ChatMessage("user", "Summarize: " + "words " * 300)]))
    assert pick_worker_why(workers, "smollm2-135m", load={"b": 1}, prefer=Prefer(blocks=other, held={
        "b": {other[0].hash}}))[1] == "load"


def test_the_chain_names_a_whole_prefix_and_only_it() -> None:
    earlier, now = _conversation(2), _conversation(3)
    assert [b.hash for b in now[:len(earlier) - 1]] == [b.hash for b in earlier[:-1]]  # the shared turns
    assert now[len(earlier) - 1].hash != earlier[-1].hash  # "And now?" became an answered question
    changed = prompt_blocks(GenerationParams(messages=[ChatMessage("system", "Another shop."),
                                                       *[ChatMessage("user", "Question 0?")]]))
    assert held_share(changed, {b.hash for b in earlier}) == 0  # same later messages, other start


def test_a_session_goes_back_to_its_worker_when_no_prefix_decides() -> None:
    """Agents' sessions share one system prompt: every worker holds it, so the prefix ties, and
    the session (`prompt_cache_key`, `user`, Claude Code's session id) picks; not past the margin."""
    workers = [worker("a", slots=4), worker("b", slots=4)]
    blocks = _conversation(1)
    both = {"a": {blocks[0].hash}, "b": {blocks[0].hash}}
    assert pick_worker_why(workers, "smollm2-135m", load={"b": 1}, prefer=Prefer(
        blocks=blocks, held=both, session_worker="b")) == (workers[1], "cache")
    assert pick_worker_why(workers, "smollm2-135m", load={"b": 1}, prefer=Prefer(
        blocks=blocks, held={}, session_worker="b")) == (workers[1], "session")
    assert pick_worker_why(workers, "smollm2-135m", load={"b": 3}, prefer=Prefer(
        blocks=blocks, held={}, session_worker="b", margin=2)) == (workers[0], "load")


def test_claude_codes_session_id_is_its_session() -> None:
    from rbee_queen.dialects.anthropic.requests import session_of as _session

    said = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": "5f1c-session"})
    assert _session({"user_id": said}) == "5f1c-session"
    assert _session({"user_id": "user-17"}) == "user-17"
    assert _session(None) is None and _session({"user_id": 4}) is None

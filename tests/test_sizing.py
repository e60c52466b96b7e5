"""How a hive sizes a worker it starts without being told: each sequence's context from what the
model was trained for and the memory there is (`rbee_common.sizing.choose_context`)."""

from __future__ import annotations

from rbee_common.sizing import AUTO_CTX_MAX, choose_context

SMOLLM2_KV = 23_040
"""Bytes of keys and values per token of the built-in model (30 layers x 3 KV heads x 2 x 64 x f16)."""
LLAMA_8B_KV = 131_072
"""Llama 3.1 8B: 32 layers x 8 KV heads x 2 x 128 x f16."""
GB = 10**9


def test_a_small_model_on_a_cpu_gets_its_trained_context_and_four_slots() -> None:
    chosen = choose_context(trained=8192, slots=None, device="CPU-0", backend="llama-cpp",
                            model_bytes=98_000_000, kv_per_token=SMOLLM2_KV, free_bytes=16 * GB, memory="RAM")
    assert (chosen.ctx, chosen.slots, chosen.why) == (8192, 4, "the model's trained context")


def test_a_long_trained_context_is_capped_and_the_cap_is_said() -> None:
    chosen = choose_context(trained=131_072, slots=None, device="GPU-0", backend="llama-cpp",
                            model_bytes=1 * GB, kv_per_token=SMOLLM2_KV, free_bytes=80 * GB, memory="VRAM")
    assert (chosen.ctx, chosen.slots) == (AUTO_CTX_MAX, 4)
    assert "trained for 131072" in chosen.why


def test_a_model_that_does_not_say_gets_ollamas_default() -> None:
    chosen = choose_context(trained=None, slots=None, device="CPU-0", backend="mlx",
                            model_bytes=GB, kv_per_token=0, free_bytes=16 * GB, memory="RAM")
    assert chosen.ctx == 4096 and "does not say" in chosen.why


def test_short_memory_halves_the_context_until_the_worker_fits_in_its_share() -> None:
    # 8B Q4 on a CPU with 16 GB free: its share is 8 GB, 5.9 GB of which the weights take. 32,768
    # tokens (1 slot), 16,384 (2) and 8,192 and 4,096 (4 each) do not fit beside them; 4 x 2,048 do.
    chosen = choose_context(trained=131_072, slots=None, device="CPU-0", backend="llama-cpp",
                            model_bytes=int(4.9 * GB), kv_per_token=LLAMA_8B_KV, free_bytes=16 * GB, memory="RAM")
    assert (chosen.ctx, chosen.slots) == (2048, 4)
    assert chosen.why == "what fits in 50% of the free RAM (16000 MB)"


def test_a_gpu_may_fill_most_of_its_free_memory() -> None:
    chosen = choose_context(trained=131_072, slots=None, device="GPU-0", backend="llama-cpp",
                            model_bytes=int(4.9 * GB), kv_per_token=LLAMA_8B_KV, free_bytes=24 * GB, memory="VRAM")
    assert (chosen.ctx, chosen.slots) == (16_384, 4)  # 4 x 16k = 8.6 GB beside 5.9; 4 x 32k is 17 GB


def test_the_context_never_drops_below_2048_the_memory_check_refuses_instead() -> None:
    chosen = choose_context(trained=8192, slots=2, device="CPU-0", backend="llama-cpp",
                            model_bytes=10 * GB, kv_per_token=LLAMA_8B_KV, free_bytes=4 * GB, memory="RAM")
    assert (chosen.ctx, chosen.slots) == (2048, 2)

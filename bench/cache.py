"""Cache-aware serving: prompt prefixes kept in RAM, and requests routed to where they are.

Three parts, each on this machine, one server at a time:

- tenants: one worker, more tenants than slots. T tenants, each with its own
  system prompt (about 600 tokens, distinct from its first word), take turns
  in round robin for 3 turns on 4 slots: the time to the first token of the
  turns after the first (p50, p90) and the share of their prompt tokens
  reused, for `llm-worker-rbee` (`--cache-ram 8192`) and `llama-server` (its
  default `--cache-ram`), same GGUF, threads, slots and per-slot context.
  Both run at once, each with its own copy of the chats, and every turn goes
  to one and then the other (one request at a time: the other is idle).
- fleet: synthetic workers (no model; a modelled prefix cache, and a prefill
  cost per uncached prompt word paid one prompt at a time, as on a device)
  behind one queen; C conversations of N turns with long distinct prefixes,
  their turns one Poisson process at 70% of what the fleet can prefill when
  nothing is reused (what least-loaded routing must serve). Least loaded (`prefix_routing = false`), prefix
  routed, and an oracle that sends each conversation straight to its own
  worker: TTFT p50/p90, turns per second, the share of prompt words reused,
  and the busiest worker's share of the requests against the mean.
- pair: two real workers of the built-in model (one thread each) behind one
  queen, multi-turn conversations in round robin: TTFT and reused tokens with
  prefix routing off and on.

    .venv/bin/python -m bench cache [--quick]
    .venv/bin/python bench/cache.py [--quick] [--part tenants|fleet|pair]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.parallel import build_llama_server, llama_server, rbee_worker
from harness.helpers import BIN, daemon, job_result, run_job
from rbee_worker.models import resolve_model

ANSWER = 48
"""Tokens of each fleet answer (0.48 s at the synthetic workers' 100 a second)."""
WORDS = (
    "copper",
    "garden",
    "river",
    "lantern",
    "harbor",
    "meadow",
    "engine",
    "violet",
    "marble",
    "summit",
    "falcon",
    "orchard",
    "canyon",
    "velvet",
    "ember",
    "glacier",
    "thistle",
    "quartz",
    "willow",
    "saffron",
)


def _text(seed: int, words: int) -> str:
    """Distinct prose of about `words` words (a system prompt, a document)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))


def _delta_text(chunk: dict[str, Any]) -> str:
    """The text an OpenAI stream chunk adds (every choice's `delta.content`)."""
    return "".join((choice.get("delta") or {}).get("content") or "" for choice in chunk.get("choices", []))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# --- tenants: one worker against llama-server -----------------------------------------------------


def _stream_rbee(http: httpx.Client, url: str, messages: list[dict[str, str]]) -> tuple[float, str, int, int]:
    """(seconds to the first token, text, prompt tokens, tokens reused) from a worker."""
    body = {"messages": messages, "max_tokens": 32, "temperature": 0.0}
    start, first, text = time.perf_counter(), 0.0, []
    end: dict[str, Any] = {}
    with http.stream("POST", f"{url}/v1/inference", json=body, timeout=300) as answer:
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["type"] == "token":
                first = first or time.perf_counter() - start
                text.append(event["t"])
            elif event["type"] == "end":
                end = event
    return first, "".join(text), int(end.get("tokens_in", 0)), int(end.get("tokens_cached", 0))


def _stream_llama(
    http: httpx.Client, url: str, messages: list[dict[str, str]]
) -> tuple[float, str, int, int]:
    body = {"messages": messages, "max_tokens": 32, "temperature": 0.0, "stream": True}
    start, first, text = time.perf_counter(), 0.0, []
    timings: dict[str, Any] = {}
    with http.stream(
        "POST", f"{url}/v1/chat/completions", json=body, timeout=300, headers={"Connection": "close"}
    ) as answer:
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            timings = chunk.get("timings") or timings
            if piece := _delta_text(chunk):
                first = first or time.perf_counter() - start
                text.append(piece)
    cached = int(timings.get("cache_n", 0))
    return first, "".join(text), cached + int(timings.get("prompt_n", 0)), cached


def _tenants_on(servers: dict[str, tuple[str, Any]], tenants: int, turns: int) -> dict[str, Any]:
    """Each server its own copy of the tenants' chats; every turn goes to each server in turn, so
    both meet the machine in the same state (one request at a time, the other server idle)."""
    systems = [
        f"{WORDS[t % len(WORDS)].title()} {t} speaking. " + _text(1000 + t, 450) for t in range(tenants)
    ]
    chats = {name: [[{"role": "system", "content": system}] for system in systems] for name in servers}
    seen: dict[str, dict[str, Any]] = {name: {"ttft": [], "prompt": 0, "reused": 0} for name in servers}
    with httpx.Client() as http:
        for turn in range(turns):
            for t in range(tenants):
                for name, (url, stream) in servers.items():
                    chat = chats[name][t]
                    chat.append({"role": "user", "content": f"Question {turn}: what does item {t} cost?"})
                    first, text, tokens_in, cached = stream(http, url, chat)
                    chat.append({"role": "assistant", "content": text})
                    if turn:
                        seen[name]["ttft"].append(first)
                        seen[name]["prompt"] += tokens_in
                        seen[name]["reused"] += cached
    return {
        name: {
            "p50": _pct(s["ttft"], 0.5),
            "p90": _pct(s["ttft"], 0.9),
            "reused": s["reused"] / max(s["prompt"], 1),
            "turns": len(s["ttft"]),
        }
        for name, s in seen.items()
    }


def tenants(quick: bool) -> dict[str, Any]:
    count, turns, threads, slots, ctx = (6, 2, 2, 4, 2048) if quick else (12, 3, 2, 4, 2048)
    results: dict[str, Any] = {
        "tenants": count,
        "turns": turns,
        "slots": slots,
        "ctx": ctx,
        "threads": threads,
    }
    binary = build_llama_server()
    model = str(resolve_model("smollm2-135m").path)
    with (
        rbee_worker(threads=threads, ctx=ctx, slots=slots, extra=["--cache-ram", "8192"]) as (rbee, _),
        llama_server(binary, model, threads=threads, ctx=ctx, slots=slots) as (llama, _),
    ):
        results.update(
            _tenants_on({"rbee": (rbee, _stream_rbee), "llama-server": (llama, _stream_llama)}, count, turns)
        )
    return results


# --- fleet: synthetic workers behind a queen ------------------------------------------------------


@contextlib.contextmanager
def _fleet(
    folder: Path, *, routing: bool, workers: int, slots: int, rate: float, prefill: float
) -> Iterator[tuple[str, list[str]]]:
    config = folder / "rbee.toml"
    config.write_text(
        f"[hive]\nsynthetic_backend = true\nsynthetic_slots = {slots}\nsynthetic_tokens_per_s = {rate}\n"
        f"synthetic_prefill_tokens_per_s = {prefill}\nworker_ctx = 1048576\nworker_idle_timeout_s = 0\n"
        f"[queen]\nprefix_routing = {'true' if routing else 'false'}\nqueue_size = 1000\n"
    )
    env = {f"XDG_{part}_HOME": str(folder / part.lower()) for part in ("STATE", "DATA", "CONFIG", "CACHE")}
    with daemon(
        [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)], env=env, timeout=60
    ) as queen:
        for _ in range(workers):
            events, terminator = run_job(
                queen.url, {"operation": "worker_spawn", "model": "synthetic", "backend": "synthetic"}
            )
            assert terminator == "[DONE]", events[-3:]
        listed = job_result(queen.url, {"operation": "worker_list_active"})
        assert isinstance(listed, list)
        yield queen.url, sorted(str(w["url"]) for w in listed)


async def _conversation(
    http: httpx.AsyncClient,
    k: int,
    turns: int,
    prefix: int,
    arrivals: list[float],
    oracle: str | None,
    out: dict[str, Any],
) -> None:
    """Turn i is sent at `arrivals[i]` (trio's clock), or when the answer before it ends if that
    is later."""
    messages = [{"role": "system", "content": f"Conversation {k}. " + _text(k, prefix)}]
    for turn in range(turns):
        await trio.sleep_until(arrivals[turn])
        messages.append({"role": "user", "content": f"Turn {turn}: " + _text(10_000 * k + turn, 40)})
        start, first, text = time.perf_counter(), 0.0, []
        if oracle:
            body: dict[str, Any] = {"messages": messages, "max_tokens": ANSWER}
            async with http.stream("POST", f"{oracle}/v1/inference", json=body) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if event["type"] == "token":
                            first = first or time.perf_counter() - start
                            text.append(event["t"])
                        elif event["type"] == "end":
                            out["prompt"] += event["tokens_in"]
                            out["reused"] += event["tokens_cached"]
        else:
            body = {
                "model": "synthetic",
                "messages": messages,
                "max_tokens": ANSWER,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if piece := _delta_text(chunk):
                            first = first or time.perf_counter() - start
                            text.append(piece)
                        if chunk.get("usage"):
                            out["prompt"] += chunk["usage"]["prompt_tokens"]
                            out["reused"] += chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        if turn:  # a first turn misses wherever it goes: routing decides the later ones
            out["ttft"].append(first)
        out["turns"] += 1
        messages.append({"role": "assistant", "content": "".join(text)})


LOAD = 0.7
"""The offered load, as a share of what the fleet prefills when no prompt is reused."""


def _fleet_run(mode: str, *, quick: bool) -> dict[str, Any]:
    workers, slots, conversations, turns, prefix = (4, 4, 16, 4, 2000) if quick else (8, 8, 64, 10, 8000)
    rate, prefill = 100.0, 10_000.0
    # Capacity: each worker prefills `prefill` words a second, one prompt at a time (the decode's
    # slots are never the limit here), and a turn's prompt is the prefix and the turns before it.
    mean_prompt = prefix + (turns + 1) / 2 * (42 + ANSWER)
    capacity = workers * prefill / mean_prompt  # turns a second with no reuse
    # One Poisson process of turns at LOAD x capacity; its arrivals go to the conversations in
    # turn (each conversation's turns come about `conversations` arrivals apart).
    rng, at, gaps = random.Random(0), 0.0, []
    for _ in range(conversations * turns):
        at += rng.expovariate(LOAD * capacity)
        gaps.append(at)
    out: dict[str, Any] = {"ttft": [], "turns": 0, "prompt": 0, "reused": 0, "by_worker": {}}
    with (
        tempfile.TemporaryDirectory() as folder,
        _fleet(
            Path(folder), routing=mode != "least", workers=workers, slots=slots, rate=rate, prefill=prefill
        ) as (url, urls),
    ):

        async def main() -> None:
            limits = httpx.Limits(max_connections=conversations * 2)
            start = trio.current_time()
            async with (
                httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http,
                trio.open_nursery() as nursery,
            ):
                for k in range(conversations):
                    oracle = urls[k % len(urls)] if mode == "oracle" else None
                    arrivals = [start + t for t in gaps[k::conversations]]
                    nursery.start_soon(_conversation, http, k, turns, prefix, arrivals, oracle, out)

        began = time.perf_counter()
        trio.run(main)
        elapsed = time.perf_counter() - began
        for worker in urls:  # what each worker served, by its own count
            text = httpx.get(f"{worker}/metrics").text
            out["by_worker"][worker] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("rbee_worker_inferences_total{")
            )
    counts = list(out["by_worker"].values())
    return {
        "mode": mode,
        "p50": _pct(out["ttft"], 0.5),
        "p90": _pct(out["ttft"], 0.9),
        "turns_per_s": out["turns"] / elapsed,
        "offered": LOAD * capacity,
        "reused": out["reused"] / max(out["prompt"], 1),
        "max_over_mean": max(counts) / statistics.mean(counts) if counts else 0.0,
        "workers": workers,
        "slots": slots,
        "conversations": conversations,
        "turns": turns,
        "prefix": prefix,
        "prefill": prefill,
    }


def fleet(quick: bool) -> list[dict[str, Any]]:
    return [_fleet_run(mode, quick=quick) for mode in ("least", "prefix", "oracle")]


# --- pair: two real workers behind one queen ------------------------------------------------------


def _pair_run(routing: bool, quick: bool) -> dict[str, Any]:
    conversations, turns = (4, 2) if quick else (8, 3)
    later: list[float] = []
    prompt = reused = 0
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "rbee.toml"
        config.write_text(
            f"[hive]\nworker_idle_timeout_s = 0\n[queen]\nprefix_routing = {str(routing).lower()}\n"
        )
        env = {
            f"XDG_{part}_HOME": str(Path(folder) / part.lower())
            for part in ("STATE", "DATA", "CONFIG", "CACHE")
        }
        with daemon(
            [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)],
            env=env,
            timeout=60,
        ) as queen:
            for _ in range(2):
                events, terminator = run_job(
                    queen.url, {"operation": "worker_spawn", "model": "smollm2-135m", "threads": 1}
                )
                assert terminator == "[DONE]", events[-3:]
            chats = [
                [{"role": "system", "content": f"Shop {k}. " + _text(2000 + k, 300)}]
                for k in range(conversations)
            ]
            with httpx.Client(base_url=queen.url, timeout=300) as http:
                for turn in range(turns):
                    for chat in chats:
                        chat.append({"role": "user", "content": f"Question {turn}: what is on sale?"})
                        body = {
                            "model": "smollm2-135m",
                            "messages": chat,
                            "max_tokens": 16,
                            "temperature": 0,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                        }
                        start, first, text = time.perf_counter(), 0.0, []
                        usage: dict[str, Any] = {}
                        with http.stream("POST", "/v1/chat/completions", json=body) as answer:
                            for line in answer.iter_lines():
                                if not line.startswith("data: {"):
                                    continue
                                chunk = json.loads(line[6:])
                                if piece := _delta_text(chunk):
                                    first = first or time.perf_counter() - start
                                    text.append(piece)
                                usage = chunk.get("usage") or usage
                        chat.append({"role": "assistant", "content": "".join(text)})
                        if turn:
                            later.append(first)
                            prompt += usage.get("prompt_tokens", 0)
                            reused += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "routing": "prefix" if routing else "load",
        "p50": _pct(later, 0.5),
        "p90": _pct(later, 0.9),
        "reused": reused / max(prompt, 1),
        "conversations": conversations,
        "turns": turns,
    }


def pair(quick: bool) -> list[dict[str, Any]]:
    return [_pair_run(routing, quick) for routing in (False, True)]


# --- the report -----------------------------------------------------------------------------------


def run(quick: bool = False, parts: tuple[str, ...] = ("tenants", "fleet", "pair")) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "pair" in parts:
        results["pair"] = pair(quick)
    if "fleet" in parts:
        results["fleet"] = fleet(quick)
    if "tenants" in parts:
        results["tenants"] = tenants(quick)
    return results


def table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "tenants" in results:
        t = results["tenants"]
        lines += [
            f"One worker, {t['tenants']} tenants of ~600-token system prompts in round robin for "
            f"{t['turns']} turns, {t['slots']} slots of {t['ctx']} tokens, {t['threads']} threads; "
            "turns after the first:",
            "",
            "| server | TTFT p50 s | TTFT p90 s | prompt tokens reused |",
            "|---|---|---|---|",
        ]
        for name in ("rbee", "llama-server"):
            r = t[name]
            lines.append(f"| {name} | {r['p50']:.3f} | {r['p90']:.3f} | {r['reused']:.1%} |")
        lines.append(
            f"\nrbee / llama-server TTFT p50: {t['rbee']['p50'] / max(t['llama-server']['p50'], 1e-9):.2f}"
        )
        lines.append("")
    if "fleet" in results:
        f = results["fleet"][0]
        lines += [
            f"Fleet: {f['workers']} synthetic workers of {f['slots']} slots, {f['conversations']} "
            f"conversations of {f['turns']} turns with {f['prefix']}-word prefixes, "
            f"Poisson arrivals at {f['offered']:.1f} turns/s (70% of the fleet's prefill with no reuse); "
            "TTFT of the turns after the first:",
            "",
            "| routing | TTFT p50 s | TTFT p90 s | turns/s | prompt reused | busiest / mean |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["fleet"]:
            lines.append(
                f"| {r['mode']} | {r['p50']:.3f} | {r['p90']:.3f} | {r['turns_per_s']:.1f} | "
                f"{r['reused']:.1%} | {r['max_over_mean']:.2f} |"
            )
    if "pair" in results:
        p = results["pair"][0]
        lines += [
            "",
            f"Two workers of the built-in model (1 thread each) behind one queen, {p['conversations']} "
            f"conversations of {p['turns']} turns with ~400-token system prompts; turns after the first:",
            "",
            "| routing | TTFT p50 s | TTFT p90 s | prompt tokens reused |",
            "|---|---|---|---|",
        ]
        for r in results["pair"]:
            lines.append(f"| {r['routing']} | {r['p50']:.3f} | {r['p90']:.3f} | {r['reused']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("tenants", "fleet", "pair"), action="append")
    args = parser.parse_args()
    print(table(run(args.quick, tuple(args.part or ("tenants", "fleet", "pair")))))


if __name__ == "__main__":
    main()

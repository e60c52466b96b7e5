"""The worker's series (`/metrics`): its one model's requests, speed and slots."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from rbee_common.metrics import RATE_BUCKETS, WORKER_STATES, Metrics
from rbee_worker.engine import SAVE_MIN_TOKENS


class WorkerMetrics(Metrics):
    def __init__(self, model: str) -> None:
        super().__init__("rbee_worker")
        self.model = model
        self.inferences = self.counter(
            "inferences", "Inference requests by outcome (completed, failed, cancelled, timeout).",
            ["model", "outcome"])
        self.ttft = self.histogram(
            "time_to_first_token_seconds", "From taking a slot to the first token (the prompt's prefill).",
            ["model"])
        self.tokens_per_second = self.histogram(
            "tokens_per_second", "Generation speed of each finished request after its first token.",
            ["model"], buckets=RATE_BUCKETS)
        self.prompt_tokens = self.counter("prompt_tokens", "Prompt tokens of finished requests.", ["model"])
        self.cached_tokens = self.counter(
            "cached_prompt_tokens", "Prompt tokens reused from the cache instead of computed.", ["model"])
        self.prefix_lookups = self.counter(
            "prefix_lookups",
            "Finished requests by where their prompt's prefix was found: `slot` (still in a sequence), "
            "`ram` (the host-RAM prompt cache) or `none` (less than 64 tokens or half the prompt).",
            ["model", "found"])
        self.completion_tokens = self.counter("completion_tokens", "Tokens generated.", ["model"])
        self.load_seconds = self.gauge("model_load_seconds", "How long loading the model took.", ["model"])

    def request_ended(
        self, outcome: str, *, ttft_s: float | None, generating_s: float | None,
        tokens_in: int = 0, tokens_out: int = 0, tokens_cached: int = 0, tokens_restored: int = 0,
    ) -> None:
        model = self.model
        self.inferences.labels(model, outcome).inc()
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        self.prompt_tokens.labels(model).inc(tokens_in)
        self.cached_tokens.labels(model).inc(tokens_cached)
        if tokens_in:
            shared = tokens_cached > 0 and tokens_cached >= min(SAVE_MIN_TOKENS, tokens_in // 2)
            found = "ram" if tokens_restored else "slot" if shared else "none"
            self.prefix_lookups.labels(model, found).inc()
        self.completion_tokens.labels(model).inc(tokens_out)
        if generating_s is not None and generating_s > 0 and tokens_out > 1:
            self.tokens_per_second.labels(model).observe((tokens_out - 1) / generating_s)

    def watch(self, slots: Callable[[], tuple[int, int, str]]) -> None:
        """Busy and total slots and the state (`loading`, `ready`, …): read at each scrape."""

        def collect() -> Iterable[Metric]:
            busy, total, state = slots()
            used = GaugeMetricFamily(self.name("slots_busy"), "Slots generating now.", labels=["model"])
            used.add_metric([self.model], busy)
            size = GaugeMetricFamily(self.name("slots"), "Sequences this worker runs at once.",
                                     labels=["model"])
            size.add_metric([self.model], total)
            ready = GaugeMetricFamily(self.name("state"), "1 for the worker's current state.",
                                      labels=["model", "state"])
            for name in WORKER_STATES:
                ready.add_metric([self.model, name], 1 if name == state else 0)
            return [used, size, ready]

        self.collect_with(collect)

    def watch_cache(self, cache: Callable[[], Any]) -> None:
        """The llama.cpp engine's host-RAM prompt cache (`rbee_worker.engine.PromptCache`, or None
        before the model is loaded and for other backends): read at each scrape."""

        def collect() -> Iterable[Metric]:
            held = cache()
            if held is None:
                return []
            found: list[Metric] = []
            for name, text, value in (
                ("prompt_cache_bytes", "Bytes of saved prompt prefixes in host RAM.", held.bytes),
                ("prompt_cache_limit_bytes", "The most the prompt cache may hold (--cache-ram).", held.limit),
                ("prompt_cache_entries", "Saved prompt prefixes in host RAM.", len(held.entries)),
            ):
                gauge = GaugeMetricFamily(self.name(name), text, labels=["model"])
                gauge.add_metric([self.model], value)
                found.append(gauge)
            for name, text, value in (
                ("prompt_cache_saves", "Sequences saved to host RAM before being reused.", held.saved),
                ("prompt_cache_hits", "Requests whose prefix came back from host RAM.", held.restored),
                ("prompt_cache_hit_tokens", "Prompt tokens restored from host RAM instead of computed.",
                 held.restored_tokens),
                ("prompt_cache_evictions", "Saved prefixes dropped to stay within the limit.", held.evicted),
            ):
                counter = CounterMetricFamily(self.name(name), text, labels=["model"])
                counter.add_metric([self.model], value)
                found.append(counter)
            return found

        self.collect_with(collect)

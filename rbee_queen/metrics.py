"""The queen's series (`/metrics`): what clients feel, per model, and what the fleet is doing.

Counted where it happens: time to first token, tokens and tokens/s in
`inference.generate` (every API and the `infer` job go through it), queue
wait in the scheduler, cold starts where they run, heartbeats in their route,
dropped workers in the registry. Workers by state, their busy slots and the
queue depth are read from the registry and the scheduler at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from rbee_common.metrics import RATE_BUCKETS, Metrics

if TYPE_CHECKING:
    from rbee_queen.registry import WorkerRegistry

class QueenMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("rbee_queen")
        self.ttft = self.histogram(
            "time_to_first_token_seconds",
            "From a request reaching the queen to its first token (queueing and cold starts included).",
            ["model"])
        self.tokens_per_second = self.histogram(
            "tokens_per_second", "Generation speed of each finished request after its first token.",
            ["model"], buckets=RATE_BUCKETS)
        self.prompt_tokens = self.counter("prompt_tokens", "Prompt tokens of finished requests.", ["model"])
        self.completion_tokens = self.counter(
            "completion_tokens", "Tokens generated for finished requests.", ["model"])
        self.inferences = self.counter(
            "inferences", "Inference requests by model and outcome (completed, failed, cancelled).",
            ["model", "outcome"])
        self.retries = self.counter(
            "inference_retries", "Requests tried again on another worker before their first token.",
            ["model"])
        self.queue_wait = self.histogram(
            "queue_wait_seconds", "Time a request waited for a free slot (only requests that waited).",
            ["model"])
        self.routing = self.counter(
            "routing_decisions", "Requests placed by prefix routing, by reason: cache (the worker holding "
            "most of the prompt's prefix) or load (the least loaded).", ["reason"])
        self.cold_starts = self.counter(
            "cold_starts", "Workers the queen started for a request, by outcome (completed, failed).",
            ["outcome"])
        self.cold_start_duration = self.histogram(
            "cold_start_duration_seconds", "From deciding on a cold start to the worker being ready.",
            ["model"])
        self.replicas = self.counter(
            "replicas", "Workers the queen added for a model whose requests waited, and stopped when idle, "
            "by event (started, failed, stopped).", ["model", "event"])
        self.heartbeats = self.counter(
            "heartbeats", "Worker heartbeats received, by outcome (accepted, refused).", ["outcome"])
        self.workers_dropped = self.counter(
            "workers_dropped", "Workers taken out of routing, by reason (stale, unreachable, stopped).",
            ["reason"])

        self.worker_rate: dict[str, float] = {}
        """worker_id -> tokens/s of its recent requests (a moving average): the dashboard shows it."""

    def served(
        self, model: str, worker_id: str, outcome: str, *, tokens_in: int, tokens_out: int,
        generating_s: float | None,
    ) -> None:
        """One request ended. `model` is only a label when a worker took the request: a name that
        no worker serves is any string a client sent."""
        self.inferences.labels(model if worker_id else "", outcome).inc()
        if not worker_id:
            return
        self.prompt_tokens.labels(model).inc(tokens_in)
        self.completion_tokens.labels(model).inc(tokens_out)
        if generating_s is not None and tokens_out > 1 and generating_s > 0:
            rate = (tokens_out - 1) / generating_s  # the first token came with the prompt
            self.tokens_per_second.labels(model).observe(rate)
            previous = self.worker_rate.get(worker_id)
            self.worker_rate[worker_id] = rate if previous is None else 0.7 * previous + 0.3 * rate

    def worker_dropped(self, worker_id: str, reason: str) -> None:
        self.workers_dropped.labels(reason).inc()
        self.worker_rate.pop(worker_id, None)

    def watch(self, registry: WorkerRegistry, waiting: Callable[[], dict[str, int]]) -> None:
        """Workers by state and their slots, and queue depth per model: read at each scrape."""

        def collect() -> Iterable[Metric]:
            workers = registry.active()
            by_state = self.workers_by_state(workers, "Workers heard from recently, by state.")
            busy = GaugeMetricFamily(self.name("worker_slots_busy"), "Busy slots per worker.",
                                     labels=["worker_id", "model", "hive_id"])
            total = GaugeMetricFamily(self.name("worker_slots"), "Slots per worker.",
                                      labels=["worker_id", "model", "hive_id"])
            for worker in workers:
                labels = [worker.worker_id, worker.model, worker.hive_id]
                busy.add_metric(labels, worker.slots_busy)
                total.add_metric(labels, worker.slots_total)
            depth = GaugeMetricFamily(self.name("queue_depth"), "Requests waiting for a slot, per model.",
                                      labels=["model"])
            for model, count in sorted(waiting().items()):
                depth.add_metric([model], count)
            per_model = GaugeMetricFamily(self.name("model_workers"), "Workers serving each model.",
                                          labels=["model"])
            for model in sorted({w.model for w in workers}):
                per_model.add_metric([model], sum(1 for w in workers if w.model == model))
            return [by_state, busy, total, depth, per_model]

        self.collect_with(collect)

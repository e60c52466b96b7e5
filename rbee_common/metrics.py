"""`/metrics` on every daemon, in Prometheus's text format (`prometheus_client`).

Each daemon owns one `Metrics` with its own registry and a name prefix
(`rbee_queen_`, `rbee_hive_`, `rbee_worker_`): a queen with an in-process hive
serves both registries on one page without a name clash, and tests that run
several daemons in one process keep their counts apart. What every HTTP daemon
counts lives here (requests and their latency per route, jobs by operation and
outcome, auth failures); each daemon adds its own series in its package.

Gauges that mirror state a daemon already keeps (workers by state, queue
depth, free memory) are read when scraped (`collect_with`), never copied.
Labels are bounded: a route is its rule (`/v1/jobs/<job_id>`), never a path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import get_args

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from quart import Response, g, request
from quart_trio import QuartTrio

from rbee_common.wire import WorkerRecord, WorkerState

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` twin per series: half the page, no use here

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a cached answer (1 ms) to a cold start of a large model (a minute)."""

RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
"""Tokens per second, from a large model on CPU to a small one on a GPU."""

WORKER_STATES: tuple[str, ...] = get_args(WorkerState)

log = logging.getLogger("rbee.metrics")
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as labels; any other token a client sends is `other` (a label must stay bounded)."""
METRICS_PATH = "/metrics"


class _ScrapeTime(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    """One daemon's registry, with the series every HTTP daemon has."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry()
        self.requests = self.counter(
            "http_requests", "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"])
        self.latency = self.histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response headers (a stream's first byte), by route.",
            ["route", "method"])
        self.jobs = self.counter("jobs", "Jobs finished, by operation and outcome.", ["operation", "outcome"])
        self.auth_failures = self.counter(
            "auth_failures", "Requests refused for their credentials, by reason.", ["reason"])
        self.errors = self.counter(
            "errors", "Error answers, by error code (`INSUFFICIENT_RAM`, `MODEL_NOT_FOUND`, ...).", ["code"])

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, namespace=self.prefix, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, labels, namespace=self.prefix, registry=self.registry)

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> Histogram:
        return Histogram(name, documentation, labels, namespace=self.prefix, registry=self.registry,
                         buckets=buckets)

    def name(self, short: str) -> str:
        """A series' full name, for scrape-time collectors."""
        return f"{self.prefix}_{short}"

    def workers_by_state(self, workers: Sequence[WorkerRecord], documentation: str) -> GaugeMetricFamily:
        """`<prefix>_workers{state}`, every state present (0 where none is in it)."""
        family = GaugeMetricFamily(self.name("workers"), documentation, labels=["state"])
        for state in WORKER_STATES:
            family.add_metric([state], sum(1 for worker in workers if worker.state == state))
        return family

    def collect_with(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Call `collect` at each scrape: gauges read from the daemon's own state."""
        self.registry.register(_ScrapeTime(collect))

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def install(
        self, app: QuartTrio, *, public: bool = False, also: Callable[[], Sequence[Metrics]] = lambda: (),
    ) -> tuple[str, ...]:
        """Count `app`'s requests and serve `/metrics` (this registry, then those of `also`); return
        the paths to serve without the token (`/metrics` when `public`).

        Install it before auth, so that refused requests are timed and counted too.
        """
        log.info("metrics served at %s (%s)", METRICS_PATH,
                 "public: no token needed" if public else "the API token is needed")

        @app.before_request
        async def _start_clock() -> None:
            g.metrics_started = time.perf_counter()

        @app.after_request
        async def _count(response: Response) -> Response:
            rule = request.url_rule
            route = rule.rule if rule is not None else "unmatched"
            method = request.method if request.method in METHODS else "other"
            self.requests.labels(route, method, str(response.status_code)).inc()
            code = getattr(g, "error_code", None)  # set by the error handlers (rbee_common.http, dialects)
            if isinstance(code, str):
                self.errors.labels(code).inc()
            started = getattr(g, "metrics_started", None)
            if isinstance(started, float):
                self.latency.labels(route, method).observe(time.perf_counter() - started)
            return response

        @app.get(METRICS_PATH)
        async def metrics() -> Response:
            body = self.render() + b"".join(other.render() for other in also())
            return Response(body, status=200, content_type=CONTENT_TYPE)

        return (METRICS_PATH,) if public else ()

    def job_finished(self, operation: str, outcome: str) -> None:
        self.jobs.labels(operation, outcome).inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()


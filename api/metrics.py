"""Prometheus metrics of one API process: requests, latency, plan-cache hits and misses, and, read
from the database at scrape time, the job queue's depth and the seconds spent probing.

Each app has its own registry, so that several apps in one process (tests) do not collide; the
queue and probe figures come from the shared database, so every replica reports the fleet's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `*_created` timestamps double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Cached plans answer in about a millisecond, misses wait up to minutes.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class DatabaseFigures(Collector):
    """Figures read from the database at scrape time: queue depth by status, probe seconds."""

    def __init__(
        self,
        queue_depth: Callable[[], Mapping[str, int]],
        probe_totals: Callable[[], Mapping[str, tuple[int, float]]],
    ) -> None:
        self._queue_depth = queue_depth
        self._probe_totals = probe_totals

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "tuner_jobs", "Probe jobs by status (queued and running).", labels=["status"]
        )
        for status, count in sorted(self._queue_depth().items()):
            depth.add_metric([status], count)
        yield depth
        probes = CounterMetricFamily("tuner_probes", "Probe results stored, by backend.", labels=["backend"])
        seconds = CounterMetricFamily(
            "tuner_probe_seconds", "Seconds spent probing, summed over stored results.", labels=["backend"]
        )
        for backend, (count, total_seconds) in sorted(self._probe_totals().items()):
            probes.add_metric([backend], count)
            seconds.add_metric([backend], total_seconds)
        yield probes
        yield seconds


class ApiMetrics:
    """The metrics one app records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tuner_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tuner_http_request_duration_seconds",
            "Time from request to last response byte, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.plan_cache = Counter(
            "tuner_plan_cache",
            "Plan requests by outcome: hit (memory or database) or miss (a probe job was needed).",
            ["result", "layer"],
            registry=self.registry,
        )
        self.db_statements = Counter(
            "tuner_db_statements",
            "SQL statements this API process sent to the database (queries, writes, BEGIN).",
            registry=self.registry,
        )
        self.job_watch_checks = Counter(
            "tuner_job_watch_checks",
            "Looks at the watched jobs' state (one query each), by what prompted it: watch (a job "
            "newly watched), local (ended in this process), notify (PostgreSQL NOTIFY), listening "
            "(LISTEN re-established), poll.",
            ["reason"],
            registry=self.registry,
        )
        self._hit_memory = self.plan_cache.labels("hit", "memory")
        self._hit_database = self.plan_cache.labels("hit", "database")
        self._miss = self.plan_cache.labels("miss", "none")
        # Label children are looked up once per (method, route, status), not per request.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def add_database_figures(self, figures: DatabaseFigures) -> None:
        self.registry.register(figures)

    def add_wait_figures(
        self, *, waiting_requests: Callable[[], int], watched_jobs: Callable[[], int]
    ) -> None:
        """Gauges of the plan requests waiting on probe jobs, and of the jobs they wait on."""
        Gauge(
            "tuner_plan_requests_waiting",
            "Plan requests waiting for a probe job (each one a coroutine, no thread).",
            registry=self.registry,
        ).set_function(waiting_requests)
        Gauge(
            "tuner_jobs_watched",
            "Probe jobs this process's waiting requests wait on (one watch each, however many wait).",
            registry=self.registry,
        ).set_function(watched_jobs)

    def job_watch_check(self, reason: str) -> None:
        self.job_watch_checks.labels(reason).inc()

    def cache_hit(self, *, memory: bool) -> None:
        (self._hit_memory if memory else self._hit_database).inc()

    def cache_miss(self) -> None:
        self._miss.inc()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by its route template (not its raw path: ids would explode the
    label set) and times it to the last byte sent. Pure ASGI: no per-request task or copy."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get("tuner.route") or "unmatched"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)

"""Prometheus metrics (prefix rmserve_, base units, no per-request labels).

One `Metrics` per process, created by whoever builds the app and passed down; each owns its
registry so that tests can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class HttpMetrics:
    """HTTP requests and durations by route: every rmserve server has them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "rmserve_http_requests",
            "HTTP requests by route and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "rmserve_http_request_duration_seconds",
            "HTTP request duration by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class Metrics(HttpMetrics):
    """The gateway's and the workers' metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_wait = Histogram(
            "rmserve_queue_wait_seconds",
            "time a job waited before a worker took it",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "rmserve_job_duration_seconds",
            "time to score one item, by model and kind",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "rmserve_jobs",
            "jobs finished by model and outcome (ok, item_error, failed, expired)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.jobs_enqueued = Counter(
            "rmserve_jobs_enqueued",
            "jobs accepted by the gateway",
            ["model"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "rmserve_prompt_tokens",
            "tokens sent to the engine",
            ["model"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "rmserve_model_ready",
            "1 when the model is serving, 0 otherwise",
            ["model"],
            registry=self.registry,
        )

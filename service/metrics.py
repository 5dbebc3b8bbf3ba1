"""Prometheus metrics (prefix rmserve_, base units, `_total` on counters only, no per-request
labels).

One metrics object per server, created by whoever builds the app and passed down; each owns
its registry, so tests can build several apps in one process. Every process serves its own
/metrics (the gateway, each worker, each sandbox) and nothing is shared between processes:
Prometheus labels each scrape with its instance, and sums over instances are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from functools import partial
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from rmserve.service.jobs import Job
from rmserve.service.protocol import ItemResult
from rmserve.service.queue.base import JobQueue, QueueUnavailableError
from rmserve.web.metrics import LATENCY_BUCKETS, HttpMetrics

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics(HttpMetrics):
    """The gateway's and the workers' metrics (an embedded server has both sides)."""

    def __init__(self, role: str = "serve") -> None:
        super().__init__(role)
        self._queue_metrics()
        self._engine_metrics()
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
            "jobs a worker finished, by model and outcome (ok, item_error, failed, expired)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "rmserve_model_ready",
            "1 when the model is serving, 0 otherwise",
            ["model"],
            registry=self.registry,
        )
        # By reason or limit, never by key (unbounded); the gateway's log names the key.
        self.auth_failures = Counter(
            "rmserve_auth_failures",
            "requests refused by API-key checks: unauthorized (no, malformed or unknown key), "
            "forbidden (a model the key may not use)",
            ["reason"],
            registry=self.registry,
        )
        self.quota_rejections = Counter(
            "rmserve_quota_rejections",
            "requests refused by a per-key quota: rate (requests per second), concurrency "
            "(items in flight)",
            ["limit"],
            registry=self.registry,
        )
        self.groups = Counter(
            "rmserve_groups",
            "GRPO groups sent in pieces and assembled across requests for a listwise judge, by "
            "event: opened (its first item arrived), completed (all arrived and enqueued), "
            "timed_out (given up after its wait)",
            ["model", "event"],
            registry=self.registry,
        )
        self.group_wait = Histogram(
            "rmserve_group_wait_seconds",
            "time from a group's first item to its last (groups that completed)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tenant_metrics()
        for reason in ("unauthorized", "forbidden"):
            self.auth_failures.labels(reason)
        for limit in ("rate", "concurrency"):
            self.quota_rejections.labels(limit)

    def _per_model(self, kind: type[Counter] | type[Gauge], name: str, text: str) -> Any:
        return kind(name, text, ["model"], registry=self.registry)

    def _queue_metrics(self) -> None:
        counter, gauge = partial(self._per_model, Counter), partial(self._per_model, Gauge)
        self.jobs_enqueued = counter("rmserve_jobs_enqueued", "jobs accepted into the queue")
        self.jobs_acked = counter(
            "rmserve_jobs_acked",
            "jobs whose result was stored and acknowledged (dead-lettered too)",
        )
        self.jobs_redelivered = counter(
            "rmserve_jobs_redelivered",
            "jobs delivered again after a worker stopped or failed before finishing them",
        )
        self.jobs_dead_lettered = counter(
            "rmserve_jobs_dead_lettered",
            "jobs given up after max_deliveries deliveries (answered with an error)",
        )
        self.queue_pending = gauge(
            "rmserve_queue_pending", "jobs delivered to a worker and not yet acknowledged"
        )
        self.queue_lag = gauge("rmserve_queue_lag", "jobs in the queue no worker has taken yet")
        self.routed_jobs = Counter(
            "rmserve_routed_jobs",
            "jobs put into the streams, by route: affinity (to the worker their prompt prefers), "
            "fallback (another, the preferred one being loaded), shared (to any worker), "
            "round_robin (to the next worker in turn)",
            ["model", "route"],
            registry=self.registry,
        )

    def _tenant_metrics(self) -> None:
        # Tenants come from the keys file (service.tenants): the label's values are bounded.
        self.tenant_items = Counter(
            "rmserve_tenant_items",
            "items scored for a tenant, by model and outcome (ok, or the error type: "
            "timeout, item_error, internal_error, ...)",
            ["tenant", "model", "outcome"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "rmserve_tenant_tokens",
            "tokens a tenant's items used, by kind: prompt, completion (generated by judges)",
            ["tenant", "model", "kind"],
            registry=self.registry,
        )
        self.tenant_queue_wait = Histogram(
            "rmserve_tenant_queue_wait_seconds",
            "time a tenant's items waited before a worker took them (or the scheduler gave up)",
            ["tenant", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def tenant_result(self, job: Job, result: ItemResult) -> None:
        """Count a finished item for its tenant."""
        outcome = "ok" if result.error is None else result.error.type
        self.tenant_items.labels(job.tenant, job.model, outcome).inc()
        usage = result.usage
        if usage.prompt_tokens:
            self.tenant_tokens.labels(job.tenant, job.model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            tokens = self.tenant_tokens.labels(job.tenant, job.model, "completion")
            tokens.inc(usage.completion_tokens)
        self.tenant_queue_wait.labels(job.tenant, job.model).observe(result.timing.queue_s)

    def _engine_metrics(self) -> None:
        counter, gauge = partial(self._per_model, Counter), partial(self._per_model, Gauge)
        self.engine_batch_size = Histogram(
            "rmserve_engine_batch_size",
            "requests each vLLM engine step advanced (prefills completed and decodes)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.engine_prompt_tokens = counter(
            "rmserve_engine_prompt_tokens", "prompt tokens the vLLM engine processed"
        )
        self.engine_generation_tokens = counter(
            "rmserve_engine_generation_tokens", "tokens the vLLM engine generated"
        )
        self.engine_running = gauge(
            "rmserve_engine_running", "requests in the engine's running batch after its last step"
        )
        self.engine_waiting = gauge(
            "rmserve_engine_waiting", "requests waiting in the engine's scheduler at its last step"
        )
        self.engine_kv_cache_usage = gauge(
            "rmserve_engine_kv_cache_usage_ratio",
            "fraction of the engine's KV cache in use at its last step",
        )
        # The hit rate of a worker's engine is hits / queries (each worker serves its own).
        self.engine_prefix_cache_queries = counter(
            "rmserve_engine_prefix_cache_queries",
            "prompt tokens the vLLM engine looked up in its prefix cache",
        )
        self.engine_prefix_cache_hits = counter(
            "rmserve_engine_prefix_cache_hits",
            "prompt tokens the vLLM engine found in its prefix cache (not computed again)",
        )

    # service.queue.base.QueueEvents
    def acked(self, model: str) -> None:
        self.jobs_acked.labels(model).inc()

    def redelivered(self, model: str) -> None:
        self.jobs_redelivered.labels(model).inc()

    def dead_lettered(self, model: str) -> None:
        self.jobs_dead_lettered.labels(model).inc()

    def routed(self, model: str, route: str, jobs: int) -> None:
        self.routed_jobs.labels(model, route).inc(jobs)

    def expired(self, job: Job, result: ItemResult) -> None:
        self.jobs.labels(job.model, "expired").inc()
        self.tenant_result(job, result)

    def engine_stats(self, model: str) -> EngineStatsRecorder:
        return EngineStatsRecorder(self, model)


async def refresh_depths(
    metrics: Metrics, queue: JobQueue, models: Iterable[str], timeout_s: float = 2.0
) -> None:
    """Read the queue depth of each model into the gauges, before a scrape. When the queue
    cannot say (Redis unreachable), the gauges are dropped rather than left stale."""
    models = list(models)
    try:
        async with asyncio.timeout(timeout_s):
            depths = await asyncio.gather(*(queue.depth(model) for model in models))
    except (QueueUnavailableError, TimeoutError):
        metrics.queue_pending.clear()
        metrics.queue_lag.clear()
        return
    for model, depth in zip(models, depths, strict=True):
        metrics.queue_pending.labels(model).set(depth.pending)
        metrics.queue_lag.labels(model).set(depth.lag)


class EngineStatsRecorder:
    """One model's engine statistics into the metrics (models.engine.EngineStats)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._batch = metrics.engine_batch_size.labels(model)
        self._prompt = metrics.engine_prompt_tokens.labels(model)
        self._generation = metrics.engine_generation_tokens.labels(model)
        self._running = metrics.engine_running.labels(model)
        self._waiting = metrics.engine_waiting.labels(model)
        self._kv_cache = metrics.engine_kv_cache_usage.labels(model)
        self._prefix_queries = metrics.engine_prefix_cache_queries.labels(model)
        self._prefix_hits = metrics.engine_prefix_cache_hits.labels(model)

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_cache.set(kv_cache_usage)

    def prefix_cache(self, queries: int, hits: int) -> None:
        self._prefix_queries.inc(queries)
        self._prefix_hits.inc(hits)

    def iteration(self, batch: int, prompt_tokens: int, generation_tokens: int) -> None:
        if batch > 0:
            self._batch.observe(batch)
        self._prompt.inc(prompt_tokens)
        self._generation.inc(generation_tokens)

"""Distributed mode: `rmserve gateway` and `rmserve worker --model NAME`, joined by one Redis.

Gateways are stateless: jobs, results, async batches, the result cache and the workers' states
all live in Redis, so any gateway answers any request. A worker hosts one model: it loads it,
announces its state, takes jobs from the model's streams (its own, to which gateways route the
items of the prompts it has cached, and the shared one) as engine capacity frees up, and on
SIGTERM drains (stops reading, finishes in-flight jobs within the grace period, releases the
rest to other workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response

from rmserve.models.base import RewardModel
from rmserve.models.errors import ModelLoadError
from rmserve.models.loader import load_model
from rmserve.models.spec import ModelSpec, Registry
from rmserve.service.batches import RedisBatchStore
from rmserve.service.cache import RedisResultCache
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.fleet import STALE_S, WorkerAnnouncer, watch_workers
from rmserve.service.gateway import create_app
from rmserve.service.jobs import Job
from rmserve.service.metrics import Metrics, refresh_depths
from rmserve.service.peers import QueuePeers
from rmserve.service.queue.base import QueueUnavailableError
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
from rmserve.service.redis_connect import redis_client
from rmserve.service.toolboxes import gateway_toolbox, needs_tools, sidecar
from rmserve.service.usage import RedisUsage
from rmserve.service.worker import Worker, worker_concurrency
from rmserve.web.errors import Unavailable, install_error_handlers
from rmserve.web.http import LimitsAndMetrics, exposition
from rmserve.wire.errors import ErrorBody

log = logging.getLogger(__name__)


def stream_settings(settings: Settings) -> StreamSettings:
    return StreamSettings(
        capacity=settings.queue_capacity,
        max_deliveries=settings.max_deliveries,
        reclaim_idle_s=settings.reclaim_idle_s,
        result_ttl_s=max(settings.batch_result_ttl_s, settings.max_timeout_s),
        routing=settings.routing,
        scheduling=settings.scheduling,
        stale_s=STALE_S,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_s=settings.redis_wait_timeout_s,
    )


def _process_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


class GatewayRuntime:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.client = redis_client(settings)
        self.metrics = Metrics("gateway")
        self.queue = StreamQueue(
            self.client, stream_settings(settings), _process_name("gateway"), self.metrics
        )
        self.directory = ModelDirectory(registry.models.values())
        self._watcher: asyncio.Task[None] | None = None

    def app(self) -> FastAPI:
        settings, client = self.settings, self.client
        return create_app(
            settings,
            self.queue,
            self.directory,
            self.metrics,
            cache=RedisResultCache(client, settings.result_cache_ttl_s)
            if settings.result_cache_ttl_s > 0
            else None,
            batches=lambda scoring: RedisBatchStore(
                client, scoring, settings.max_items_per_batch, settings.batch_result_ttl_s
            ),
            usage=RedisUsage(client, settings.usage_retention_days),
            lifespan=self.lifespan,
            wait_for_models=False,
            toolbox=gateway_toolbox(settings),
        )

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._watcher = asyncio.create_task(watch_workers(self.client, self.directory))
        try:
            yield
        finally:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            await self.queue.close()


class WorkerRuntime:
    """One model's worker. Its small HTTP app serves /healthz, /readyz and /metrics.

    `peers` are the models this one scores with (a judge's meta reward model): the worker
    follows their fleet states like a gateway and sends them jobs through their streams.
    """

    def __init__(
        self, settings: Settings, spec: ModelSpec, peers: Sequence[ModelSpec] = ()
    ) -> None:
        self.settings, self.spec = settings, spec
        self.client = redis_client(settings)
        self.name = _process_name(spec.name)
        self.metrics = Metrics("worker")
        self.queue = StreamQueue(self.client, stream_settings(settings), self.name, self.metrics)
        self.announcer = WorkerAnnouncer(self.client, spec.name, self.name)
        self.cache = (
            RedisResultCache(self.client, settings.result_cache_ttl_s)
            if settings.result_cache_ttl_s > 0
            else None
        )
        self.usage = RedisUsage(self.client, settings.usage_retention_days)
        self.peer_directory = ModelDirectory(peers)
        self.model: RewardModel | None = None
        self.worker: Worker | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def app(self) -> FastAPI:
        app = FastAPI(title=f"rmserve worker ({self.spec.name})", lifespan=self.lifespan)
        install_error_handlers(app)
        unavailable: dict[int | str, dict[str, Any]] = {503: {"model": ErrorBody}}

        @app.get("/startupz", responses=unavailable)
        async def startupz() -> dict[str, str]:
            """Started (startup probe): loading the model has ended, well or not (a model that
            cannot load is reported by /readyz and GET /v1/models, not fixed by a restart)."""
            if self.announcer.status == "loading":
                raise Unavailable(f"model {self.spec.name!r} is still loading")
            return {"status": "started"}

        @app.get("/healthz", responses=unavailable)
        async def healthz() -> dict[str, str]:
            """Alive (liveness); 503 once the engine died, so that the pod is restarted."""
            if self.worker is not None and self.worker.failure is not None:
                raise Unavailable(self.worker.failure)
            return {"status": "ok"}

        @app.get("/readyz", responses=unavailable)
        async def readyz() -> dict[str, Any]:
            """Ready (readiness): the model is loaded and Redis answers."""
            if self.announcer.status != "ready":
                reason = self.announcer.reason or "the model is still loading"
                raise Unavailable(f"model {self.spec.name!r} is {self.announcer.status}: {reason}")
            try:
                await self.queue.ping()
            except QueueUnavailableError as exc:
                raise Unavailable(f"the job queue is unreachable: {exc}") from None
            busy = self.worker.busy if self.worker is not None else 0
            return {"status": "ready", "model": self.spec.name, "worker": self.name, "busy": busy}

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            await refresh_depths(self.metrics, self.queue, [self.spec.name])
            return exposition(self.metrics.registry)

        app.add_middleware(
            LimitsAndMetrics, metrics=self.metrics, routes=app.router.routes, max_bytes=1 << 20
        )
        return app

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._tasks = [
            asyncio.create_task(self.announcer.run()),
            asyncio.create_task(self._serve()),
        ]
        if self.peer_directory.names():
            self._tasks.append(asyncio.create_task(watch_workers(self.client, self.peer_directory)))
        try:
            yield
        finally:
            await self._drain()

    async def _serve(self) -> None:
        name = self.spec.name
        self.metrics.model_ready.labels(name).set(0)
        try:
            peers = QueuePeers(self.queue, self.peer_directory)
            tools = sidecar(self.settings) if needs_tools([self.spec]) else None
            stats = self.metrics.engine_stats(name)
            self.model = await asyncio.to_thread(load_model, self.spec, peers, tools, stats)
        except ModelLoadError as exc:
            self._out_of_service(str(exc))
            return
        except Exception as exc:
            log.exception("loading %s failed unexpectedly", name)
            self._out_of_service(f"unexpected error while loading: {type(exc).__name__}: {exc}")
            return
        concurrency = worker_concurrency(self.spec, self.settings.worker_concurrency)
        self.worker = Worker(
            self.model, self.queue, self.metrics, concurrency, self.cache, self.usage
        )
        self.announcer.take_jobs(concurrency, self.queue.own_stream(name))
        self.announcer.set("ready")
        self.metrics.model_ready.labels(name).set(1)
        log.info("worker %s serves %s", self.name, name)
        try:
            await self.worker.run()
        except Exception as exc:  # a bug in the loop must not pass unnoticed
            log.exception("the worker loop of %s stopped", name)
            self.worker.failure = f"its worker stopped: {type(exc).__name__}: {exc}"
        if self.worker.failure is not None:
            self._out_of_service(self.worker.failure)
            # Other workers of the model score what this one could not.
            await self._release(await self.worker.stop(grace_s=0))

    def _out_of_service(self, reason: str) -> None:
        log.error("model %s is unavailable on this worker: %s", self.spec.name, reason)
        self.announcer.set("unavailable", reason)
        self.metrics.model_ready.labels(self.spec.name).set(0)

    async def _release(self, unfinished: list[Job]) -> None:
        """Hand jobs this worker will not finish to the other workers of the model."""
        assert self.worker is not None
        jobs, self.worker.abandoned = self.worker.abandoned + unfinished, []
        if not jobs:
            return
        try:
            await self.queue.release(jobs)
            log.warning("released %d unfinished jobs to other workers", len(jobs))
        except QueueUnavailableError as exc:
            log.warning("could not release %d jobs (%s); reclaimed once idle", len(jobs), exc)

    async def _drain(self) -> None:
        """SIGTERM: leave the fleet, stop reading, finish or release in-flight jobs."""
        await self.announcer.withdraw()
        if self.worker is not None:
            busy = self.worker.busy
            unfinished = await self.worker.stop(self.settings.drain_grace_s)
            await self._release(unfinished)
            log.info(
                "drained: %d in-flight jobs finished, %d released",
                busy - len(unfinished),
                len(unfinished),
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.model is not None:
            self.model.shutdown()
        await self.usage.close()  # writes the last counts
        await self.queue.close()

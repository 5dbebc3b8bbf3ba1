"""Embedded mode: gateway, in-process queue and one worker per model in one process tree.

The gateway answers at once (/healthz, /v1/models with status "loading"); models load in the
background one after another. Each vLLM engine runs in its own engine-core process, created once
and kept warm. A model that cannot load is marked unavailable with the reason; the rest serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rmserve.models.base import RewardModel
from rmserve.models.errors import ModelLoadError
from rmserve.models.loader import load_model
from rmserve.models.spec import ModelSpec, Registry
from rmserve.service.cache import MemoryResultCache
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.jobs import error_result
from rmserve.service.metrics import Metrics
from rmserve.service.peers import QueuePeers
from rmserve.service.queue import InProcessQueue
from rmserve.service.toolboxes import embedded_toolbox
from rmserve.service.usage import MemoryUsage
from rmserve.service.worker import Worker, worker_concurrency

log = logging.getLogger(__name__)


class EmbeddedRuntime:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.directory = ModelDirectory(registry.models.values())
        self.metrics = Metrics("serve")
        self.usage = MemoryUsage(settings.usage_retention_days)
        self.queue = InProcessQueue(
            settings.queue_capacity, self.metrics, self.usage, settings.scheduling == "fifo"
        )
        self.cache = (
            MemoryResultCache(settings.result_cache_ttl_s, settings.result_cache_max_entries)
            if settings.result_cache_ttl_s > 0
            else None
        )
        # Judges reach their meta reward models through the queue, like clients do.
        self.peers = QueuePeers(self.queue, self.directory)
        # Agentic judges, code_tests and python graders run code in the sandbox.
        self.toolbox = embedded_toolbox(settings)
        self._workers: dict[str, Worker] = {}
        self._loader: asyncio.Task[None] | None = None
        self._supervisors: list[asyncio.Task[None]] = []

    def app(self) -> FastAPI:
        return create_app(
            self.settings,
            self.queue,
            self.directory,
            self.metrics,
            cache=self.cache,
            usage=self.usage,
            lifespan=self.lifespan,
            toolbox=self.toolbox,
        )

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._loader = asyncio.create_task(self._load_all())
        try:
            yield
        finally:
            await self._shutdown()

    async def _load_all(self) -> None:
        for spec in self.registry.models.values():
            model = await self._load(spec)
            if model is not None:
                self._start_worker(spec, model)

    async def _load(self, spec: ModelSpec) -> RewardModel | None:
        self.metrics.model_ready.labels(spec.name).set(0)
        try:
            model = await asyncio.to_thread(
                load_model, spec, self.peers, self.toolbox, self.metrics.engine_stats(spec.name)
            )
        except ModelLoadError as exc:
            reason = str(exc)
        except Exception as exc:  # never let one model take the service down
            log.exception("loading %s failed unexpectedly", spec.name)
            reason = f"unexpected error while loading: {type(exc).__name__}: {exc}"
        else:
            self.directory.mark_ready(spec.name)
            self.metrics.model_ready.labels(spec.name).set(1)
            log.info("model %s is ready", spec.name)
            return model
        self.directory.mark_unavailable(spec.name, reason)
        log.warning("model %s is unavailable: %s", spec.name, reason)
        return None

    def _start_worker(self, spec: ModelSpec, model: RewardModel) -> None:
        concurrency = worker_concurrency(spec, self.settings.worker_concurrency)
        worker = Worker(model, self.queue, self.metrics, concurrency, self.cache, self.usage)
        self._workers[model.name] = worker
        self._supervisors.append(asyncio.create_task(self._supervise(worker)))

    async def _supervise(self, worker: Worker) -> None:
        try:
            await worker.run()
        except Exception as exc:  # a bug in the loop must not pass unnoticed
            log.exception("the worker of %s stopped", worker.model.name)
            worker.failure = f"its worker stopped: {type(exc).__name__}: {exc}"
        if worker.failure is not None:
            self.directory.mark_unavailable(worker.model.name, worker.failure)
            self.metrics.model_ready.labels(worker.model.name).set(0)
            log.error("model %s taken out of service: %s", worker.model.name, worker.failure)
            await self.queue.release(worker.abandoned + await worker.stop(grace_s=0))
            await self._fail_queued(worker.model.name, worker.failure)

    async def _fail_queued(self, model: str, reason: str) -> None:
        """Answer jobs of a model that left service (queued, or abandoned when its engine
        died), instead of letting them wait: no other worker serves it in this process."""
        message = f"model {model!r} is unavailable: {reason}"
        while jobs := await self.queue.fetch(model, 1024, wait_s=0.01):
            for job in jobs:
                await self.queue.complete(job, error_result(job, "unavailable", message))

    async def _shutdown(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        await asyncio.gather(
            *(worker.stop(self.settings.drain_grace_s) for worker in self._workers.values()),
            return_exceptions=True,
        )
        for worker in self._workers.values():
            worker.model.shutdown()
        for task in self._supervisors:
            task.cancel()
        await self.queue.close()

"""The HTTP gateway: routes only. Logic lives in ScoringService; errors in rmserve.web.errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from rmserve.service.auth import ApiKey, Authenticator, Caller
from rmserve.service.batches import BatchStore, MemoryBatchStore, wait_done
from rmserve.service.cache import ResultCache
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.graders import Graders, RunRequest, ValidateRequest, grader_models
from rmserve.service.metrics import Metrics, refresh_depths
from rmserve.service.openrlhf import add_openrlhf_route
from rmserve.service.protocol import (
    BatchStatus,
    ModelList,
    ScoreOptions,
    ScoreRequest,
    ScoreResponse,
)
from rmserve.service.queue.base import JobQueue, QueueUnavailableError
from rmserve.service.quotas import Lease, LeasedStream, Quotas, quotas_for
from rmserve.service.scoring import ScoringService
from rmserve.service.tenants import current_tenancy
from rmserve.service.usage import UsageLedger, add_usage_route
from rmserve.web.errors import Unavailable, install_error_handlers
from rmserve.web.http import LimitsAndMetrics, exposition
from rmserve.wire.errors import ErrorBody
from rmserve.wire.tools import Toolbox

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)
}


def create_app(
    settings: Settings,
    queue: JobQueue,
    directory: ModelDirectory,
    metrics: Metrics,
    *,
    cache: ResultCache | None = None,
    usage: UsageLedger | None = None,
    batches: Callable[[ScoringService], BatchStore] | None = None,
    lifespan: Lifespan | None = None,
    wait_for_models: bool = True,
    toolbox: Toolbox | None = None,
) -> FastAPI:
    """The gateway's routes. `batches` makes the async batch store (default: in the process);
    `wait_for_models`: /readyz fails while a model loads (embedded mode) or only when the
    queue is unreachable (a distributed gateway serves whichever models have workers)."""
    # Quotas live where the queue lives: in its Redis (shared by all gateways) or the process.
    quotas = quotas_for(queue, metrics, settings.quota_lease_ttl_s, settings.max_timeout_s + 60)
    app = FastAPI(
        title="rmserve",
        summary="Reward-model inference: score agent trajectories with reward models on vLLM.",
        version="0.1.0",
        lifespan=_closing(lifespan, quotas),
    )
    install_error_handlers(app)
    scoring = ScoringService(settings, queue, directory, metrics, cache)
    auth = Authenticator.from_file(settings.api_keys_file, directory.names(), metrics)
    app.state.authenticator = auth  # service.auth.Caller: the request's key

    async def admit(
        key: ApiKey, models: Sequence[str], items: int, options: ScoreOptions | None = None
    ) -> Lease:
        """403 unless the key may use the models (and the options' tenant and class), else
        the lease of its quota; the request's jobs count for its tenancy (service.tenants)."""
        auth.authorize(key, models)
        tenancy = key.tenancy(options.tenant, options.priority) if options else key.tenancy()
        current_tenancy.set(tenancy)
        return await quotas.admit(key.name, key.quota, items)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
        tags=["scoring"],
    )
    async def score(request: ScoreRequest, key: Caller) -> Response | ScoreResponse:
        """Score trajectories with one model. An item that cannot be scored gets an `error`;
        the other items of the batch are still scored. With `options.stream`, results come as
        NDJSON lines as each item finishes."""
        lease = await admit(key, [request.model], len(request.items), request.options)
        if not request.options.stream:
            async with lease:
                return await scoring.score(request, scope=key.name)
        # Errors are still proper 4xx/5xx here; the lease ends with the streamed response.
        submission = await lease.released_on_error(scoring.submit(request, scope=key.name))

        async def lines() -> AsyncIterator[bytes]:
            async for result in scoring.stream(submission):
                yield result.model_dump_json().encode() + b"\n"

        return LeasedStream(lines(), lease, media_type="application/x-ndjson")

    store = (
        batches(scoring)
        if batches is not None
        else MemoryBatchStore(scoring, settings.max_items_per_batch, settings.batch_result_ttl_s)
    )

    @app.post("/v1/jobs", status_code=202, responses=_ERRORS, tags=["jobs"])
    async def submit_batch(request: ScoreRequest, response: Response, key: Caller) -> BatchStatus:
        """Score a big batch in the background: answers 202 with the batch id at once. Poll
        GET /v1/jobs/{id} or stream GET /v1/jobs/{id}/stream; results are kept for
        batch_result_ttl_s after the batch is done. Only the API key that started a batch
        sees it."""
        lease = await admit(key, [request.model], len(request.items), request.options)
        status = await lease.released_on_error(store.start(request, owner=key.name))
        quotas.release_when(lease, lambda: wait_done(store, status.id, key.name))
        response.headers["Location"] = f"/v1/jobs/{status.id}"
        return status

    @app.get("/v1/jobs/{batch_id}", responses=_ERRORS, tags=["jobs"])
    async def batch_status(batch_id: str, key: Caller) -> BatchStatus:
        """Progress of a batch and the results finished so far (in item order)."""
        return await store.status(batch_id, owner=key.name)

    @app.get(
        "/v1/jobs/{batch_id}/stream",
        responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
        tags=["jobs"],
    )
    async def batch_stream(batch_id: str, key: Caller) -> StreamingResponse:
        """All results of a batch as NDJSON: those finished already, then each as it finishes."""
        results = await store.follow(batch_id, owner=key.name)

        async def lines() -> AsyncIterator[bytes]:
            async for result in results:
                yield result.model_dump_json().encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    add_openrlhf_route(app, scoring, settings, admit)
    graders = Graders(scoring, directory, toolbox)

    @app.post(
        "/v1/fine_tuning/alpha/graders/run",
        responses=_ERRORS,
        tags=["compatibility"],
    )
    async def run_grader(request: RunRequest, key: Caller) -> dict[str, Any]:
        """OpenAI graders: grade `model_sample` (and `item`) with a grader; the response has
        `reward`, `metadata` (with `errors` flags), `sub_rewards`."""
        models = grader_models(request.grader)
        auth.authorize(key, models, param="grader.model")
        # Model graders score one item at a time.
        async with await quotas.admit(key.name, key.quota, min(1, len(models))):
            return await graders.run(request)

    @app.post(
        "/v1/fine_tuning/alpha/graders/validate",
        responses=_ERRORS,
        tags=["compatibility"],
    )
    async def validate_grader(request: ValidateRequest, key: Caller) -> dict[str, Any]:
        """OpenAI graders: check a grader (422 naming the field when it is invalid)."""
        auth.authorize(key, grader_models(request.grader), param="grader.model")
        graders.check(request.grader)
        return {"grader": request.grader.model_dump(exclude_none=True)}

    if usage is not None:
        add_usage_route(app, usage, settings)

    @app.get("/v1/models", tags=["models"])
    async def models(key: Caller) -> ModelList:
        """Every model in the registry the API key may use, with its status and, when
        unavailable, the reason."""
        return ModelList(data=[info for info in directory.infos() if key.may_use(info.name)])

    @app.get("/startupz", responses={503: {"model": ErrorBody}}, tags=["health"])
    async def startupz() -> dict[str, str]:
        """Started (startup probe): the registry is loaded and (embedded mode) no model is
        still loading. Stays 200 from then on."""
        if wait_for_models:
            loading = [info.name for info in directory.infos() if info.status == "loading"]
            if loading:
                raise Unavailable(f"models still loading: {', '.join(loading)}")
        return {"status": "started"}

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}}, tags=["health"])
    async def readyz() -> dict[str, Any]:
        """Ready to serve (readiness): the queue answers and (embedded mode) no model is still
        loading and at least one model is ready."""
        try:
            await queue.ping()
        except QueueUnavailableError as exc:
            raise Unavailable(f"the job queue is unreachable: {exc}") from None
        states = {info.name: info.status for info in directory.infos()}
        if not wait_for_models:
            return {"status": "ready", "models": states}
        loading = [name for name, status in states.items() if status == "loading"]
        if loading:
            raise Unavailable(f"models still loading: {', '.join(loading)}")
        if "ready" not in states.values():
            raise Unavailable("no model is ready; GET /v1/models says why")
        return {"status": "ready", "models": states}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        await refresh_depths(metrics, queue, directory.names())
        return exposition(metrics.registry)

    app.add_middleware(
        LimitsAndMetrics,
        metrics=metrics,
        routes=app.router.routes,
        max_bytes=settings.max_request_bytes,
        max_concurrent=settings.max_concurrent_requests,
        max_inflight_bytes=settings.max_inflight_bytes,
    )
    return app


def _closing(lifespan: Lifespan | None, quotas: Quotas) -> Lifespan:
    """The runtime's lifespan, with the quota leases released at shutdown (before the runtime
    closes the queue, whose Redis holds them in distributed mode)."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app) if lifespan is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                await quotas.close()

    return run

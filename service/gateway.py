"""The HTTP gateway: routes only. Logic lives in ScoringService; errors in service.errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import Depends, FastAPI, Response
from fastapi.responses import StreamingResponse

from sandbox.protocol import Toolbox
from service.auth import api_key_check
from service.batches import BatchStore, MemoryBatchStore
from service.cache import ResultCache
from service.config import Settings
from service.directory import ModelDirectory
from service.errors import Unavailable, install_error_handlers
from service.graders import Graders, RunRequest, ValidateRequest
from service.http import LimitsAndMetrics, exposition
from service.metrics import Metrics, refresh_depths
from service.openrlhf import add_openrlhf_route
from service.protocol import BatchStatus, ErrorBody, ModelList, ScoreRequest, ScoreResponse
from service.queue.base import JobQueue, QueueUnavailableError
from service.scoring import ScoringService

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 429, 503)
}


def create_app(
    settings: Settings,
    queue: JobQueue,
    directory: ModelDirectory,
    metrics: Metrics,
    *,
    cache: ResultCache | None = None,
    batches: Callable[[ScoringService], BatchStore] | None = None,
    lifespan: Lifespan | None = None,
    wait_for_models: bool = True,
    toolbox: Toolbox | None = None,
) -> FastAPI:
    """The gateway's routes. `batches` makes the async batch store (default: in the process);
    `wait_for_models`: /readyz fails while a model loads (embedded mode) or only when the
    queue is unreachable (a distributed gateway serves whichever models have workers)."""
    app = FastAPI(
        title="rmserve",
        summary="Reward-model inference: score agent trajectories with reward models on vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    scoring = ScoringService(settings, queue, directory, metrics, cache)
    authenticated = [Depends(api_key_check(settings.api_keys))]

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
        tags=["scoring"],
        dependencies=authenticated,
    )
    async def score(request: ScoreRequest) -> Response | ScoreResponse:
        """Score trajectories with one model. An item that cannot be scored gets an `error`;
        the other items of the batch are still scored. With `options.stream`, results come as
        NDJSON lines as each item finishes."""
        if not request.options.stream:
            return await scoring.score(request)
        submission = await scoring.submit(request)  # errors are still proper 4xx/5xx here

        async def lines() -> AsyncIterator[bytes]:
            async for result in scoring.stream(submission):
                yield result.model_dump_json().encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    store = (
        batches(scoring)
        if batches is not None
        else MemoryBatchStore(scoring, settings.max_items_per_batch, settings.batch_result_ttl_s)
    )

    @app.post(
        "/v1/jobs", status_code=202, responses=_ERRORS, tags=["jobs"], dependencies=authenticated
    )
    async def submit_batch(request: ScoreRequest, response: Response) -> BatchStatus:
        """Score a big batch in the background: answers 202 with the batch id at once. Poll
        GET /v1/jobs/{id} or stream GET /v1/jobs/{id}/stream; results are kept for
        batch_result_ttl_s after the batch is done."""
        status = await store.start(request)
        response.headers["Location"] = f"/v1/jobs/{status.id}"
        return status

    @app.get("/v1/jobs/{batch_id}", responses=_ERRORS, tags=["jobs"], dependencies=authenticated)
    async def batch_status(batch_id: str) -> BatchStatus:
        """Progress of a batch and the results finished so far (in item order)."""
        return await store.status(batch_id)

    @app.get(
        "/v1/jobs/{batch_id}/stream",
        responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
        tags=["jobs"],
        dependencies=authenticated,
    )
    async def batch_stream(batch_id: str) -> StreamingResponse:
        """All results of a batch as NDJSON: those finished already, then each as it finishes."""
        results = await store.follow(batch_id)

        async def lines() -> AsyncIterator[bytes]:
            async for result in results:
                yield result.model_dump_json().encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    add_openrlhf_route(app, scoring, settings, authenticated)
    graders = Graders(scoring, directory, toolbox)

    @app.post(
        "/v1/fine_tuning/alpha/graders/run",
        responses=_ERRORS,
        tags=["compatibility"],
        dependencies=authenticated,
    )
    async def run_grader(request: RunRequest) -> dict[str, Any]:
        """OpenAI graders: grade `model_sample` (and `item`) with a grader; the response has
        `reward`, `metadata` (with `errors` flags), `sub_rewards`."""
        return await graders.run(request)

    @app.post(
        "/v1/fine_tuning/alpha/graders/validate",
        responses=_ERRORS,
        tags=["compatibility"],
        dependencies=authenticated,
    )
    async def validate_grader(request: ValidateRequest) -> dict[str, Any]:
        """OpenAI graders: check a grader (422 naming the field when it is invalid)."""
        graders.check(request.grader)
        return {"grader": request.grader.model_dump(exclude_none=True)}

    @app.get("/v1/models", tags=["models"], dependencies=authenticated)
    async def models() -> ModelList:
        """Every model in the registry, with its status and, when unavailable, the reason."""
        return ModelList(data=directory.infos())

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
    )
    return app

"""GRPO groups sent in pieces and assembled by the service for a listwise judge (service.cohorts):
requests of one item each, as OpenRLHF and verl's agent loop send them, through ScoringService
on the in-process queue and on a real Redis shared by two gateways. The worker here answers each
group job with every candidate's response length as its score, and records what it judged, so a
test sees which responses were judged together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rmserve.models.spec import GenerativeSpec
from rmserve.service.cohorts import Cohort, MemoryCohorts, expire, join
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.groups import fold
from rmserve.service.launcher import RedisServer
from rmserve.service.metrics import Metrics
from rmserve.service.protocol import ItemResult, ScoreRequest, ScoreResponse
from rmserve.service.queue.base import JobQueue
from rmserve.service.queue.memory import InProcessQueue
from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
from rmserve.service.scoring import ScoringService
from rmserve.web.errors import UnprocessableEntity
from rmserve.wire.trajectory import Trajectory, text_of

JUDGE = GenerativeSpec.model_validate(
    {"name": "judge", "kind": "generative", "weights": "/nowhere", "options": {"mode": "listwise"}}
)
PROMPT = [{"role": "user", "content": "Name a prime."}]
FAST = StreamSettings(capacity=1000, reclaim_idle_s=5, sweep_s=0.5)


def sample(group: str, k: int, size: int, **extra: Any) -> dict[str, Any]:
    """Response k of a group: `k` x's long, so its score (its length) says which it is."""
    return {
        "id": f"{group}-{k}",
        "messages": [*PROMPT, {"role": "assistant", "content": "x" * (k + 1)}],
        "group": group,
        "group_size": size,
        **extra,
    }


def request(*items: dict[str, Any], **options: Any) -> ScoreRequest:
    return ScoreRequest.model_validate({"model": "judge", "items": items, "options": options})


class Judge:
    """A worker for the listwise judge: scores each candidate by its response's length."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.judged: list[list[str | None]] = []  # the candidates' ids of each job

    async def run(self) -> None:
        while True:
            for job in await self.queue.fetch("judge", 16, wait_s=0.05):
                candidates = job.item.candidates or []
                self.judged.append([c.id for c in candidates])
                lengths = [float(len(text_of(c.messages[-1].content))) for c in candidates]
                await self.queue.complete(job, ItemResult(index=job.index, scores=lengths))


@contextlib.asynccontextmanager
async def judging(queue: JobQueue) -> AsyncIterator[Judge]:
    judge = Judge(queue)
    task = asyncio.create_task(judge.run())
    try:
        yield judge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def gateway(queue: JobQueue, **settings: Any) -> tuple[ScoringService, Metrics]:
    directory = ModelDirectory([JUDGE])
    directory.mark_ready("judge")
    metrics = Metrics()
    settings = {"group_wait_s": 20.0, **settings}  # a failing test fails within 20 s
    return ScoringService(Settings(**settings), queue, directory, metrics), metrics


def groups_metric(metrics: Metrics, event: str) -> float:
    value = metrics.registry.get_sample_value(
        "rmserve_groups_total", {"model": "judge", "event": event}
    )
    return value or 0.0


async def score_each(scoring: ScoringService, items: list[dict[str, Any]]) -> list[ItemResult]:
    """One request per item, all at once; each request's one result."""
    responses: list[ScoreResponse] = await asyncio.gather(
        *(scoring.score(request(item), scope="job-1") for item in items)
    )
    return [response.results[0] for response in responses]


# -- the state of a group, one change at a time ------------------------------------------------


def piece(*items: dict[str, Any]) -> Any:
    units, pieces = fold([Trajectory.model_validate(item) for item in items])
    assert units == [] and len(pieces) == 1
    return pieces[0]


def test_a_group_completes_with_its_announced_size_and_resent_items_keep_their_place() -> None:
    cohort: Cohort | None = None
    places: list[Any] = []
    for k in range(3):
        cohort, outcomes, completed = join(cohort, piece(sample("g", k, 3)), {}, "c1", 0, 10, 60)
        places += outcomes
        assert completed == (k == 2)
    assert places == [0, 1, 2] and cohort is not None and cohort.status == "done"
    # The same item again (a client's retry) waits for its place's result.
    cohort, outcomes, completed = join(cohort, piece(sample("g", 1, 3)), {}, "c2", 1, 10, 90)
    assert outcomes == [1] and not completed
    assert cohort.channels == ["c1", "c2"] and cohort.deadline == 90
    # The same id with another response, or one response more than announced: refused.
    other = sample("g", 1, 3, messages=[*PROMPT, {"role": "assistant", "content": "other"}])
    _, (conflict,), _ = join(cohort, piece(other), {}, None, 1, 10, 60)
    _, (oversize,), _ = join(cohort, piece(sample("g", 3, 3)), {}, None, 1, 10, 60)
    assert getattr(conflict, "type", None) == "group_conflict"
    assert getattr(oversize, "type", None) == "group_oversize"


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"group_size": 4}, "group_size"),
        ({"reference": "7"}, "reference"),
        ({"messages": [{"role": "user", "content": "Name an even number."},
                       {"role": "assistant", "content": "2"}]}, "conversation"),
    ],
)  # fmt: skip
def test_an_item_that_does_not_match_its_group_is_refused_alone(
    change: dict[str, Any], what: str
) -> None:
    cohort, _, _ = join(None, piece(sample("g", 0, 3)), {}, None, 0, 10, 60)
    cohort, (outcome,), _ = join(cohort, piece(sample("g", 1, 3, **change)), {}, None, 0, 10, 60)
    assert getattr(outcome, "type", None) == "group_mismatch" and what in outcome.message  # type: ignore[union-attr]
    assert cohort.ids == ["g-0"]
    # Other request options (another judge sampling) are a mismatch too.
    _, (outcome,), _ = join(cohort, piece(sample("g", 2, 3)), {"judge": 1}, None, 0, 10, 60)
    assert getattr(outcome, "type", None) == "group_mismatch"


def test_a_group_is_given_up_once_after_its_wait_and_late_items_are_told() -> None:
    cohort, _, _ = join(None, piece(sample("g", 0, 3)), {}, None, 0, 10, 60)
    assert expire(cohort, 9.9) == (cohort, False)
    expired, first = expire(cohort, 10)
    assert first and expired is not None and expired.status == "expired"
    assert expire(expired, 11)[1] is False  # only one request gives it up
    _, (late,), _ = join(expired, piece(sample("g", 1, 3)), {}, None, 12, 10, 60)
    assert getattr(late, "type", None) == "group_incomplete"


def test_groups_in_a_request_must_agree_on_their_size() -> None:
    with pytest.raises(UnprocessableEntity) as caught:
        fold([Trajectory.model_validate(sample("g", 0, 3)),
              Trajectory.model_validate(sample("g", 1, 4))])  # fmt: skip
    assert caught.value.param == "items.1.group_size"
    with pytest.raises(UnprocessableEntity) as caught:
        fold([Trajectory.model_validate(sample("g", k, 2)) for k in range(3)])
    assert caught.value.param == "items.2.group"
    with pytest.raises(UnprocessableEntity) as caught:
        fold([Trajectory.model_validate(sample("g", 0, 27))])
    assert caught.value.param == "items.0.group_size"
    # Whole in the request: folded as before, nothing to assemble.
    units, pieces = fold([Trajectory.model_validate(sample("g", k, 2)) for k in range(2)])
    assert len(units) == 1 and pieces == []


async def test_memory_store_forgets_a_group_after_its_time() -> None:
    store = MemoryCohorts()

    def add(cohort: Cohort | None) -> tuple[Cohort, int]:
        joined, _, _ = join(cohort, piece(sample("g", 0, 2)), {}, None, 0, 10, 60)
        return joined, len(joined.ids)

    assert await store.change("k", add, ttl_s=0.05) == 1
    assert await store.change("k", add, ttl_s=0.05) == 1  # the same id: its place again
    await asyncio.sleep(0.06)
    assert await store.change("k", lambda c: (c, c), ttl_s=1) is None


# -- through the scoring service -----------------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "cluster"])
async def queues(request: pytest.FixtureRequest) -> AsyncIterator[tuple[JobQueue, JobQueue]]:
    """Two gateways' queues: on one Redis (standalone, or a one-node Cluster), or the
    in-process queue (embedded mode, where one process is the only gateway: the same queue
    twice)."""
    if request.param == "memory":
        queue = InProcessQueue(capacity=1000)
        yield queue, queue
        return
    server: RedisServer = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster"
    )
    server.flush()
    first, second = (StreamQueue.from_url(server.url, FAST, name=f"gw{i}") for i in range(2))
    yield first, second
    await first.close()
    await second.close()


async def test_a_group_sent_one_item_per_request_is_judged_whole_and_each_gets_its_score(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, metrics = gateway(queues[0])
    items = [sample("g", k, 4) for k in (2, 0, 3, 1)]
    async with judging(queues[0]) as judge:
        results = await score_each(scoring, items)
    assert [(r.id, r.score, r.error) for r in results] == [
        ("g-2", 3.0, None), ("g-0", 1.0, None), ("g-3", 4.0, None), ("g-1", 2.0, None)
    ]  # fmt: skip
    (judged,) = judge.judged  # one judgement (its order: the order the items arrived in)
    assert sorted(judged) == ["g-0", "g-1", "g-2", "g-3"]  # type: ignore[type-var]
    assert all(r.index == 0 and r.partial_group is None for r in results)
    assert groups_metric(metrics, "opened") == 1 and groups_metric(metrics, "completed") == 1
    wait = metrics.registry.get_sample_value("rmserve_group_wait_seconds_count", {"model": "judge"})
    assert wait == 1


async def test_pieces_of_several_sizes_and_whole_groups_mix_in_one_request(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, _ = gateway(queues[0])
    whole = [sample("w", k, 2) for k in range(2)]
    async with judging(queues[0]) as judge:
        first, second = await asyncio.gather(
            scoring.score(request(sample("a", 0, 3), *whole, sample("a", 1, 3))),
            scoring.score(request(sample("a", 2, 3))),
        )
    assert [(r.index, r.id, r.score) for r in first.results] == [
        (0, "a-0", 1.0), (1, "w-0", 1.0), (2, "w-1", 2.0), (3, "a-1", 2.0)
    ]  # fmt: skip
    assert [(r.index, r.id, r.score) for r in second.results] == [(0, "a-2", 3.0)]
    assert sorted(map(sorted, judge.judged)) == [["a-0", "a-1", "a-2"], ["w-0", "w-1"]]


async def test_groups_assemble_across_gateways_and_scopes_never_mix(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    one, _ = gateway(queues[0])
    two = gateway(queues[1])[0] if queues[1] is not queues[0] else one  # embedded: one gateway
    async with judging(queues[0]) as judge:
        results = await asyncio.gather(
            one.score(request(sample("g", 0, 2)), scope="job-1"),
            two.score(request(sample("g", 1, 2)), scope="job-1"),
            # Another training job's group of the same name is its own group.
            two.score(request(sample("g", 0, 2)), scope="job-2"),
            one.score(request(sample("g", 1, 2)), scope="job-2"),
        )
    assert [r.results[0].score for r in results] == [1.0, 2.0, 1.0, 2.0]
    assert len(judge.judged) == 2


async def test_a_group_that_does_not_complete_is_an_error_of_each_item_never_a_ranking(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, metrics = gateway(queues[0])
    items = [sample("g", k, 4) for k in range(3)]
    async with judging(queues[0]) as judge:
        started = time.monotonic()
        results = [
            response.results[0]
            for response in await asyncio.gather(
                *(scoring.score(request(item, group_wait_s=0.3)) for item in items)
            )
        ]
        waited = time.monotonic() - started
        # A late item is told at once.
        (late,) = (await scoring.score(request(sample("g", 3, 4)))).results
    assert judge.judged == [] and waited < 5
    for result in results:
        assert result.score is None and result.error is not None
        assert (
            result.error.type == "group_incomplete" and "3 of the group's 4" in result.error.message
        )
    assert late.error is not None and late.error.type == "group_incomplete"
    assert groups_metric(metrics, "timed_out") == 1 and groups_metric(metrics, "completed") == 0


async def test_an_operator_may_have_partial_groups_judged_and_flagged(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, _ = gateway(queues[0], partial_groups="judge")
    async with judging(queues[0]) as judge:
        results = [
            response.results[0]
            for response in await asyncio.gather(
                *(scoring.score(request(sample("g", k, 4), group_wait_s=0.3)) for k in range(3))
            )
        ]
        (alone,) = (await scoring.score(request(sample("h", 0, 4), group_wait_s=0.2))).results
    assert [(r.score, r.partial_group) for r in results] == [(1.0, 3), (2.0, 3), (3.0, 3)]
    assert [sorted(j) for j in judge.judged] == [["g-0", "g-1", "g-2"]]  # type: ignore[type-var]
    # One response cannot be compared: an error, partial or not.
    assert alone.error is not None and alone.error.type == "group_incomplete"


async def test_a_resent_item_gets_its_groups_result_and_one_too_many_is_refused(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, _ = gateway(queues[0])
    async with judging(queues[0]) as judge:
        await score_each(scoring, [sample("g", k, 2) for k in range(2)])
        (again,) = (await scoring.score(request(sample("g", 1, 2)), scope="job-1")).results
        (oversize,) = (await scoring.score(request(sample("g", 2, 2)), scope="job-1")).results
    assert again.score == 2.0 and again.error is None and len(judge.judged) == 1
    assert oversize.error is not None and oversize.error.type == "group_oversize"


async def test_a_gateway_that_dies_holding_items_loses_nothing(redis_url: str) -> None:
    """The first gateway takes two items and dies (its requests' clients see the connection
    fail); the group completes on the second, and the items resent there get their scores."""
    dying = StreamQueue.from_url(redis_url, FAST, name="dying")
    living = StreamQueue.from_url(redis_url, FAST, name="living")
    (first, _), (second, _) = gateway(dying), gateway(living)
    async with judging(living) as judge:
        held = [
            asyncio.create_task(first.score(request(sample("g", k, 4)), scope="s"))
            for k in range(2)
        ]
        await asyncio.sleep(0.3)
        for task in held:
            task.cancel()
        await dying.close()
        rest = await asyncio.gather(
            *(second.score(request(sample("g", k, 4)), scope="s") for k in range(2, 4))
        )
        resent = await asyncio.gather(
            *(second.score(request(sample("g", k, 4)), scope="s") for k in range(2))
        )
    assert [sorted(j) for j in judge.judged] == [["g-0", "g-1", "g-2", "g-3"]]  # type: ignore[type-var]
    assert [r.results[0].score for r in [*rest, *resent]] == [3.0, 4.0, 1.0, 2.0]
    await living.close()


async def test_a_group_the_queue_refuses_is_an_error_of_each_item() -> None:
    queue = InProcessQueue(capacity=0)
    scoring, _ = gateway(queue)
    results = await score_each(scoring, [sample("g", k, 2) for k in range(2)])
    for result in results:
        assert result.error is not None and result.error.type == "queue_full", result


async def test_a_result_that_arrives_before_the_request_reads_it_is_kept(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, _ = gateway(queues[0])
    async with judging(queues[0]) as judge:
        first = await scoring.submit(request(sample("g", 0, 2)), scope="s")
        last = await scoring.submit(request(sample("g", 1, 2)), scope="s")
        await asyncio.sleep(0.5)  # judged, delivered and received before anyone reads it
        assert len(judge.judged) == 1
        results = [r for s in (first, last) async for r in scoring.stream(s)]
    assert [(r.id, r.score) for r in results] == [("g-0", 1.0), ("g-1", 2.0)]


async def test_a_request_timeout_shorter_than_the_group_wait_ends_the_request_only(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    scoring, _ = gateway(queues[0])
    async with judging(queues[0]):
        (early,) = (await scoring.score(request(sample("g", 0, 2), timeout_s=0.2))).results
        (late,) = (await scoring.score(request(sample("g", 1, 2)))).results
    assert early.error is not None and early.error.type == "timeout"
    assert late.score == 2.0  # the group still completed, and was judged whole


async def test_a_waiter_woken_a_little_early_still_ends_the_group_on_time(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    """uvloop's timers may fire ~1 ms early; the group was then still open by the store's
    clock and every waiter used to wait for its request's deadline instead."""
    scoring, _ = gateway(queues[0])
    submitted = await scoring.submit(request(sample("g", 0, 2), group_wait_s=0.3), scope="s")
    (waiting,) = submitted.groups
    waiting.expires_at -= 0.05  # this waiter's timer fires before the group's wait is over
    started = time.monotonic()
    (result,) = [r async for r in scoring.stream(submitted)]
    assert time.monotonic() - started < 5
    assert result.error is not None and result.error.type == "group_incomplete"


async def test_an_item_that_finds_its_group_past_its_wait_ends_it(
    queues: tuple[JobQueue, JobQueue],
) -> None:
    """Nobody waits on the first item (its gateway died): the next item to arrive after the
    wait gives the group up, and is told so at once."""
    scoring, metrics = gateway(queues[0])
    first = await scoring.submit(request(sample("g", 0, 3), group_wait_s=0.2), scope="s")
    await asyncio.sleep(0.3)
    started = time.monotonic()
    (late,) = (await scoring.score(request(sample("g", 1, 3)), scope="s")).results
    assert time.monotonic() - started < 2
    assert late.error is not None and late.error.type == "group_incomplete"
    (held,) = [r async for r in scoring.stream(first)]
    assert held.error is not None and held.error.type == "group_incomplete"
    assert "1 of the group's 3" in held.error.message
    assert groups_metric(metrics, "timed_out") == 1

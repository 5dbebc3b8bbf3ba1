"""RewardClient and AsyncRewardClient against a scripted loopback server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any

import pytest
from pydantic import BaseModel

from rmserve.client import (
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
    ScoreResult,
)
from rmserve.client import client as client_module
from tests.client import Reply, ScriptedServer, error_reply

MODES = ["sync", "async"]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


class Sleeps:
    """Records backoff sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    async def coro(self, seconds: float) -> None:
        self.calls.append(seconds)


def trajectories(count: int) -> list[dict[str, Any]]:
    return [
        {"id": f"t{i}", "messages": [{"role": "user", "content": "x" * i}]} for i in range(count)
    ]


def run(
    mode: str,
    url: str,
    sleeps: Sleeps,
    items: list[Any],
    *,
    stream: bool = False,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> list[ScoreResult]:
    kwargs = {"backoff_s": 0.01, "max_backoff_s": 0.05, **kwargs}
    if mode == "sync":
        with RewardClient(url, sleep=sleeps, **kwargs) as client:
            if stream:
                return list(client.stream("rm", items, options=options))
            return client.score("rm", items, options=options)

    async def main() -> list[ScoreResult]:
        async with AsyncRewardClient(url, sleep=sleeps.coro, **kwargs) as client:
            if stream:
                return [result async for result in client.stream("rm", items, options=options)]
            return await client.score("rm", items, options=options)

    return asyncio.run(main())


def assert_all_scored(results: list[ScoreResult], count: int) -> None:
    assert sorted(result.index for result in results) == list(range(count))
    for result in results:
        assert result.id == f"t{result.index}"
        assert result.score == float(result.index)
        assert result.error is None


@pytest.mark.parametrize("mode", MODES)
def test_batches_split_and_results_in_order(mode: str, server: ScriptedServer) -> None:
    sleeps = Sleeps()
    results = run(
        mode, server.url, sleeps, trajectories(10), batch_size=3, api_key="k", options={"x": 1}
    )
    assert [result.index for result in results] == list(range(10))
    assert_all_scored(results, 10)
    assert sorted(len(body["items"]) for body in server.bodies) == [1, 3, 3, 3]
    assert all(body["options"] == {"x": 1, "stream": False} for body in server.bodies)
    assert set(server.auth) == {"Bearer k"}
    assert results[0].model_extra == {"extra_field": "kept"}  # unknown fields are kept
    assert results[0].usage.prompt_tokens == 3
    assert sleeps.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_stream_yields_all_rebased(mode: str, server: ScriptedServer) -> None:
    results = run(mode, server.url, Sleeps(), trajectories(7), stream=True, batch_size=3)
    assert len(results) == 7
    assert_all_scored(results, 7)
    assert server.requests == 3
    assert all(body["options"] == {"stream": True} for body in server.bodies)


@pytest.mark.parametrize("mode", MODES)
def test_api_key_from_env_and_pydantic_items(
    mode: str, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Message(BaseModel):
        role: str
        content: str

    class Trajectory(BaseModel):
        id: str | None = None
        messages: list[Message]
        reference: str | None = None

    monkeypatch.setenv("RMSERVE_API_KEY", "from-env")
    item = Trajectory(id="t2", messages=[Message(role="user", content="ab")])
    results = run(mode, server.url, Sleeps(), [item])
    assert results[0].score == 2.0
    assert server.bodies[0]["items"] == [
        {"id": "t2", "messages": [{"role": "user", "content": "ab"}]}
    ]
    assert server.auth == ["Bearer from-env"]


@pytest.mark.parametrize("mode", MODES)
def test_empty_items_send_nothing(mode: str, server: ScriptedServer) -> None:
    assert run(mode, server.url, Sleeps(), []) == []
    assert run(mode, server.url, Sleeps(), [], stream=True) == []
    assert server.requests == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_429_honours_retry_after(mode: str, stream: bool, server: ScriptedServer) -> None:
    server.script(error_reply(429, "overloaded", headers={"Retry-After": "0.03"}))
    sleeps = Sleeps()
    results = run(mode, server.url, sleeps, trajectories(3), stream=stream)
    assert_all_scored(results, 3)
    assert server.requests == 2
    assert sleeps.calls == [0.03]


@pytest.mark.parametrize("mode", MODES)
def test_retry_after_is_capped_and_dates_fall_back(mode: str, server: ScriptedServer) -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    server.script(
        error_reply(429, "overloaded", headers={"Retry-After": "100"}),
        error_reply(503, "unavailable", headers={"Retry-After": date}),
    )
    sleeps = Sleeps()
    run(mode, server.url, sleeps, trajectories(2), max_backoff_s=0.05)
    assert sleeps.calls[0] == 0.05
    assert 0 <= sleeps.calls[1] <= 0.02  # the jittered backoff of attempt 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_503_twice_then_ok(mode: str, stream: bool, server: ScriptedServer) -> None:
    server.script(error_reply(503, "unavailable"), error_reply(503, "unavailable"))
    sleeps = Sleeps()
    results = run(mode, server.url, sleeps, trajectories(4), stream=stream)
    assert_all_scored(results, 4)
    assert server.requests == 3
    assert len(sleeps.calls) == 2
    assert 0 <= sleeps.calls[0] <= 0.01 and 0 <= sleeps.calls[1] <= 0.02


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_timeout_is_retried(mode: str, stream: bool, server: ScriptedServer) -> None:
    server.script(Reply(delay_s=1.5))
    sleeps = Sleeps()
    results = run(mode, server.url, sleeps, trajectories(3), stream=stream, timeout_s=0.5)
    assert_all_scored(results, 3)
    assert server.requests == 2
    assert len(sleeps.calls) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_client_errors_raise_without_retry(
    mode: str, stream: bool, status: int, server: ScriptedServer
) -> None:
    server.script(error_reply(status, "invalid_request", "bad item", param="items.1.messages"))
    sleeps = Sleeps()
    with pytest.raises(RewardServiceError) as caught:
        run(mode, server.url, sleeps, trajectories(3), stream=stream)
    error = caught.value
    assert (error.status, error.type, error.message, error.param) == (
        status,
        "invalid_request",
        "bad item",
        "items.1.messages",
    )
    assert server.requests == 1
    assert sleeps.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_error_param_rebased_to_callers_items(mode: str, server: ScriptedServer) -> None:
    server.script(
        Reply(),
        error_reply(422, "invalid_request", "items.1.content: bad", param="items.1.content"),
    )
    with pytest.raises(RewardServiceError) as caught:
        run(mode, server.url, Sleeps(), trajectories(6), batch_size=2, max_concurrency=1)
    assert caught.value.param == "items.3.content"
    assert caught.value.message == "items.3.content: bad"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_retries_exhausted_raise_last_status(
    mode: str, stream: bool, server: ScriptedServer
) -> None:
    server.script(*(error_reply(status, "x") for status in (503, 500, 504, 502)))
    sleeps = Sleeps()
    with pytest.raises(RewardServiceError) as caught:
        run(mode, server.url, sleeps, trajectories(2), stream=stream, max_retries=3)
    assert caught.value.status == 502
    assert server.requests == 4
    assert len(sleeps.calls) == 3


@pytest.mark.parametrize("mode", MODES)
def test_unreachable_service_raises_after_retries(mode: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(RewardServiceError) as caught:
        run(mode, f"http://127.0.0.1:{port}", sleeps, trajectories(1), max_retries=2)
    assert (caught.value.status, caught.value.type) == (None, "connection_error")
    assert len(sleeps.calls) == 2


@pytest.mark.parametrize("mode", MODES)
def test_backoff_full_jitter_bounds(
    mode: str, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps = [0.01, 0.02, 0.04, 0.04, 0.04]  # min(max_backoff, backoff * 2**attempt)
    server.script(*(error_reply(503, "unavailable") for _ in caps))
    sleeps = Sleeps()
    run(mode, server.url, sleeps, trajectories(1), max_backoff_s=0.04)
    assert all(0 <= slept <= cap for slept, cap in zip(sleeps.calls, caps, strict=True))

    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr(client_module.random, "uniform", uniform)
    server.script(*(error_reply(503, "unavailable") for _ in caps))
    sleeps = Sleeps()
    run(mode, server.url, sleeps, trajectories(1), max_backoff_s=0.04)
    assert bounds == [(0, cap) for cap in caps]
    assert sleeps.calls == caps


def test_retry_policy_delays_stay_within_cap() -> None:
    policy = RetryPolicy(max_retries=20, backoff_s=0.5, max_backoff_s=30)
    for attempt in range(200):
        assert 0 <= policy.delay(attempt) <= min(30, 0.5 * 2**attempt)
    assert policy.delay(3, retry_after_s=2) == 2
    assert policy.delay(3, retry_after_s=99) == 30


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_concurrency_is_bounded(mode: str, stream: bool, server: ScriptedServer) -> None:
    server.delay_s = 0.1
    results = run(
        mode, server.url, Sleeps(), trajectories(12), stream=stream, batch_size=1, max_concurrency=3
    )
    assert_all_scored(results, 12)
    assert server.requests == 12
    assert 2 <= server.max_in_flight <= 3


@pytest.mark.parametrize("mode", MODES)
def test_stream_broken_before_any_result_is_retried(mode: str, server: ScriptedServer) -> None:
    server.script(Reply(break_after=0))
    sleeps = Sleeps()
    results = run(mode, server.url, sleeps, trajectories(5), stream=True)
    assert_all_scored(results, 5)
    assert server.requests == 2
    assert len(sleeps.calls) == 1


@pytest.mark.parametrize("mode", MODES)
def test_stream_broken_after_results_raises(mode: str, server: ScriptedServer) -> None:
    server.script(Reply(break_after=2))
    sleeps = Sleeps()
    with pytest.raises(RewardServiceError) as caught:
        run(mode, server.url, sleeps, trajectories(5), stream=True)
    assert caught.value.type == "stream_interrupted"
    assert "after 2 of 5 results" in caught.value.message
    assert server.requests == 1
    assert sleeps.calls == []


def test_sync_stream_yields_results_before_the_failure(server: ScriptedServer) -> None:
    server.script(Reply(break_after=2))
    seen: list[ScoreResult] = []
    with RewardClient(server.url) as client, pytest.raises(RewardServiceError):
        seen.extend(client.stream("rm", trajectories(5)))
    assert sorted(result.index for result in seen) == [3, 4]  # reverse finishing order


def test_sync_stream_stops_early(server: ScriptedServer) -> None:
    with RewardClient(server.url, batch_size=2) as client:
        stream = client.stream("rm", trajectories(9))
        first = next(iter(stream))
        stream.close()  # type: ignore[attr-defined]  # a generator
    assert 0 <= first.index < 9


async def test_async_stream_stops_early(server: ScriptedServer) -> None:
    server.delay_s = 0.05
    client = AsyncRewardClient(server.url, batch_size=1, max_concurrency=2)
    async with client, aclosing(client.stream("rm", trajectories(20))) as stream:
        async for result in stream:
            assert result.error is None
            break
    assert server.requests < 20


async def test_async_models(server: ScriptedServer) -> None:
    async with AsyncRewardClient(server.url) as client:
        assert [model["name"] for model in await client.models()] == ["rm"]


def test_models(server: ScriptedServer) -> None:
    with RewardClient(server.url) as client:
        assert client.models()[0]["status"] == "ready"


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        RewardClient(batch_size=0)
    with pytest.raises(ValueError):
        AsyncRewardClient(max_retries=-1)

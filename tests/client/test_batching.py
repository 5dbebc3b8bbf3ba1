"""MicroBatcher and LoopThread on real event loops and threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from rmserve.client import RewardServiceError
from rmserve.client.batching import LoopThread, MicroBatcher, ProcessLocal, _rejected_items


class Recorder:
    """A `send` that records its batches and answers each item with (key, item)."""

    def __init__(self, fail: Exception | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.fail, self.delay_s = fail, delay_s

    async def __call__(self, key: str, items: list[int]) -> list[tuple[str, int]]:
        self.batches.append((key, items))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [(key, item) for item in items]


async def test_concurrent_submits_are_one_batch_per_key() -> None:
    send = Recorder()
    batcher = MicroBatcher(send, max_batch=100, max_wait_s=0.01)
    results = await asyncio.gather(*(batcher.submit("ab"[n % 2], n) for n in range(10)))
    assert results == [("ab"[n % 2], n) for n in range(10)]
    assert sorted(send.batches) == [("a", [0, 2, 4, 6, 8]), ("b", [1, 3, 5, 7, 9])]


async def test_a_full_batch_is_sent_at_once_and_a_lone_item_after_the_window() -> None:
    send = Recorder()
    batcher = MicroBatcher(send, max_batch=4, max_wait_s=30)
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit("k", n) for n in range(8)))
    assert send.batches == [("k", [0, 1, 2, 3]), ("k", [4, 5, 6, 7])]
    assert time.monotonic() - started < 5  # full batches do not wait for the window
    window = MicroBatcher(Recorder(), max_batch=4, max_wait_s=0.05)
    started = time.monotonic()
    assert await window.submit("k", 1) == ("k", 1)
    assert 0.04 < time.monotonic() - started < 5


async def test_a_failed_send_fails_every_caller_of_its_batch_only() -> None:
    failing = MicroBatcher(Recorder(fail=RuntimeError("down")), max_wait_s=0.01)
    outcomes = await asyncio.gather(
        *(failing.submit("k", n) for n in range(3)), return_exceptions=True
    )
    assert [str(outcome) for outcome in outcomes] == ["down"] * 3


async def test_a_wrong_number_of_results_is_an_error_not_a_shifted_answer() -> None:
    async def short(key: str, items: list[int]) -> list[int]:
        return items[:-1]

    batcher = MicroBatcher(short, max_wait_s=0.01)
    outcomes = await asyncio.gather(
        *(batcher.submit("k", n) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) and "2 results" in str(o) for o in outcomes)


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    send = Recorder(delay_s=0.05)
    batcher = MicroBatcher(send, max_wait_s=0.01)
    tasks = [asyncio.create_task(batcher.submit("k", n)) for n in range(3)]
    await asyncio.sleep(0.02)  # sent, not answered
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == ("k", 0) and done[2] == ("k", 2)
    assert isinstance(done[1], asyncio.CancelledError)
    await batcher.drain()


def test_loop_thread_serves_threads_and_refuses_its_own() -> None:
    thread = LoopThread()
    send = Recorder()
    batcher: MicroBatcher[str, int, Any] = MicroBatcher(send, max_wait_s=0.02)
    results: list[Any] = [None] * 8

    def call(n: int) -> None:
        results[n] = thread.run(batcher.submit("k", n))

    workers = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert results == [("k", n) for n in range(8)]
    assert len(send.batches) < 8

    async def nested() -> None:
        thread.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="its own loop"):
        thread.run(nested())
    thread.close(batcher.drain())
    assert thread.loop.is_closed()


def test_process_local_makes_one_value_until_popped() -> None:
    made: list[object] = []
    local = ProcessLocal(lambda: made.append(object()) or made[-1])
    assert local.get() is local.get() is made[0]
    assert local.pop() is made[0] and local.pop() is None
    assert local.get() is made[1]


def test_a_422_names_the_items_it_rejects() -> None:
    error = RewardServiceError(
        422,
        "invalid_request",
        "items.2.messages.0.role: bad tag; items.0.messages: no tool call 'a'",
        "items.2.messages.0.role",
    )
    assert _rejected_items(error, 3) == {
        2: "items.2.messages.0.role: bad tag",
        0: "items.0.messages: no tool call 'a'",
    }
    assert _rejected_items(error, 2) == {0: "items.0.messages: no tool call 'a'"}
    assert _rejected_items(RewardServiceError(422, "x", "options.n: bad", "options.n"), 3) == {}
    assert _rejected_items(RewardServiceError(503, "x", "items.0: busy", "items.0"), 3) == {}

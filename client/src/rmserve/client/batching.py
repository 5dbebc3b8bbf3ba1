"""Micro-batching for trainers that ask for one reward at a time.

verl's reward loop awaits one `compute_score` per sample, OpenRLHF calls `reward_func` once per
sample from many threads. `MicroBatcher` coalesces the calls that arrive close together on one
event loop into one request: a batch is sent when `max_batch` items wait, or `max_wait_s` after
its first item arrived (a few milliseconds: the latency a lone caller pays). Each caller gets its
own result, or the exception of its batch. `LoopThread` is an event loop on a daemon thread, so
that sync callers (threads) share one batcher; `ScoreBatcher` is the batcher of POST /v1/score.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rmserve.client.client import AsyncRewardClient, ItemError, RewardServiceError, ScoreResult

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_S = 0.005
_ITEM = re.compile(r"^items\.(\d+)\b")


@dataclass
class _Waiting(Generic[T, R]):
    entries: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[K, T, R]):
    """Coalesces `submit(key, item)` calls of one event loop into `send(key, items)` calls,
    one batch per key (items of different keys never share a request). `send` returns one
    result per item, in order; when it raises, every caller of that batch gets the exception."""

    def __init__(
        self,
        send: Callable[[K, list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_s not negative")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._send = send
        self._waiting: dict[K, _Waiting[T, R]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: T) -> R:
        """The result of `item`, sent in a batch with the items submitted around it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        waiting = self._waiting.setdefault(key, _Waiting())
        waiting.entries.append((item, future))
        if len(waiting.entries) >= self.max_batch:
            self._flush(key)
        elif waiting.timer is None:
            waiting.timer = loop.call_later(self.max_wait_s, self._flush, key)
        return await future

    async def drain(self) -> None:
        """Send what waits now and wait until every batch sent has been answered."""
        for key in list(self._waiting):
            self._flush(key)
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _flush(self, key: K) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return
        if waiting.timer is not None:
            waiting.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._answer(key, waiting.entries))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _answer(self, key: K, entries: list[tuple[T, asyncio.Future[R]]]) -> None:
        futures = [future for _, future in entries]
        try:
            results = await self._send(key, [item for item, _ in entries])
            if len(results) != len(entries):
                raise RuntimeError(f"{len(results)} results for a batch of {len(entries)}")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:
            for future in futures:
                if not future.done():  # a caller that was cancelled has gone
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)


class LoopThread:
    """An event loop on a daemon thread. Sync callers block on coroutines run there, so the
    calls of all their threads share one batcher and one connection pool."""

    def __init__(self, name: str = "rmserve-client") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, R], timeout_s: float | None = None) -> R:
        """Run `coroutine` on the loop and block the calling thread until it is done."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("LoopThread.run was called from its own loop: await instead")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self, cleanup: Coroutine[Any, Any, None] | None = None) -> None:
        """Run `cleanup` (e.g. closing clients), stop the loop and join the thread."""
        if not self._thread.is_alive():
            if cleanup is not None:
                cleanup.close()
            return
        try:
            if cleanup is not None:
                self.run(cleanup, timeout_s=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


class ProcessLocal(Generic[T]):
    """One value per process, made on first use (made again in a forked child, whose copy of
    the parent's threads and connections is unusable). Thread-safe."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: tuple[int, T] | None = None

    def get(self) -> T:
        with self._lock:
            if self._value is None or self._value[0] != os.getpid():
                self._value = (os.getpid(), self._make())
            return self._value[1]

    def pop(self) -> T | None:
        """Forget the value; the caller closes what it returns (None: nothing of this process)."""
        with self._lock:
            value, self._value = self._value, None
        return value[1] if value is not None and value[0] == os.getpid() else None


class LoopLocal(Generic[T]):
    """One value per running event loop, held weakly: it goes with its loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T | None:
        with self._lock:
            return self._values.get(asyncio.get_running_loop())

    def set(self, value: T) -> None:
        with self._lock:
            self._values[asyncio.get_running_loop()] = value

    def pop(self) -> T | None:
        with self._lock:
            return self._values.pop(asyncio.get_running_loop(), None)


class ScoreBatcher:
    """POST /v1/score through one AsyncRewardClient, with concurrent single-item calls
    coalesced per (model, options). An item the service rejects as invalid (a 422 naming
    `items.N`) becomes that item's error result and the rest are sent again, so one caller's bad
    item never fails the other callers of its batch."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        self.url, self.api_key = url, api_key
        self.client = AsyncRewardClient(url, api_key=api_key, batch_size=max_batch)
        self._batcher: MicroBatcher[tuple[str, str], dict[str, Any], ScoreResult] = MicroBatcher(
            self._send, max_batch=max_batch, max_wait_s=max_wait_s
        )

    async def score_one(
        self, model: str, item: dict[str, Any], options: Mapping[str, Any] | None = None
    ) -> ScoreResult:
        """`item`'s result (its `index` is its place in the batch it was sent in)."""
        return await self._batcher.submit((model, _options_key(options)), item)

    async def score(
        self, model: str, items: Sequence[dict[str, Any]], options: Mapping[str, Any] | None
    ) -> list[ScoreResult]:
        """The results of `items` in order, rejected items as item errors."""
        results: list[ScoreResult | None] = [None] * len(items)
        remaining = list(range(len(items)))
        while remaining:
            try:
                scored = await self.client.score(
                    model, [items[i] for i in remaining], options=options
                )
            except RewardServiceError as exc:
                rejected = _rejected_items(exc, len(remaining))
                if not rejected:
                    raise
                for local, message in rejected.items():
                    error = ItemError(type=exc.type, message=message)
                    results[remaining[local]] = ScoreResult(index=remaining[local], error=error)
                remaining = [index for n, index in enumerate(remaining) if n not in rejected]
                continue
            for result in scored:
                result.index = remaining[result.index]
                results[result.index] = result
            remaining = []
        return [result for result in results if result is not None]

    async def aclose(self) -> None:
        """Answer what was submitted, then close the connections."""
        try:
            await self._batcher.drain()
        finally:
            await self.client.aclose()

    async def _send(self, key: tuple[str, str], items: list[dict[str, Any]]) -> list[ScoreResult]:
        model, options = key
        return await self.score(model, items, _options_of(options))


def _options_key(options: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(options or {}), sort_keys=True)


def _options_of(key: str) -> dict[str, Any] | None:
    options: dict[str, Any] = json.loads(key)
    return options or None


def _rejected_items(error: RewardServiceError, count: int) -> dict[int, str]:
    """The items a 422 names (`items.N...` in its message or param) with their complaints."""
    if error.status != 422:
        return {}
    complaints: dict[int, list[str]] = {}
    for part in error.message.split("; "):
        match = _ITEM.match(part.strip())
        if match and int(match.group(1)) < count:
            complaints.setdefault(int(match.group(1)), []).append(part.strip())
    named = _ITEM.match(error.param or "")
    if named and int(named.group(1)) < count and int(named.group(1)) not in complaints:
        complaints[int(named.group(1))] = [f"{error.param}: {error.message}"]
    return {index: "; ".join(parts) for index, parts in complaints.items()}

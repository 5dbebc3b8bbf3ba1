"""Sync and async clients for rmserve's scoring API: batching, bounded concurrency, retries
with jittered exponential backoff, and NDJSON streaming.

Both clients split the items into batches of `batch_size`, send up to `max_concurrency`
batches at once (async: a semaphore per call; sync: a thread pool per call sharing one
`httpx.Client`) and re-base every result's `index` to the caller's list.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "RMSERVE_API_KEY"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Timeouts (connect, read, write, pool), connection failures and dropped connections.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_ITEMS_PARAM = re.compile(r"\bitems\.(\d+)")

Item = Mapping[str, Any] | BaseModel
T = TypeVar("T")


class _Open(BaseModel):
    """Keeps fields this client does not know (newer servers)."""

    model_config = ConfigDict(extra="allow")


class ItemError(_Open):
    type: str
    message: str


class Usage(_Open):
    prompt_tokens: int = 0
    truncated_tokens: int = 0
    completion_tokens: int = 0


class Timing(_Open):
    queue_s: float = 0.0
    compute_s: float = 0.0


class ScoreResult(_Open):
    """One item's result, as the service sends it; `index` is the position in the caller's
    list. Samples and evidence stay plain dicts."""

    id: str | None = None
    index: int
    score: float | None = None
    scores: list[float | None] | None = None
    step_scores: list[float | None] | None = None
    verdict: str | None = None
    critique: str | None = None
    samples: list[dict[str, Any]] | None = None
    evidence: list[dict[str, Any]] | None = None
    error: ItemError | None = None
    cached: bool = False
    usage: Usage = Field(default_factory=Usage)
    timing: Timing = Field(default_factory=Timing)


class RewardServiceError(Exception):
    """A request failed: an error answer (`status`), or no answer at all (`status` None:
    timeout or connection error). `param` names the offending field, item index re-based."""

    def __init__(
        self,
        status: int | None,
        type: str,
        message: str,
        param: str | None = None,
        *,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(f"{status if status is not None else 'no response'} {type}: {message}")
        self.status, self.type, self.message, self.param = status, type, message, param
        self.retry_after_s = retry_after_s
        self.retryable = status is None or status in RETRY_STATUSES
        if retryable is not None:
            self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its constructor's arguments, not by str(); the keyword-only ones come
        # back with the state.
        return type(self), (self.status, self.type, self.message, self.param), self.__dict__


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff: attempt n (0-based) sleeps
    uniform(0, min(max_backoff_s, backoff_s * 2**n)), or Retry-After capped by max_backoff_s."""

    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def cap(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_backoff_s)
        return random.uniform(0, self.cap(attempt))

    def next_delay(self, error: RewardServiceError, attempt: int) -> float:
        """The sleep before retry `attempt`, or raise `error` when it must not be retried."""
        if not error.retryable or attempt >= self.max_retries:
            raise error
        return self.delay(attempt, error.retry_after_s)


@dataclass(frozen=True)
class _Batch:
    offset: int
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class _Settings:
    base_url: str
    api_key: str | None = field(repr=False)
    timeout_s: float
    max_concurrency: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_concurrency < 1:
            raise ValueError("batch_size and max_concurrency must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    def http_kwargs(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout_s),
            "limits": httpx.Limits(
                max_connections=None, max_keepalive_connections=self.max_concurrency
            ),
        }


def _settings(base_url: str, api_key: str | None, **numbers: Any) -> _Settings:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    return _Settings(base_url=base_url.rstrip("/"), api_key=key, **numbers)


def _policy(max_retries: int, backoff_s: float, max_backoff_s: float) -> RetryPolicy:
    if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
        raise ValueError("max_retries, backoff_s and max_backoff_s must not be negative")
    return RetryPolicy(max_retries, backoff_s, max_backoff_s)


def _payload(item: Item) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json", exclude_none=True)
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"items must be mappings or pydantic models, got {type(item).__name__}")


def _batches(items: Sequence[Item], size: int) -> list[_Batch]:
    """Requests of `size` items; a batch ends early or late rather than split a run of items
    with the same `group` (a listwise judge compares a group within one request)."""
    payloads = [_payload(item) for item in items]
    batches, start = [], 0
    while start < len(payloads):
        end = min(start + size, len(payloads))
        group = payloads[end - 1].get("group")
        if group is not None and end < len(payloads) and payloads[end].get("group") == group:
            first = end - 1
            while first > start and payloads[first - 1].get("group") == group:
                first -= 1
            if first > start:  # end before the group
                end = first
            else:  # the group alone is larger than a batch: keep it whole
                while end < len(payloads) and payloads[end].get("group") == group:
                    end += 1
        batches.append(_Batch(start, payloads[start:end]))
        start = end
    return batches


def group_of(prompt: Any) -> str:
    """A group name for the responses to `prompt` (a string or chat messages): the same for
    equal prompts, so that a trainer's n samples of one prompt form one group."""
    text = json.dumps(prompt, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _body(model: str, batch: _Batch, options: Mapping[str, Any] | None, stream: bool) -> Any:
    return {"model": model, "items": batch.items, "options": {**(options or {}), "stream": stream}}


def _rebase_text(text: str, offset: int) -> str:
    return _ITEMS_PARAM.sub(lambda match: f"items.{int(match.group(1)) + offset}", text)


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date: use the backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _envelope(status: int | None, detail: Mapping[str, Any], offset: int) -> RewardServiceError:
    param = detail.get("param")
    return RewardServiceError(
        status,
        str(detail.get("type") or "http_error"),
        _rebase_text(str(detail.get("message") or ""), offset),
        _rebase_text(str(param), offset) if param is not None else None,
    )


def _response_error(response: httpx.Response, offset: int = 0) -> RewardServiceError:
    """The error of a non-2xx answer; its body must have been read."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": response.text[:500] or response.reason_phrase}
    error = _envelope(response.status_code, detail, offset)
    error.retry_after_s = _retry_after(response.headers)
    return error


def _transport_error(exc: httpx.HTTPError) -> RewardServiceError:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    error = RewardServiceError(None, kind, f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _protocol_error(message: str) -> RewardServiceError:
    return RewardServiceError(200, "protocol_error", message)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise _protocol_error(f"answer is not JSON: {response.text[:200]!r}") from None


def _rebased(raw: Any, batch: _Batch) -> ScoreResult:
    try:
        result = ScoreResult.model_validate(raw)
    except ValidationError as exc:
        raise _protocol_error(f"malformed result: {exc}") from None
    if not 0 <= result.index < len(batch.items):
        raise _protocol_error(f"result index {result.index} outside a batch of {len(batch.items)}")
    result.index += batch.offset
    return result


def _batch_results(payload: Any, batch: _Batch) -> list[ScoreResult]:
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        raise _protocol_error("answer has no `results` list")
    return [_rebased(raw, batch) for raw in results]


def _in_order(parts: list[list[ScoreResult]], count: int) -> list[ScoreResult]:
    slots: list[ScoreResult | None] = [None] * count
    for result in (result for part in parts for result in part):
        slots[result.index] = result
    missing = [index for index, result in enumerate(slots) if result is None]
    if missing:
        raise _protocol_error(f"no result for items {missing[:10]}")
    return [result for result in slots if result is not None]


def _models(payload: Any) -> list[dict[str, Any]]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise _protocol_error("answer has no `data` list")
    return [dict(entry) for entry in data]


class _StreamBatch:
    """One batch's NDJSON answer: re-based results, duplicates dropped, completeness checked."""

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        self.seen: set[int] = set()

    def parse(self, line: str) -> ScoreResult | None:
        if not line.strip():
            return None
        try:
            raw = json.loads(line)
        except ValueError:
            raise _protocol_error(f"stream line is not JSON: {line[:200]!r}") from None
        if isinstance(raw, dict) and "index" not in raw and isinstance(raw.get("error"), dict):
            raise _envelope(200, raw["error"], self.batch.offset)
        result = _rebased(raw, self.batch)
        if result.index in self.seen:
            return None
        self.seen.add(result.index)
        return result

    def check_complete(self) -> None:
        if len(self.seen) < len(self.batch.items):
            raise RewardServiceError(
                None,
                "incomplete_stream",
                f"the stream ended after {len(self.seen)} of {len(self.batch.items)} results",
            )

    def interrupted(self, error: RewardServiceError) -> RewardServiceError:
        """`error` happened after results were yielded: the batch cannot be retried."""
        first, count = self.batch.offset, len(self.batch.items)
        exc = RewardServiceError(
            error.status,
            "stream_interrupted",
            f"the stream of items {first}..{first + count - 1} failed after {len(self.seen)} "
            f"of {count} results: {error.type}: {error.message}",
            error.param,
        )
        exc.__cause__ = error
        return exc


# What stream workers hand the consumer: a result, a batch's end (None) or its failure.
_Event = ScoreResult | Exception | None


def _queue_size(settings: _Settings) -> int:
    return settings.max_concurrency * settings.batch_size


class RewardClient:
    """Synchronous client. Batches run on a thread pool of `max_concurrency` threads per call
    (sequentially when there is one batch), all sharing one connection pool. Thread-safe.

    `sleep` is the backoff's sleep function (tests inject a recorder)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 600,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30,
        max_concurrency: int = 8,
        batch_size: int = 64,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = _settings(
            base_url,
            api_key,
            timeout_s=timeout_s,
            max_concurrency=max_concurrency,
            batch_size=batch_size,
        )
        self.retry = _policy(max_retries, backoff_s, max_backoff_s)
        self._sleep = sleep
        self._http = httpx.Client(**self.settings.http_kwargs())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: every model with its kind and status."""
        return _models(_json(self._send("GET", "/v1/models")))

    def score(
        self, model: str, items: Sequence[Item], *, options: Mapping[str, Any] | None = None
    ) -> list[ScoreResult]:
        """Score `items` with `model`; the results in item order. Item failures are results
        with an `error`; a request that fails for good raises RewardServiceError."""
        batches = _batches(items, self.settings.batch_size)
        parts = self._map(lambda batch: self._score_batch(model, batch, options), batches)
        return _in_order(parts, len(items))

    def stream(
        self, model: str, items: Sequence[Item], *, options: Mapping[str, Any] | None = None
    ) -> Iterator[ScoreResult]:
        """Results as they finish (NDJSON per batch); `index` says which item."""
        batches = _batches(items, self.settings.batch_size)
        if not batches:
            return
        events: queue.Queue[_Event] = queue.Queue(maxsize=_queue_size(self.settings))
        stop = threading.Event()
        pool = ThreadPoolExecutor(min(self.settings.max_concurrency, len(batches)))
        for batch in batches:
            pool.submit(self._stream_worker, model, batch, options, events, stop)
        try:
            yield from _consume(events, len(batches))
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _map(self, work: Callable[[_Batch], T], batches: list[_Batch]) -> list[T]:
        if len(batches) <= 1 or self.settings.max_concurrency == 1:
            return [work(batch) for batch in batches]
        with ThreadPoolExecutor(min(self.settings.max_concurrency, len(batches))) as pool:
            futures = [pool.submit(work, batch) for batch in batches]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _send(self, method: str, path: str, body: Any = None, offset: int = 0) -> httpx.Response:
        """One request with retries; the 2xx answer."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=body)
                if response.is_success:
                    return response
                error = _response_error(response, offset)
            except _TRANSIENT as exc:
                error = _transport_error(exc)
            self._sleep(self.retry.next_delay(error, attempt))
            attempt += 1

    def _score_batch(
        self, model: str, batch: _Batch, options: Mapping[str, Any] | None
    ) -> list[ScoreResult]:
        body = _body(model, batch, options, stream=False)
        return _batch_results(_json(self._send("POST", "/v1/score", body, batch.offset)), batch)

    def _stream_worker(
        self,
        model: str,
        batch: _Batch,
        options: Mapping[str, Any] | None,
        events: queue.Queue[_Event],
        stop: threading.Event,
    ) -> None:
        try:
            self._stream_batch(model, batch, options, lambda result: _put(events, result, stop))
        except Exception as exc:  # handed to the consumer, which raises it
            _put(events, exc, stop)
        else:
            _put(events, None, stop)

    def _stream_batch(
        self,
        model: str,
        batch: _Batch,
        options: Mapping[str, Any] | None,
        emit: Callable[[ScoreResult], bool],
    ) -> None:
        """Emit the batch's results; retry the whole batch only while none was emitted."""
        body, attempt = _body(model, batch, options, stream=True), 0
        while True:
            answer = _StreamBatch(batch)
            try:
                self._read_stream(body, answer, emit)
                return
            except _TRANSIENT as exc:
                error = _transport_error(exc)
            except RewardServiceError as exc:
                error = exc
            if answer.seen:
                raise answer.interrupted(error)
            self._sleep(self.retry.next_delay(error, attempt))
            attempt += 1

    def _read_stream(
        self, body: Any, answer: _StreamBatch, emit: Callable[[ScoreResult], bool]
    ) -> None:
        with self._http.stream("POST", "/v1/score", json=body) as response:
            if not response.is_success:
                response.read()
                raise _response_error(response, answer.batch.offset)
            for line in response.iter_lines():
                result = answer.parse(line)
                if result is not None and not emit(result):
                    return  # the consumer went away
        answer.check_complete()


def _put(events: queue.Queue[_Event], event: _Event, stop: threading.Event) -> bool:
    """Hand `event` to the consumer; False once it stopped listening."""
    while not stop.is_set():
        try:
            events.put(event, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _consume(events: queue.Queue[_Event], batches: int) -> Iterator[ScoreResult]:
    while batches:
        event = events.get()
        if event is None:
            batches -= 1
        elif isinstance(event, Exception):
            raise event
        else:
            yield event


class AsyncRewardClient:
    """Asynchronous client with the same API; batches of one call share a semaphore of
    `max_concurrency`. `sleep` is the backoff's sleep coroutine (tests inject a recorder)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 600,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30,
        max_concurrency: int = 8,
        batch_size: int = 64,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = _settings(
            base_url,
            api_key,
            timeout_s=timeout_s,
            max_concurrency=max_concurrency,
            batch_size=batch_size,
        )
        self.retry = _policy(max_retries, backoff_s, max_backoff_s)
        self._sleep = sleep
        self._http = httpx.AsyncClient(**self.settings.http_kwargs())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: every model with its kind and status."""
        return _models(_json(await self._send("GET", "/v1/models")))

    async def score(
        self, model: str, items: Sequence[Item], *, options: Mapping[str, Any] | None = None
    ) -> list[ScoreResult]:
        """Score `items` with `model`; the results in item order. Item failures are results
        with an `error`; a request that fails for good raises RewardServiceError."""
        batches = _batches(items, self.settings.batch_size)
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)

        async def one(batch: _Batch) -> list[ScoreResult]:
            async with semaphore:
                return await self._score_batch(model, batch, options)

        parts = await _gather([asyncio.create_task(one(batch)) for batch in batches])
        return _in_order(parts, len(items))

    async def stream(
        self, model: str, items: Sequence[Item], *, options: Mapping[str, Any] | None = None
    ) -> AsyncIterator[ScoreResult]:
        """Results as they finish (NDJSON per batch); `index` says which item."""
        batches = _batches(items, self.settings.batch_size)
        events: asyncio.Queue[_Event] = asyncio.Queue(maxsize=_queue_size(self.settings))
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        tasks = [
            asyncio.create_task(self._stream_worker(model, batch, options, events, semaphore))
            for batch in batches
        ]
        try:
            for _ in batches:
                while (event := await events.get()) is not None:
                    if isinstance(event, Exception):
                        raise event
                    yield event
        finally:
            await _cancel(tasks)

    async def post(self, path: str, body: Any) -> httpx.Response:
        """POST `body` (JSON) to another route of the service (e.g. /get_reward) with this
        client's key, timeouts and retries; the 2xx answer, else RewardServiceError."""
        return await self._send("POST", path, body)

    async def _send(
        self, method: str, path: str, body: Any = None, offset: int = 0
    ) -> httpx.Response:
        """One request with retries; the 2xx answer."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=body)
                if response.is_success:
                    return response
                error = _response_error(response, offset)
            except _TRANSIENT as exc:
                error = _transport_error(exc)
            await self._sleep(self.retry.next_delay(error, attempt))
            attempt += 1

    async def _score_batch(
        self, model: str, batch: _Batch, options: Mapping[str, Any] | None
    ) -> list[ScoreResult]:
        body = _body(model, batch, options, stream=False)
        response = await self._send("POST", "/v1/score", body, batch.offset)
        return _batch_results(_json(response), batch)

    async def _stream_worker(
        self,
        model: str,
        batch: _Batch,
        options: Mapping[str, Any] | None,
        events: asyncio.Queue[_Event],
        semaphore: asyncio.Semaphore,
    ) -> None:
        try:
            async with semaphore:
                await self._stream_batch(model, batch, options, events)
        except Exception as exc:  # handed to the consumer, which raises it
            await events.put(exc)
        else:
            await events.put(None)

    async def _stream_batch(
        self,
        model: str,
        batch: _Batch,
        options: Mapping[str, Any] | None,
        events: asyncio.Queue[_Event],
    ) -> None:
        """Emit the batch's results; retry the whole batch only while none was emitted."""
        body, attempt = _body(model, batch, options, stream=True), 0
        while True:
            answer = _StreamBatch(batch)
            try:
                await self._read_stream(body, answer, events)
                return
            except _TRANSIENT as exc:
                error = _transport_error(exc)
            except RewardServiceError as exc:
                error = exc
            if answer.seen:
                raise answer.interrupted(error)
            await self._sleep(self.retry.next_delay(error, attempt))
            attempt += 1

    async def _read_stream(
        self, body: Any, answer: _StreamBatch, events: asyncio.Queue[_Event]
    ) -> None:
        async with self._http.stream("POST", "/v1/score", json=body) as response:
            if not response.is_success:
                await response.aread()
                raise _response_error(response, answer.batch.offset)
            async for line in response.aiter_lines():
                result = answer.parse(line)
                if result is not None:
                    await events.put(result)
        answer.check_complete()


async def _gather(tasks: list[asyncio.Task[T]]) -> list[T]:
    """All results, or the first failure with the other tasks cancelled."""
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        await _cancel(tasks)
        raise


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

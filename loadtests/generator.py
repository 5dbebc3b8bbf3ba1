"""Send planned POST /v1/score requests, open- or closed-loop, and record what each one got.

Open loop (`open_loop`): each request is sent at its planned arrival time whatever the server is
doing, so the queueing the server causes shows in the latencies (a closed loop slows down with
the server and hides it). Latency counts from the planned arrival, so any lag of the client
itself is counted too, never hidden. Closed loop (`closed_loop`): `concurrency` requests in flight,
the next sent when one ends (the benchmarks' saturation throughput).

Both are bounded: a run sends nothing after its window (open loop: the arrival times; closed
loop: `window_s`) and ends at `max_duration_s` after its start; requests still in flight then
are cancelled and recorded with the status `cancelled`, requests not sent by then are counted as
unsent. Each request asks the server to give up on its items after `timeout_s`
(`options.timeout_s`: those items come back with the item error `timeout`); the client itself
waits TIMEOUT_MARGIN_S longer before it records the status `timeout`. Nothing is raised for a
failed request or item: every outcome is recorded. Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtests.loopback import require_loopback

# Statuses of requests that got no HTTP response (otherwise the status is the HTTP code).
TIMEOUT = "timeout"  # no response within timeout_s + TIMEOUT_MARGIN_S
CONNECT_ERROR = "connect_error"  # the connection was refused or could not be made
TRANSPORT_ERROR = "transport_error"  # the connection broke during the exchange
CANCELLED = "cancelled"  # still in flight when the run reached its max_duration_s
Status = int | str

# Item error types the client assigns to items of a 200 response without a proper result.
MISSING = "missing_from_response"
NO_SCORE = "no_score"
BAD_RESPONSE = "bad_response"

TIMEOUT_MARGIN_S = 5.0
DEFAULT_MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class Request:
    """A planned request: `at_s` is its arrival time from the start of the run (open loop)."""

    at_s: float
    model: str
    items: list[dict[str, Any]] = field(repr=False)
    stream: bool = False


@dataclass(frozen=True)
class Record:
    """What one request got. Times are seconds from the start of the run."""

    model: str
    items: int
    stream: bool
    scheduled_s: float  # when it was due (closed loop: when a slot freed)
    sent_s: float  # when the client began sending it
    latency_s: float  # from scheduled_s to the last byte of the response (or the failure)
    status: Status
    scored: int = 0  # items with a score and no error
    item_errors: dict[str, int] = field(default_factory=dict)  # by error type
    first_result_s: float | None = None  # streaming: from scheduled_s to the first result line
    completion_tokens: int = 0  # generative judges: the items' usage.completion_tokens
    # The first error: why the request failed (the error envelope, or the exception), else the
    # first item error's `type: message`.
    error: str | None = None
    # Every item's score in request order, None where it got none (kept out of reports).
    scores: list[float | None] = field(default_factory=list, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def ended_s(self) -> float:
        return self.scheduled_s + self.latency_s


@dataclass(frozen=True)
class Run:
    records: list[Record]  # in the order the requests were sent
    planned: int
    max_duration_s: float
    seconds: float  # from the start of the run to the end of its last request

    @property
    def unsent(self) -> int:
        return self.planned - len(self.records)


async def open_loop(
    base_url: str,
    plan: Sequence[Request],
    *,
    timeout_s: float,
    max_duration_s: float,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Run:
    """Send each request of `plan` at its `at_s`, not waiting for earlier ones to end."""
    async with _Runner(base_url, timeout_s, max_duration_s, max_connections) as runner:
        for request in sorted(plan, key=lambda r: r.at_s):
            if request.at_s >= max_duration_s:
                break
            await runner.sleep_until(request.at_s)
            runner.spawn(request, request.at_s)
        return await runner.finish(len(plan))


async def closed_loop(
    base_url: str,
    plan: Sequence[Request],
    *,
    concurrency: int,
    timeout_s: float,
    max_duration_s: float,
    window_s: float | None = None,
) -> Run:
    """Send the requests of `plan` in order (ignoring `at_s`), `concurrency` at a time, none
    after `window_s` (default: until max_duration_s)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    window_s = max_duration_s if window_s is None else min(window_s, max_duration_s)
    slots = asyncio.Semaphore(concurrency)
    async with _Runner(base_url, timeout_s, max_duration_s, concurrency) as runner:
        for request in plan:
            if not await runner.acquire(slots):
                break
            if runner.now() >= window_s:
                slots.release()
                break
            runner.spawn(request, runner.now(), on_done=slots.release)
        return await runner.finish(len(plan))


class _Runner:
    """One run's client, clock and in-flight requests."""

    def __init__(
        self, base_url: str, timeout_s: float, max_duration_s: float, max_connections: int
    ) -> None:
        require_loopback(base_url)
        if timeout_s <= 0 or max_duration_s <= 0:
            raise ValueError("timeout_s and max_duration_s must be > 0")
        self._url = base_url.rstrip("/") + "/v1/score"
        self._timeout_s = timeout_s
        self._max_duration_s = max_duration_s
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = httpx.AsyncClient(
            limits=limits, timeout=httpx.Timeout(timeout_s + TIMEOUT_MARGIN_S)
        )
        self._loop = asyncio.get_running_loop()
        self._began = self._loop.time()
        self._in_flight: dict[asyncio.Task[Record], tuple[Request, float, float]] = {}

    async def __aenter__(self) -> _Runner:
        self._began = self._loop.time()
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        await self._http.aclose()

    def now(self) -> float:
        return self._loop.time() - self._began

    async def sleep_until(self, at_s: float) -> None:
        delay = at_s - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def acquire(self, slots: asyncio.Semaphore) -> bool:
        """Take a slot; False if the run's max duration passes first."""
        try:
            async with asyncio.timeout_at(self._began + self._max_duration_s):
                await slots.acquire()
        except TimeoutError:
            return False
        return True

    def spawn(
        self, request: Request, scheduled_s: float, on_done: Callable[[], None] | None = None
    ) -> None:
        sent_s = self.now()
        task = asyncio.create_task(self._attempt(request, scheduled_s, sent_s))
        if on_done is not None:
            task.add_done_callback(lambda _: on_done())
        self._in_flight[task] = (request, scheduled_s, sent_s)

    async def finish(self, planned: int) -> Run:
        """Wait for the requests in flight until the max duration; cancel the rest."""
        tasks = list(self._in_flight)
        remaining = self._max_duration_s - self.now()
        if tasks and remaining > 0:
            await asyncio.wait(tasks, timeout=remaining)
        cancelled_at = self.now()
        for task in tasks:
            task.cancel()  # a no-op for those done
        await asyncio.gather(*tasks, return_exceptions=True)
        records = []
        for task in tasks:
            request, scheduled_s, sent_s = self._in_flight.pop(task)
            if task.cancelled():
                records.append(
                    _failed(request, scheduled_s, sent_s, cancelled_at, CANCELLED, "cancelled")
                )
            else:
                records.append(task.result())
        seconds = max((r.ended_s for r in records), default=0.0)
        return Run(records, planned, self._max_duration_s, seconds)

    async def _attempt(self, request: Request, scheduled_s: float, sent_s: float) -> Record:
        try:
            async with asyncio.timeout(self._timeout_s + TIMEOUT_MARGIN_S):
                return await self._exchange(request, scheduled_s, sent_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            status, error = TIMEOUT, f"{type(exc).__name__}: {exc}".rstrip(": ")
        except httpx.ConnectError as exc:
            status, error = CONNECT_ERROR, f"ConnectError: {exc}"
        except httpx.TransportError as exc:
            status, error = TRANSPORT_ERROR, f"{type(exc).__name__}: {exc}"
        return _failed(request, scheduled_s, sent_s, self.now(), status, error)

    async def _exchange(self, request: Request, scheduled_s: float, sent_s: float) -> Record:
        body = {
            "model": request.model,
            "items": request.items,
            "options": {"stream": request.stream, "timeout_s": self._timeout_s},
        }
        first_s: float | None = None
        async with self._http.stream("POST", self._url, json=body) as response:
            if response.status_code != 200:
                error = _error_message(await response.aread())
                return _failed(
                    request, scheduled_s, sent_s, self.now(), response.status_code, error
                )
            if not request.stream:
                results = _results(await response.aread())
            else:
                results = []
                async for line in response.aiter_lines():
                    if line.strip():
                        first_s = self.now() - scheduled_s if first_s is None else first_s
                        results.append(_json(line.encode()))
        tally = _tally(results, len(request.items))
        return Record(
            model=request.model,
            items=len(request.items),
            stream=request.stream,
            scheduled_s=scheduled_s,
            sent_s=sent_s,
            latency_s=self.now() - scheduled_s,
            status=200,
            scored=tally.scored,
            item_errors=dict(tally.errors),
            first_result_s=first_s,
            completion_tokens=tally.completion_tokens,
            error=tally.first_error,
            scores=tally.scores,
        )


def _failed(
    request: Request, scheduled_s: float, sent_s: float, now: float, status: Status, error: str
) -> Record:
    """The record of a request that got no results: a non-200 answer, or none at all."""
    return Record(
        model=request.model,
        items=len(request.items),
        stream=request.stream,
        scheduled_s=scheduled_s,
        sent_s=sent_s,
        latency_s=now - scheduled_s,
        status=status,
        error=error,
        scores=[None] * len(request.items),
    )


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _results(content: bytes) -> list[Any] | None:
    body = _json(content)
    results = body.get("results") if isinstance(body, dict) else None
    return results if isinstance(results, list) else None


def _error_message(content: bytes) -> str:
    """`type: message` of the error envelope, or the start of the body."""
    body = _json(content)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('type')}: {error.get('message')}"
    return content[:200].decode(errors="replace")


@dataclass
class _Tally:
    scores: list[float | None]
    errors: Counter[str] = field(default_factory=Counter)
    completion_tokens: int = 0
    first_error: str | None = None

    @property
    def scored(self) -> int:
        return sum(score is not None for score in self.scores)


def _tally(results: list[Any] | None, size: int) -> _Tally:
    """Scores and item errors by type of one 200 response's results (index = item position)."""
    tally = _Tally([None] * size)
    if results is None:
        tally.errors[BAD_RESPONSE] = size
        tally.first_error = "the response has no 'results' list"
        return tally
    seen: set[int] = set()
    for result in results:
        index = result.get("index") if isinstance(result, dict) else None
        if not isinstance(index, int) or not 0 <= index < size or index in seen:
            continue
        seen.add(index)
        error, score = result.get("error"), result.get("score")
        usage = result.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tally.completion_tokens += usage["completion_tokens"]
        if isinstance(error, dict):
            tally.errors[str(error.get("type"))] += 1
            if tally.first_error is None:
                tally.first_error = f"{error.get('type')}: {error.get('message')}"
        elif isinstance(score, int | float) and not isinstance(score, bool):
            tally.scores[index] = float(score)
        else:
            tally.errors[NO_SCORE] += 1
    if len(seen) < size:
        tally.errors[MISSING] += size - len(seen)
    return tally

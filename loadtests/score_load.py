"""Load generator for a running rmserve: many concurrent clients POSTing /v1/score.

    python loadtests/score_load.py --url http://127.0.0.1:8000 --model tiny-rm \
        --items examples/trajectories.jsonl --concurrency 32 --batch-size 8

`items` are split into requests of `batch_size` items; `concurrency` requests are kept in flight
over one shared `httpx.AsyncClient`. Each item is sent exactly once, in order of its batch, and
only to the given base URL, which must be a loopback address (this is a local load test, not a
tool for loading someone else's server). A failed request (non-200, timeout, connection error)
or an item without a score or with an error is counted, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


@dataclass(frozen=True)
class LoadResult:
    items: int  # items sent
    errors: int  # items without a score: item errors and the items of failed requests
    seconds: float  # wall time from the first request sent to the last response received
    items_per_s: float  # scored items (items - errors) per second of wall time
    requests: int
    failed_requests: int  # non-200 responses, timeouts, connection errors
    latency_p50_s: float  # per request, send to response (failed requests included)
    latency_p95_s: float
    latency_p99_s: float
    # The score of each input item, in input order; None where it got none.
    scores: list[float | None] = field(repr=False)
    # Up to a few distinct error descriptions, to say what went wrong.
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"items        {self.items} ({self.errors} errors) in {self.requests} requests "
            f"({self.failed_requests} failed)",
            f"wall time    {self.seconds:.2f} s",
            f"throughput   {self.items_per_s:.1f} items/s",
            f"latency      p50 {self.latency_p50_s:.3f} s   p95 {self.latency_p95_s:.3f} s   "
            f"p99 {self.latency_p99_s:.3f} s   (per request)",
        ]
        lines += [f"error        {sample}" for sample in self.error_samples]
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def require_loopback(base_url: str) -> None:
    """Raise ValueError unless `base_url` is an http(s) URL on a loopback address."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"{base_url!r} is not an http(s) URL")
    if host.lower() in _LOOPBACK_NAMES:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{base_url!r} is not a loopback address; this load test is local only")


class _Tally:
    def __init__(self, items: int) -> None:
        self.scores: list[float | None] = [None] * items
        self.errors = 0
        self.failed_requests = 0
        self.latencies: list[float] = []
        self.samples: list[str] = []

    def note(self, message: str) -> None:
        if len(self.samples) < 5 and message not in self.samples:
            self.samples.append(message)

    def fail_request(self, size: int, message: str) -> None:
        self.failed_requests += 1
        self.errors += size
        self.note(message)

    def take_response(self, start: int, size: int, body: Any) -> None:
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list):
            self.fail_request(size, "response has no 'results' list")
            return
        seen: set[int] = set()
        for result in results:
            index = result.get("index") if isinstance(result, dict) else None
            if not isinstance(index, int) or not 0 <= index < size or index in seen:
                self.note(f"result with a bad or repeated index: {str(result)[:200]}")
                continue
            seen.add(index)
            error, score = result.get("error"), result.get("score")
            if error is not None:
                self.note(f"item error: {error}")
            elif not isinstance(score, int | float) or isinstance(score, bool):
                self.note(f"item without a score: {str(result)[:200]}")
            else:
                self.scores[start + index] = float(score)
        if len(seen) < size:
            self.note(f"{size - len(seen)} item(s) missing from a response")
        self.errors += sum(self.scores[start + i] is None for i in range(size))


async def run_load(
    base_url: str,
    model: str,
    items: list[dict[str, Any]],
    *,
    concurrency: int,
    batch_size: int,
    timeout_s: float,
) -> LoadResult:
    """Score `items` with `model` at `base_url`, `concurrency` requests of `batch_size` items in
    flight at a time; return throughput, latency percentiles and every item's score."""
    require_loopback(base_url)
    if concurrency < 1 or batch_size < 1 or timeout_s <= 0:
        raise ValueError("concurrency and batch_size must be >= 1 and timeout_s > 0")
    url = base_url.rstrip("/") + "/v1/score"
    starts = list(range(0, len(items), batch_size))
    next_batch = iter(starts)  # shared by the clients: each batch is taken exactly once
    tally = _Tally(len(items))

    async def client(http: httpx.AsyncClient) -> None:
        for start in next_batch:
            batch = items[start : start + batch_size]
            sent = time.perf_counter()
            try:
                response = await http.post(url, json={"model": model, "items": batch})
            except httpx.HTTPError as exc:
                tally.latencies.append(time.perf_counter() - sent)
                tally.fail_request(len(batch), f"{type(exc).__name__}: {exc}")
                continue
            tally.latencies.append(time.perf_counter() - sent)
            if response.status_code != 200:
                tally.fail_request(
                    len(batch), f"HTTP {response.status_code}: {response.text[:300]}"
                )
                continue
            try:
                body = response.json()
            except ValueError:
                tally.fail_request(len(batch), "response body is not JSON")
                continue
            tally.take_response(start, len(batch), body)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(min(concurrency, len(starts)))))
        seconds = time.perf_counter() - began

    scored = len(items) - tally.errors
    return LoadResult(
        items=len(items),
        errors=tally.errors,
        seconds=seconds,
        items_per_s=scored / seconds if seconds > 0 else 0.0,
        requests=len(starts),
        failed_requests=tally.failed_requests,
        latency_p50_s=percentile(tally.latencies, 50),
        latency_p95_s=percentile(tally.latencies, 95),
        latency_p99_s=percentile(tally.latencies, 99),
        scores=tally.scores,
        error_samples=tally.samples,
    )


def read_items(path: Path) -> list[dict[str, Any]]:
    """Trajectories from a JSON-lines file, one object per non-empty line."""
    items: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        items.append(item)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="concurrent /v1/score load on a local rmserve")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL")
    parser.add_argument("--model", required=True, help="model name from GET /v1/models")
    parser.add_argument("--items", type=Path, required=True, help="JSON lines of trajectories")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--batch-size", type=int, default=8, help="items per request")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    args = parser.parse_args(argv)
    try:
        items = read_items(args.items)
        require_loopback(args.url)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not items:
        print(f"error: {args.items} holds no items", file=sys.stderr)
        return 2
    result = asyncio.run(
        run_load(
            args.url,
            args.model,
            items,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            timeout_s=args.timeout_s,
        )
    )
    print(f"model        {args.model} at {args.url}")
    print(f"load         concurrency {args.concurrency}, {args.batch_size} items per request")
    print(result.summary())
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())

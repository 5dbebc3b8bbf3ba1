"""Closed-loop throughput of a fixed set of items: the benchmarks' load (`run_load`).

    python -m loadtests.score_load --url http://127.0.0.1:8000 --model tiny-rm \
        --items examples/trajectories.jsonl --concurrency 32 --batch-size 8

`items` are split into requests of `batch_size` items, sent in order by the generator's closed
loop (`concurrency` requests in flight over one client), each item exactly once, only to a
loopback URL. A failed request (non-200, timeout, connection error) or an item without a score is
counted, never raised. For load at an offered rate, with scenarios and a report, see
`python -m loadtests`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.generator import TIMEOUT_MARGIN_S, Request, Run, closed_loop
from loadtests.loopback import require_loopback
from loadtests.stats import percentile
from loadtests.workload import read_items

__all__ = ["LoadResult", "percentile", "read_items", "require_loopback", "run_load"]


@dataclass(frozen=True)
class LoadResult:
    items: int  # items sent
    errors: int  # items without a score: item errors and the items of failed requests
    seconds: float  # wall time from the first request sent to the last response received
    items_per_s: float  # scored items (items - errors) per second of wall time
    requests: int
    failed_requests: int  # non-200 responses, timeouts, connection errors, unsent
    latency_p50_s: float  # per request, send to response (failed requests included)
    latency_p95_s: float
    latency_p99_s: float
    # The score of each input item, in input order; None where it got none.
    scores: list[float | None] = field(repr=False)
    # Up to a few distinct error descriptions, to say what went wrong.
    error_samples: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, run: Run, items: int, batch_size: int) -> LoadResult:
        """`run` sent the requests of `items` split by `batch_size`, in order."""
        scores: list[float | None] = [None] * items
        for n, record in enumerate(run.records):  # a closed loop records in plan order
            scores[n * batch_size : n * batch_size + record.items] = record.scores
        scored = sum(score is not None for score in scores)
        latencies = [record.latency_s for record in run.records]
        samples: list[str] = []
        for record in run.records:
            status = f"HTTP {record.status}" if isinstance(record.status, int) else record.status
            sample = f"{status}: {record.error}" if record.error else None
            if sample is not None and sample not in samples and len(samples) < 5:
                samples.append(sample)
        if run.unsent:
            samples.append(f"{run.unsent} request(s) not sent within the time limit")
        return cls(
            items=items,
            errors=items - scored,
            seconds=run.seconds,
            items_per_s=scored / run.seconds if run.seconds > 0 else 0.0,
            requests=run.planned,
            failed_requests=sum(not record.ok for record in run.records) + run.unsent,
            latency_p50_s=percentile(latencies, 50),
            latency_p95_s=percentile(latencies, 95),
            latency_p99_s=percentile(latencies, 99),
            scores=scores,
            error_samples=samples,
        )

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
    plan = [
        Request(0.0, model, items[start : start + batch_size])
        for start in range(0, len(items), batch_size)
    ]
    # Bounded all the same: every round of requests taking the whole timeout.
    rounds = math.ceil(len(plan) / concurrency)
    run = await closed_loop(
        base_url,
        plan,
        concurrency=concurrency,
        timeout_s=timeout_s,
        max_duration_s=max(1, rounds) * (timeout_s + TIMEOUT_MARGIN_S) + 1,
    )
    return LoadResult.of(run, len(items), batch_size)


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

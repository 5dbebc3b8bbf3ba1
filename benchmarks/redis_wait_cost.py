"""What `RMSERVE_REDIS_WAIT_REPLICAS=1` costs at admission, next to the baseline (0), in one run.

    .venv/bin/python benchmarks/redis_wait_cost.py [--requests 2000] [--jobs 8]
        [--concurrency 16] [--rounds 3] [--json PATH]

A real redis-server primary and one replica of it are started on loopback (same machine). The
gateway-side queue (StreamQueue, shared routing, no capacity limit) admits R requests of K jobs
each (a GRPO group), sent by C concurrent asyncio tasks on one queue; nobody consumes them. With
wait_replicas=1 every admission also runs `WAIT 1 1000` pipelined after the admission script.
Measured per configuration: wall time -> requests/s, and each enqueue's latency -> p50, p99.
After a warm-up of both, the configurations alternate (0, 1, 0, 1, ...) for --rounds rounds each
and each figure is the median over its rounds, so machine noise hits both. The replica is
connected in both configurations: only the WAIT differs. There is no target: it reports the
cost. Exit code 0 when both configurations ran without errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks`, `service`, ... importable
    sys.path.insert(0, str(REPO))

from benchmarks.score_throughput import machine  # noqa: E402
from rmserve.service.jobs import Job  # noqa: E402
from rmserve.service.launcher import RedisServer  # noqa: E402
from rmserve.service.queue.redis_streams import (  # noqa: E402
    StreamQueue,
    StreamSettings,
    jobs_key,
    streams_key,
    workers_key,
)
from rmserve.wire.trajectory import Trajectory  # noqa: E402

ITEM = Trajectory.model_validate({"messages": [{"role": "user", "content": "x"}]})
CONFIGS = (0, 1)
WARMUP_REQUESTS = 200


def request_jobs(model: str, request: str, k: int) -> list[Job]:
    now = time.time()
    return [
        Job(id=f"{request}:{i}", model=model, index=i, item=ITEM, enqueued_at=now,
            deadline=now + 600)
        for i in range(k)
    ]  # fmt: skip


async def run(url: str, wait: int, model: str, requests: int, k: int, c: int) -> dict[str, Any]:
    """Admit `requests` requests of `k` jobs with `c` tasks; figures of the run."""
    settings = StreamSettings(
        capacity=10_000_000, routing="shared", wait_replicas=wait, wait_timeout_s=1.0
    )
    queue = StreamQueue.from_url(url, settings, name=f"bench-{model}")
    batches = [request_jobs(model, f"{model}-r{n}", k) for n in range(requests)]
    latencies: list[float] = []
    errors: list[str] = []

    async def sender() -> None:
        while batches:
            batch = batches.pop()
            start = time.perf_counter()
            try:
                await queue.enqueue(batch)
            except Exception as exc:  # counted and reported, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(c)))
    seconds = time.perf_counter() - start
    await queue.client.delete(jobs_key(model), workers_key(model), streams_key(model))
    await queue.close()  # the backlog is gone: it does not weigh on the next run
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if latencies else [0.0] * 99
    return {
        "wait_replicas": wait,
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def measure(url: str, args: argparse.Namespace) -> dict[int, list[dict[str, Any]]]:
    shape = (args.jobs, args.concurrency)
    for wait in CONFIGS:  # warm-up: connections, scripts, the replication link
        await run(url, wait, f"warmup-{wait}", min(args.requests, WARMUP_REQUESTS), *shape)
    runs: dict[int, list[dict[str, Any]]] = {wait: [] for wait in CONFIGS}
    for n in range(args.rounds):
        for wait in CONFIGS:
            runs[wait].append(await run(url, wait, f"m{wait}-{n}", args.requests, *shape))
    return runs


def replica_ready(port: int) -> bool:
    """Linked to its primary, and done writing its initial AOF after the sync (a redis-server
    asked to stop while writing it refuses to, and measuring would compete with that fork)."""
    info = redis.Redis(port=port).info()
    rewriting = info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]
    return info["master_link_status"] == "up" and not rewriting


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("requests_per_s", "p50_ms", "p99_ms")
    summary = {key: statistics.median(r[key] for r in runs) for key in keys}
    return {**summary, "errors": sum(r["errors"] for r in runs), "rounds": runs}


def report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(f"machine: {figures['cores']} cores, {figures['cpu']}")
    console.print(
        f"conditions: {figures['conditions']}; {args.requests} requests x {args.jobs} jobs, "
        f"{args.concurrency} concurrent tasks, median of {args.rounds} interleaved rounds each"
    )
    table = Table(title="admission cost of RMSERVE_REDIS_WAIT_REPLICAS")
    for column in ("wait_replicas", "requests/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(column, justify="right")
    for wait, c in figures["configs"].items():
        table.add_row(
            wait,
            f"{c['requests_per_s']:.0f}",
            f"{c['p50_ms']:.2f}",
            f"{c['p99_ms']:.2f}",
            str(c["errors"]),
        )
    console.print(table)
    for name, value in figures["ratios"].items():
        console.print(f"{name}: {value:.3f}")
    for wait, c in figures["configs"].items():
        for r in c["rounds"]:
            if r["first_error"]:
                console.print(f"wait_replicas={wait}: {r['errors']} errors, {r['first_error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=8, help="jobs per request (a GRPO group)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="redis-wait-") as tmp:
        primary_dir, replica_dir = Path(tmp) / "primary", Path(tmp) / "replica"
        primary_dir.mkdir()
        replica_dir.mkdir()
        with (
            RedisServer(primary_dir) as primary,
            RedisServer(replica_dir, replica_of=primary.port) as replica,
        ):
            deadline = time.monotonic() + 60
            while not replica_ready(replica.port):
                if time.monotonic() > deadline:
                    print("the replica did not get in sync with its primary", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            runs = asyncio.run(measure(primary.url, args))
    configs = {str(wait): summarize(r) for wait, r in runs.items()}
    off, on = configs["0"], configs["1"]
    nan = float("nan")
    cores, cpu = machine()
    figures: dict[str, Any] = {
        "cores": cores,
        "cpu": cpu,
        "conditions": "one redis-server primary + one replica on loopback, same machine",
        "requests": args.requests,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "configs": configs,
        "ratios": {
            "WAIT 1 / off requests/s": on["requests_per_s"] / (off["requests_per_s"] or nan),
            "p50 latency (WAIT 1 / off)": on["p50_ms"] / (off["p50_ms"] or nan),
        },
    }
    report(args, figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if off["errors"] == 0 and on["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

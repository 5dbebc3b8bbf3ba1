"""Distributed mode (gateway + Redis + worker) against `rmserve serve` and vLLM called directly.

    python benchmarks/distributed_throughput.py [--items 300] [--concurrency 32] [--batch-size 8]
        [--hidden-size 512] [--layers 4] [--seed 0] [--enforce-eager]
        [--max-num-batched-tokens N] [--latency-requests 200]

The same tiny random Llama reward model and the same mixed-length chat trajectories as
benchmarks/score_throughput.py (whose functions this script reuses) are scored three times,
one after the other, so that only one engine runs at a time:

  (a) vLLM direct: `vllm.LLM.classify` over all rendered items in a child process (exactly
      score_throughput.py's baseline).
  (b) embedded: `rmserve serve`, loaded by many concurrent clients (loadtests/score_load.py)
      after a warm-up.
  (c) Redis: a real redis-server, one `rmserve gateway` and one `rmserve worker --model tiny-rm`,
      the gateway loaded exactly like (b) once the worker's model is loaded and the gateway
      lists the model as ready.

Right after its throughput load, each of (b) and (c) also gets N sequential single-item
POST /v1/score requests (concurrency 1, one keep-alive httpx client, short distinct chats of
about 50 tokens): the end-to-end latency of a request at low load, p50 and p99, also split into
the item's compute_s (reported by the service: render, tokenize, engine) and the rest (HTTP,
gateway, queue, result delivery), since the engines of (b) and (c) are separate starts whose
compute time can differ by a few ms.

It prints items/s of the three and their ratios, with the target (c)/(a) >= 0.85; the p50 and
p99 latency of (b) and (c) and what Redis adds, with the target <= 2 ms added at p50; the largest
score difference between the paths on the same items (they must score the same inputs); and
the CPU seconds each process group used during the throughput loads. Both services get the same
settings (the RMSERVE_* environment, defaults otherwise). A target that is not met is reported,
not an error: the exit code is 0 when the benchmark ran, 1 when a server failed to start, a
request or item failed, or the scores of two paths differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks`, `service`, ... importable
    sys.path.insert(0, str(REPO))

from benchmarks.score_throughput import (  # noqa: E402
    MODEL,
    READY_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    SCORE_TOLERANCE,
    WARMUP_ITEMS,
    Baseline,
    _cpu_seconds,
    machine,
    make_trajectories,
    parameter_count,
    render,
    run_baseline,
    wait_listed_ready,
    write_registry,
)
from loadtests.score_load import LoadResult, percentile, run_load  # noqa: E402
from rmserve.models.spec import EngineOptions  # noqa: E402
from rmserve.service.config import Settings  # noqa: E402
from rmserve.service.launcher import RedisServer, ServerFailed, ServerProcess  # noqa: E402

THROUGHPUT_TARGET = 0.85  # (c)/(a)
ADDED_P50_TARGET_MS = 2.0  # (c) p50 - (b) p50, single-item requests
LATENCY_WARMUP_REQUESTS = 10  # untimed single-item requests before the timed ones

CpuGroups = Callable[[], dict[str, list[psutil.Process]]]


# --------------------------------------------------------------------------------------------
# Single-item latency
# --------------------------------------------------------------------------------------------


def short_chats(count: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """`count` distinct short trajectories (system, question, one-line answer)."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
        ]
        items.append({"id": f"{prefix}-{index}", "messages": messages})
    return items


@dataclass(frozen=True)
class Latency:
    seconds: list[float]  # per request, send to response body received
    scores: list[float | None]
    # Of each scored request: the item's server-side timing (enqueue -> scoring began, scoring
    # began -> done) and the rest of its end-to-end time (HTTP, gateway, result delivery).
    queue_s: list[float]
    compute_s: list[float]
    other_s: list[float]
    errors: int
    error_samples: list[str]

    def ms(self, q: float) -> float:
        return 1000 * percentile(self.seconds, q)

    def compute_ms(self, q: float) -> float:
        return 1000 * percentile(self.compute_s, q)

    def outside_ms(self, q: float) -> float:
        """Percentile of end-to-end time minus the item's compute_s (the part of a request
        spent outside the model: HTTP, gateway, queue, result delivery)."""
        outside = [queue + other for queue, other in zip(self.queue_s, self.other_s, strict=True)]
        return 1000 * percentile(outside, q)


def measure_latency(base_url: str, items: list[dict[str, Any]], warmup: int) -> Latency:
    """POST each item alone, one request at a time, over one keep-alive connection; the first
    `warmup` requests are not timed."""
    url = base_url.rstrip("/") + "/v1/score"
    seconds: list[float] = []
    scores: list[float | None] = []
    queue_s: list[float] = []
    compute_s: list[float] = []
    other_s: list[float] = []
    samples: list[str] = []
    errors = 0

    def note(message: str) -> None:
        nonlocal errors
        errors += 1
        if len(samples) < 5 and message not in samples:
            samples.append(message)

    with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:
        for number, item in enumerate(items):
            timed = number >= warmup
            score, timing = _post_one(client, url, item, note)
            if timed:
                seconds.append(timing[0])
                scores.append(score)
                if score is not None:
                    queue_s.append(timing[1])
                    compute_s.append(timing[2])
                    other_s.append(timing[0] - timing[1] - timing[2])
    return Latency(seconds, scores, queue_s, compute_s, other_s, errors, samples)


def _post_one(
    client: httpx.Client, url: str, item: dict[str, Any], note: Callable[[str], None]
) -> tuple[float | None, tuple[float, float, float]]:
    """One single-item request: its score (None on an error, which goes to `note`) and
    (end-to-end seconds, the server's queue_s, compute_s)."""
    started = time.perf_counter()
    try:
        response = client.post(url, json={"model": MODEL, "items": [item]})
    except httpx.HTTPError as exc:
        note(f"{type(exc).__name__}: {exc}")
        return None, (time.perf_counter() - started, 0.0, 0.0)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        note(f"HTTP {response.status_code}: {response.text[:300]}")
        return None, (elapsed, 0.0, 0.0)
    try:
        result = response.json()["results"][0]
        score, timing = result["score"], result["timing"]
    except (ValueError, LookupError, TypeError):
        note(f"unexpected response: {response.text[:300]}")
        return None, (elapsed, 0.0, 0.0)
    if result.get("error") is not None or not isinstance(score, int | float):
        note(f"item without a score: {str(result)[:300]}")
        return None, (elapsed, 0.0, 0.0)
    return float(score), (elapsed, float(timing["queue_s"]), float(timing["compute_s"]))


# --------------------------------------------------------------------------------------------
# (b) and (c): a service started, warmed up, loaded, measured, stopped
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    ready_s: float  # start of the processes -> the model is ready to serve
    ready_detail: str
    warmup: LoadResult
    load: LoadResult
    cpu_s: dict[str, float]  # CPU seconds during the throughput load, by process group
    latency: Latency


@dataclass(frozen=True)
class Workload:
    items: list[dict[str, Any]]
    warmup: list[dict[str, Any]]
    latency_items: list[dict[str, Any]]  # LATENCY_WARMUP_REQUESTS untimed, then the timed ones
    concurrency: int
    batch_size: int


async def _throughput(
    base_url: str, work: Workload, groups: CpuGroups
) -> tuple[LoadResult, LoadResult, dict[str, float]]:
    """Warm up like score_throughput.py, then load with `work.items`; CPU seconds by group."""
    warm = await run_load(
        base_url, MODEL, work.warmup, concurrency=4, batch_size=2, timeout_s=REQUEST_TIMEOUT_S
    )
    if warm.errors:
        raise ServerFailed(f"warm-up failed: {warm.error_samples}")
    processes = groups()  # after the warm-up: every engine process exists by now
    before = _cpu_seconds(processes)
    load = await run_load(
        base_url,
        MODEL,
        work.items,
        concurrency=work.concurrency,
        batch_size=work.batch_size,
        timeout_s=REQUEST_TIMEOUT_S,
    )
    after = _cpu_seconds(processes)
    return warm, load, {label: after[label] - before[label] for label in processes}


def _measure(
    base_url: str, work: Workload, groups: CpuGroups, ready_s: float, ready_detail: str
) -> Phase:
    warm, load, cpu_s = asyncio.run(_throughput(base_url, work, groups))
    latency = measure_latency(base_url, work.latency_items, LATENCY_WARMUP_REQUESTS)
    return Phase(ready_s, ready_detail, warm, load, cpu_s, latency)


def _tree(pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    process = psutil.Process(pid)
    return process, process.children(recursive=True)


def run_embedded(work_dir: Path, registry: Path, work: Workload) -> Phase:
    """(b) `rmserve serve`: started, measured, stopped (SIGTERM) before this returns."""
    started = time.perf_counter()
    server = ServerProcess(registry, work_dir / "serve.log", command="serve")
    try:
        models = {m["name"]: m for m in server.wait_settled(READY_TIMEOUT_S)}
        ready_s = time.perf_counter() - started
        if models[MODEL]["status"] != "ready":
            raise ServerFailed(
                f"model {MODEL} is unavailable: {models[MODEL]['reason']}\n{server.log_tail()}"
            )

        def groups() -> dict[str, list[psutil.Process]]:
            main, children = _tree(server.process.pid)
            return {
                "client (this process)": [psutil.Process()],
                "serve main (gateway + AsyncLLM)": [main],
                "serve children (engine core)": children,
            }

        return _measure(server.base_url, work, groups, ready_s, "GET /v1/models: ready")
    finally:
        server.stop()


def run_distributed(work_dir: Path, registry: Path, work: Workload) -> tuple[Phase, str]:
    """(c) redis-server + `rmserve gateway` + `rmserve worker`: started, measured, stopped
    (worker, gateway, then Redis) before this returns. Also returns redis-server's version."""
    redis_dir = work_dir / "redis"
    redis_dir.mkdir()
    redis_server = RedisServer(redis_dir)
    words = subprocess.run(
        [redis_server.binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()  # Redis server v=7.0.15 sha=... malloc=... bits=64 build=...
    version = " ".join(word for word in words if word.startswith(("v=", "malloc=")))
    servers: list[ServerProcess] = []
    redis_server.start()
    try:
        started = time.perf_counter()
        url = redis_server.url
        worker = ServerProcess(
            registry,
            work_dir / "worker.log",
            command="worker",
            args=["--redis-url", url, "--model", MODEL],
        )
        servers.append(worker)  # stopped first: it drains, then leaves the fleet
        gateway = ServerProcess(
            registry, work_dir / "gateway.log", command="gateway", args=["--redis-url", url]
        )
        servers.append(gateway)
        gateway.wait_ready(READY_TIMEOUT_S)
        worker.wait_ready(READY_TIMEOUT_S)
        worker_ready_s = time.perf_counter() - started
        wait_listed_ready(gateway, [worker], MODEL)
        ready_s = time.perf_counter() - started
        assert redis_server.process is not None
        redis_pid = redis_server.process.pid

        def groups() -> dict[str, list[psutil.Process]]:
            worker_main, worker_children = _tree(worker.process.pid)
            return {
                "client (this process)": [psutil.Process()],
                "gateway": [psutil.Process(gateway.process.pid)],
                "worker main (AsyncLLM)": [worker_main],
                "worker children (engine core)": worker_children,
                "redis-server": [psutil.Process(redis_pid)],
            }

        detail = f"worker /readyz after {worker_ready_s:.1f} s, gateway lists it ready"
        return _measure(gateway.base_url, work, groups, ready_s, detail), version
    finally:
        for server in servers:
            server.stop()
        redis_server.stop()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _max_diff(
    first: Sequence[float | None], second: Sequence[float | None]
) -> tuple[float, int, bool]:
    """Largest |difference| over the items both scored, how many those are, and whether all
    items were scored by both within SCORE_TOLERANCE."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    diff = max((abs(a - b) for a, b in pairs), default=float("nan"))
    return diff, len(pairs), len(pairs) == len(first) and diff <= SCORE_TOLERANCE


def _row(label: str, value: str) -> None:
    print(f"  {label:<26} {value}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [f"{row[0]:<{widths[0]}}"] + [
            f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        print("  " + "   ".join(cells))


def _phase_lines(name: str, phase: Phase, lengths: list[int]) -> bool:
    """Print one service's section; return whether it had no failed request or item."""
    load, latency = phase.load, phase.latency
    print(name)
    _row("ready after", f"{phase.ready_s:.1f} s ({phase.ready_detail})")
    _row(
        "throughput load",
        f"{load.seconds:.2f} s for {load.items} items, {load.errors} errors, "
        f"{load.failed_requests}/{load.requests} requests failed",
    )
    _row("throughput", f"{load.items_per_s:.1f} items/s, {sum(lengths) / load.seconds:.0f} tok/s")
    _row(
        "request latency (loaded)",
        f"p50 {load.latency_p50_s:.2f} s, p95 {load.latency_p95_s:.2f} s, "
        f"p99 {load.latency_p99_s:.2f} s",
    )
    _row(
        "cpu during load",
        ", ".join(f"{label} {seconds:.2f} s" for label, seconds in phase.cpu_s.items()),
    )
    total_cpu = sum(phase.cpu_s.values())
    _row("", f"total {total_cpu:.1f} CPU-s = {total_cpu / load.seconds:.2f} cores busy")
    _row(
        "single-item latency",
        f"{len(latency.seconds)} requests: p50 {latency.ms(50):.2f} ms, p90 {latency.ms(90):.2f} "
        f"ms, p99 {latency.ms(99):.2f} ms, max {1000 * max(latency.seconds, default=0):.2f} ms, "
        f"{latency.errors} errors",
    )
    if latency.queue_s:
        _row(
            "  where it goes (p50 each)",
            f"queue (enqueue -> scoring began) {1000 * percentile(latency.queue_s, 50):.2f} ms, "
            f"compute {1000 * percentile(latency.compute_s, 50):.2f} ms, rest (HTTP, gateway, "
            f"result delivery) {1000 * percentile(latency.other_s, 50):.2f} ms",
        )
    for sample in [*load.error_samples, *latency.error_samples]:
        _row("error", sample)
    return load.errors == 0 and latency.errors == 0


def report(
    args: argparse.Namespace,
    model_dir: Path,
    options: EngineOptions,
    lengths: list[int],
    latency_lengths: list[int],
    baseline: Baseline,
    embedded: Phase,
    distributed: Phase,
    redis_version: str,
) -> bool:
    """Print the report; return False when a request, item or score comparison failed."""
    config = json.loads((model_dir / "config.json").read_text())
    cores, cpu = machine()
    settings = Settings()
    rate_a = len(lengths) / baseline.seconds
    rate_b, rate_c = embedded.load.items_per_s, distributed.load.items_per_s
    ratio_ba, ratio_ca, ratio_cb = rate_b / rate_a, rate_c / rate_a, rate_c / rate_b
    added_p50 = distributed.latency.ms(50) - embedded.latency.ms(50)
    added_p99 = distributed.latency.ms(99) - embedded.latency.ms(99)
    throughput_met = ratio_ca >= THROUGHPUT_TARGET
    latency_met = added_p50 <= ADDED_P50_TARGET_MS

    print()
    print("=" * 100)
    print("rmserve distributed mode (gateway + Redis + worker) vs. embedded serve vs. vLLM direct")
    print("=" * 100)
    print("model")
    _row("name", f"{MODEL} (random Llama, sequence classification, 1 label)")
    _row(
        "size",
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, intermediate {config['intermediate_size']}, "
        f"vocab {config['vocab_size']}, {parameter_count(model_dir) / 1e6:.2f} M parameters",
    )
    _row(
        "engine",
        f"dtype {options.dtype}, max_model_len {options.max_model_len}, "
        f"kv_cache_gib {options.kv_cache_gib}, enforce_eager {options.enforce_eager}, "
        f"max_num_batched_tokens {options.max_num_batched_tokens or 'default'}",
    )
    for label, limits in baseline.limits.items():
        _row(f"scheduler ({label})", ", ".join(f"{k} {v}" for k, v in limits.items()))
    print("machine")
    _row("cores (nproc)", str(cores))
    _row("cpu", cpu)
    _row("redis", redis_version)
    print("service settings (the same for (b) and (c): RMSERVE_* environment, else defaults)")
    _row(
        "",
        f"worker_concurrency {settings.worker_concurrency}, max_items_per_request "
        f"{settings.max_items_per_request}, queue_capacity {settings.queue_capacity}, "
        f"result_cache_ttl_s {settings.result_cache_ttl_s}",
    )
    print("workload")
    _row(
        "items",
        f"{len(lengths)} trajectories, seed {args.seed}; tokens min {min(lengths)}, "
        f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} (total {sum(lengths)})",
    )
    _row(
        "throughput load",
        f"(b), (c): {args.concurrency} concurrent clients, {args.batch_size} items/request, "
        f"after a warm-up of {WARMUP_ITEMS} other items; (a): one classify call",
    )
    _row(
        "latency load",
        f"{args.latency_requests} sequential requests of 1 distinct short chat each "
        f"(tokens {min(latency_lengths)}-{max(latency_lengths)}), concurrency 1, one "
        f"keep-alive httpx.Client, after {LATENCY_WARMUP_REQUESTS} untimed ones",
    )
    print("(a) vLLM direct: vllm.LLM.classify, one call over all items")
    _row("engine start", f"{baseline.engine_start_s:.1f} s")
    _row(
        "time",
        f"{baseline.seconds:.2f} s (render {baseline.render_s:.2f} s + classify "
        f"{baseline.classify_s:.2f} s); prefix-cache hits {baseline.cached_tokens} tokens",
    )
    _row("throughput", f"{rate_a:.1f} items/s, {sum(lengths) / baseline.seconds:.0f} tok/s")
    _row(
        "cpu during classify",
        ", ".join(f"{label} {seconds:.1f} s" for label, seconds in baseline.cpu_s.items()),
    )
    ok_b = _phase_lines("(b) embedded: rmserve serve", embedded, lengths)
    ok_c = _phase_lines("(c) Redis: redis-server + gateway + worker", distributed, lengths)
    ok = ok_b and ok_c

    print("throughput at saturation")
    _table(
        ["", "(a) vLLM direct", "(b) embedded", "(c) Redis"],
        [
            ["items/s", f"{rate_a:.2f}", f"{rate_b:.2f}", f"{rate_c:.2f}"],
            [
                "wall time (s)",
                f"{baseline.seconds:.2f}",
                f"{embedded.load.seconds:.2f}",
                f"{distributed.load.seconds:.2f}",
            ],
        ],
    )
    _row("ratio (b)/(a)", f"{ratio_ba:.3f}")
    _row(
        "ratio (c)/(a)",
        f"{ratio_ca:.3f}   target >= {THROUGHPUT_TARGET}: {'met' if throughput_met else 'NOT met'}",
    )
    _row("ratio (c)/(b)", f"{ratio_cb:.3f}")

    print("single-item latency at low load (ms)")
    b, c = embedded.latency, distributed.latency
    _table(
        ["", "p50", "p99", "compute_s p50", "outside compute p50", "outside compute p99"],
        [
            [
                label,
                f"{x.ms(50):.2f}",
                f"{x.ms(99):.2f}",
                f"{x.compute_ms(50):.2f}",
                f"{x.outside_ms(50):.2f}",
                f"{x.outside_ms(99):.2f}",
            ]
            for label, x in (("(b) embedded", b), ("(c) Redis", c))
        ]
        + [
            [
                "added by Redis (c)-(b)",
                f"{added_p50:+.2f}",
                f"{added_p99:+.2f}",
                f"{c.compute_ms(50) - b.compute_ms(50):+.2f}",
                f"{c.outside_ms(50) - b.outside_ms(50):+.2f}",
                f"{c.outside_ms(99) - b.outside_ms(99):+.2f}",
            ]
        ],
    )
    _row(
        "note",
        "compute_s is the worker's model.score time (render, tokenize, engine); (b) and (c) run "
        "two separately started engines, whose compute time can differ by a few ms",
    )
    _row(
        "added p50",
        f"{added_p50:+.2f} ms   target <= {ADDED_P50_TARGET_MS:.0f} ms: "
        f"{'met' if latency_met else 'NOT met'}",
    )

    print(f"scores (same items; tolerance {SCORE_TOLERANCE})")
    comparisons: list[tuple[str, Sequence[float | None], Sequence[float | None]]] = [
        ("(b) vs (a)", baseline.scores, embedded.load.scores),
        ("(c) vs (a)", baseline.scores, distributed.load.scores),
        ("(c) vs (b), latency items", embedded.latency.scores, distributed.latency.scores),
    ]
    for label, first, second in comparisons:
        diff, count, same = _max_diff(first, second)
        _row(
            label,
            f"max |diff| {diff:.2e} over {count}/{len(first)} items: "
            f"{'OK' if same else 'MISMATCH'}",
        )
        ok = ok and same
    print("=" * 100)
    print(f"benchmark {'ran' if ok else 'FAILED (see errors / MISMATCH above)'}")
    return ok


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM (e.g. `timeout`): unwind so that the servers started so far are stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=300, help="trajectories to score")
    parser.add_argument("--concurrency", type=int, default=32, help="services: requests in flight")
    parser.add_argument("--batch-size", type=int, default=8, help="services: items per request")
    parser.add_argument("--hidden-size", type=int, default=512, help="multiple of 64")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="model weights and trajectories")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip graph compilation (default: compiled)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="engine token budget per step for all three (default: vLLM's, which differs: "
        "4096 for LLM, 2048 for AsyncLLM on CPU)",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=200,
        help="timed sequential single-item requests per service",
    )
    args = parser.parse_args(argv)
    if args.items < 1 or args.hidden_size % 64 or args.hidden_size < 64 or args.layers < 1:
        parser.error("--items and --layers must be >= 1, --hidden-size a multiple of 64")
    if args.latency_requests < 1 or args.concurrency < 1 or args.batch_size < 1:
        parser.error("--latency-requests, --concurrency and --batch-size must be >= 1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # inherited by every child
    signal.signal(signal.SIGTERM, _terminate)

    from transformers import AutoTokenizer

    from rmserve.models.tiny import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="rmserve-dist-bench-") as tmp:
        work_dir = Path(tmp)
        model_dir = make_tiny_models(
            work_dir / "models",
            hidden_size=args.hidden_size,
            layers=args.layers,
            max_positions=2048,
            seed=args.seed,
        )[MODEL]
        options = EngineOptions(
            dtype="float32",
            max_model_len=2048,
            kv_cache_gib=0.5,
            enforce_eager=args.enforce_eager,
            max_num_batched_tokens=args.max_num_batched_tokens,
            seed=args.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        started = time.perf_counter()
        items, lengths = make_trajectories(tokenizer, args.items, args.seed)
        warmup, _ = make_trajectories(tokenizer, WARMUP_ITEMS, args.seed + 1, prefix="warmup")
        latency_items = short_chats(
            LATENCY_WARMUP_REQUESTS + args.latency_requests, args.seed, prefix="latency"
        )
        latency_lengths = [
            len(tokenizer(render(tokenizer, item), add_special_tokens=False)["input_ids"])
            for item in latency_items
        ]
        work = Workload(items, warmup, latency_items, args.concurrency, args.batch_size)
        registry = write_registry(work_dir, model_dir, options)
        print(
            f"built {len(items)} trajectories in {time.perf_counter() - started:.1f} s; "
            "running (a) vLLM direct ...",
            flush=True,
        )
        try:
            baseline = run_baseline(work_dir, model_dir, options, items, warmup)
            print(
                f"(a) done: {len(items) / baseline.seconds:.1f} items/s; running (b) embedded ...",
                flush=True,
            )
            embedded = run_embedded(work_dir, registry, work)
            print(
                f"(b) done: {embedded.load.items_per_s:.1f} items/s, single-item p50 "
                f"{embedded.latency.ms(50):.2f} ms; running (c) Redis ...",
                flush=True,
            )
            distributed, redis_version = run_distributed(work_dir, registry, work)
            print(
                f"(c) done: {distributed.load.items_per_s:.1f} items/s, single-item p50 "
                f"{distributed.latency.ms(50):.2f} ms",
                flush=True,
            )
        except (ServerFailed, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        ok = report(
            args,
            model_dir,
            options,
            lengths,
            latency_lengths,
            baseline,
            embedded,
            distributed,
            redis_version,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tool sandbox latency and code-run throughput, each beside its baseline in the same run.

    python benchmarks/tool_latency.py [--only sidecar|runner-latency|code-batch ...]
        [--calls 200] [--code-calls 100] [--code-concurrency NPROC]
        [--latency-runs 100] [--responses 64] [--tests-per-response 10]

Three sections, all by default (``--only`` picks some; it may be repeated):

sidecar (HTTP):
A real `rmserve sandbox` is started on a loopback port (bubblewrap included, running
`--code-concurrency` sandboxes at once); one keep-alive httpx client calls it.

  latency (sequential calls, p50 / p99):
    crop      a 0-1000 box of a 1024x768 PNG          vs. the same crop() in-process
    search    a query over 200 generated documents    vs. the same SearchIndex in-process
    code_run  a short Python program                  vs. the same program as a plain
                                                          `python -I -c` subprocess (no sandbox)
  throughput: code_run calls/s at client concurrency 1, 4 and 16 (the sidecar runs
  `--code-concurrency` sandboxes at once and queues the rest), vs. plain subprocesses at the
  same concurrency.

runner-latency (no HTTP): `--latency-runs` sequential runs of the same short program through
  the current CodeRunner, the runner of commit 53ffbbd (loaded from git) and a plain
  `python -I -B -S -c` subprocess (the base interpreter), interleaved; p50 / p99 and the ratio
  new / old (target <= 1.20).

code-batch (a GRPO step of the `unit-tests` verifier; see benchmarks/code_batch.py):
  `--responses` responses x `--tests-per-response` asserts through the old runner (a sandbox
  per test), the current CodeRunner (assert tests and call tests: a sandbox per response), the
  unit-tests verifier over an in-process LocalToolbox, and plain `python -I -S -c` (a process per
  response, and per test); `--code-concurrency` at once on every path, the same limits.
  items/s, tests/s, ratios after/today and after/unsandboxed. Every path must give the same
  verdict for every test: a mismatch is printed and the exit status is 1.

Each line prints the measured figure, its baseline and the ratio (sidecar / baseline for
latency: what HTTP, argument checking and isolation add; baseline / sidecar for throughput).
Without git history (or commit 53ffbbd) the old runner's figures say so and are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.code_batch import (  # noqa: E402
    code_batch,
    default_concurrency,
    load_old_runner,
    runner_latency,
)
from rmserve.sandbox.crop import crop  # noqa: E402
from rmserve.sandbox.search import SearchIndex  # noqa: E402
from rmserve.service.launcher import ServerProcess  # noqa: E402
from rmserve.wire.trajectory import Document  # noqa: E402

SECTIONS = ("sidecar", "runner-latency", "code-batch")

PROGRAM = "import math\nprint(sum(math.isqrt(i) for i in range(20000)))"
WORDS = [
    "river",
    "tower",
    "bridge",
    "market",
    "garden",
    "castle",
    "harbor",
    "museum",
    "station",
    "forest",
    "valley",
    "mountain",
    "library",
    "theater",
    "island",
    "canal",
    "square",
    "palace",
    "temple",
    "fountain",
]


def picture() -> tuple[Image.Image, str]:
    image = Image.new("RGB", (1024, 768), "white")
    draw = ImageDraw.Draw(image)
    rng = random.Random(0)
    for _ in range(200):
        x, y = rng.randrange(1000), rng.randrange(740)
        draw.rectangle((x, y, x + 24, y + 24), fill=(rng.randrange(256), 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def documents(n: int) -> list[Document]:
    rng = random.Random(1)
    return [
        Document(id=f"d{i}", text=" ".join(rng.choice(WORDS) for _ in range(120))) for i in range(n)
    ]


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(function: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        function()
        out.append(time.perf_counter() - started)
    return out


def report_latency(name: str, sidecar: list[float], baseline: list[float], what: str) -> None:
    s50, s99 = percentiles(sidecar)
    b50, b99 = percentiles(baseline)
    print(
        f"{name:<9} sidecar p50 {s50 * 1e3:8.2f} ms  p99 {s99 * 1e3:8.2f} ms | {what} "
        f"p50 {b50 * 1e3:8.2f} ms  p99 {b99 * 1e3:8.2f} ms | ratio p50 {s50 / b50:6.1f}x"
    )


async def throughput(call: Callable[[], Awaitable[None]], total: int, concurrency: int) -> float:
    remaining = total

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


def sidecar(args: argparse.Namespace) -> None:
    image, url = picture()
    docs = documents(200)
    box = (120.0, 200.0, 380.0, 520.0)
    workdir = Path(tempfile.mkdtemp(prefix="rmserve-tools-"))
    env = {"RMSERVE_SANDBOX_CODE_CONCURRENCY": str(args.code_concurrency),
           "RMSERVE_SANDBOX_CODE_MAX_QUEUED": "1000"}  # fmt: skip
    server = ServerProcess(None, workdir / "sandbox.log", command="sandbox", env=env)
    try:
        server.wait_ready(60)
        with httpx.Client(base_url=server.base_url, timeout=120) as http:

            def tool(name: str, arguments: dict[str, object], **context: object) -> None:
                body = {"arguments": arguments, "context": context}
                answer = http.post(f"/v1/tools/{name}", json=body).json()
                assert answer.get("error") is None, answer

            context_docs = [d.model_dump() for d in docs]
            for _ in range(5):  # warm-up
                tool("crop", {"bbox_2d": box}, images=[url])
                tool("search", {"query": "river castle", "top_k": 3}, documents=context_docs)
                tool("code_run", {"code": PROGRAM})
            print(f"sandbox sidecar on {server.base_url}; {args.calls} sequential calls each")
            report_latency(
                "crop",
                timed(lambda: tool("crop", {"bbox_2d": box}, images=[url]), args.calls),
                timed(lambda: crop(image, box), args.calls),
                "in-process",
            )
            report_latency(
                "search",
                timed(
                    lambda: tool(
                        "search",
                        {"query": "castle by the river", "top_k": 3},
                        documents=context_docs,
                    ),
                    args.calls,
                ),
                timed(lambda: SearchIndex(docs).search("castle by the river", 3), args.calls),
                "in-process",
            )
            plain = [sys.executable, "-I", "-c", PROGRAM]
            report_latency(
                "code_run",
                timed(lambda: tool("code_run", {"code": PROGRAM}), args.code_calls),
                timed(
                    lambda: subprocess.run(plain, check=True, capture_output=True), args.code_calls
                ),
                "plain python",
            )

        async def load() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:

                async def sandboxed() -> None:
                    body = {"arguments": {"code": PROGRAM}}
                    answer = (await client.post("/v1/tools/code_run", json=body)).json()
                    assert answer["output"]["data"]["run"]["status"] == "ok", answer

                async def unsandboxed() -> None:
                    process = await asyncio.create_subprocess_exec(
                        *plain, stdout=asyncio.subprocess.PIPE
                    )
                    await process.communicate()

                for concurrency in (1, 4, 16):
                    ours = await throughput(sandboxed, args.code_calls, concurrency)
                    base = await throughput(unsandboxed, args.code_calls, concurrency)
                    print(
                        f"code_run throughput at concurrency {concurrency:>2}: sidecar "
                        f"{ours:6.1f} runs/s | plain python {base:6.1f} runs/s | "
                        f"ratio {ours / base:5.2f}"
                    )

        asyncio.run(load())
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--code-calls", type=int, default=100)
    parser.add_argument(
        "--code-concurrency",
        type=int,
        default=default_concurrency(),
        help="sandboxes (or plain processes) at once; default: the machine's cores",
    )
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--tests-per-response", type=int, default=10)
    args = parser.parse_args()
    sections = args.only or list(SECTIONS)

    started = time.perf_counter()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    cores = default_concurrency()
    print(f"{cores} cores, load average {load}; code concurrency {args.code_concurrency}")
    if "sidecar" in sections:
        sidecar(args)
    old = load_old_runner() if {"runner-latency", "code-batch"} & set(sections) else ""
    if "runner-latency" in sections:
        asyncio.run(runner_latency(old, PROGRAM, args.latency_runs))
    agree = True
    if "code-batch" in sections:
        agree = asyncio.run(
            code_batch(old, args.responses, args.tests_per_response, args.code_concurrency)
        )
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {load}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

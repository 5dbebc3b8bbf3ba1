"""Scenarios run one after another against one server, and the report of them.

`drive` runs the scenarios against any loopback server (`python -m loadtests run`); `run_suite`
first starts `rmserve serve` with a registry (generating the tiny models it names when
$RMSERVE_TINY_MODELS is unset), warms every model up, drives all scenarios and stops the server
(`python -m loadtests suite`). After each phase the suite waits (bounded) until the server's
queues are empty, so that one phase's backlog does not load the next.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.generator import Request, Run, closed_loop, open_loop
from loadtests.machine import REPO, load_average, this_machine
from loadtests.report import Report, ScenarioResult
from loadtests.scenarios import LoadConfig, Phase, ScenarioBuilder
from loadtests.server import SERVER_ENV, TINY_MODELS_VAR, model_list, serve, tiny_models, wait_idle
from loadtests.stats import PhaseStats
from loadtests.workload import Workload

REGISTRY = Path(__file__).resolve().parent / "registry.yaml"
SETTLE_TIMEOUT_S = 120.0
WARMUP_ITEMS = 2

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_phase(base_url: str, phase: Phase) -> Run:
    if phase.loop == "open":
        return await open_loop(
            base_url, phase.plan, timeout_s=phase.timeout_s, max_duration_s=phase.max_duration_s
        )
    return await closed_loop(
        base_url,
        phase.plan,
        concurrency=phase.concurrency,
        timeout_s=phase.timeout_s,
        max_duration_s=phase.max_duration_s,
        window_s=phase.window_s,
    )


async def drive(
    base_url: str,
    names: Sequence[str],
    builder: ScenarioBuilder,
    progress: Progress = _stderr,
    settle_timeout_s: float = SETTLE_TIMEOUT_S,
) -> list[ScenarioResult]:
    """Run the scenarios `names` in order; each phase's times are offsets from the first. A
    sweep without explicit rates first probes the capacity (closed loop) and sweeps around it."""
    began = time.monotonic()

    async def run(name: str, phase: Phase) -> tuple[PhaseStats, tuple[float, bool | None]]:
        offset = time.monotonic() - began
        stats = PhaseStats.of(name, phase, await run_phase(base_url, phase), offset)
        settled = await wait_idle(base_url, settle_timeout_s)
        progress(_progress_line(stats))
        return stats, settled

    results = []
    for name in names:
        done = []
        if name == "sweep" and not builder.config.sweep_rates:
            done.append(await run(name, builder.probe()))
            scenario = builder.sweep(capacity_rps=done[0][0].summary.requests_per_s)
        else:
            scenario = builder.build(name)
        for phase in scenario.phases:
            done.append(await run(name, phase))
        results.append(ScenarioResult(scenario, [s for s, _ in done], [w for _, w in done]))
    return results


async def warm_up(
    base_url: str, kinds: Mapping[str, str | None], workload: Workload, timeout_s: float
) -> Run:
    """A couple of items to each ready model first, so that no first-request cost is measured."""
    rng = random.Random(-1)
    plan = [
        Request(0.0, name, workload.batch(rng, WARMUP_ITEMS, kind)) for name, kind in kinds.items()
    ]
    return await closed_loop(
        base_url,
        plan,
        concurrency=1,
        timeout_s=timeout_s,
        max_duration_s=timeout_s * max(1, len(plan)),
    )


@dataclass(frozen=True)
class _Timing:
    """When a run began, and the machine's load then; `report` adds the end."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    began: float = field(default_factory=time.monotonic)
    load_before: tuple[float, float, float] = field(default_factory=load_average)

    def report(
        self,
        base_url: str,
        config: LoadConfig,
        server: str,
        models: list[dict[str, Any]],
        results: list[ScenarioResult],
        startup_s: float | None = None,
    ) -> Report:
        return Report(
            title=f"rmserve load test, {self.started:%Y-%m-%d}",
            started=self.started.isoformat(timespec="seconds"),
            machine=this_machine(),
            base_url=base_url,
            config=config,
            server=server,
            models=models,
            results=results,
            seconds=time.monotonic() - self.began,
            startup_s=startup_s,
            load_before=self.load_before,
            load_after=load_average(),
        )


def run_suite(
    registry: Path,
    config: LoadConfig,
    names: Sequence[str],
    workload: Workload,
    *,
    ready_timeout_s: float = 900.0,
    progress: Progress = _stderr,
) -> Report:
    """Start `rmserve serve` with `registry`, run the scenarios against it, stop it."""
    timing = _Timing()
    with tiny_models(registry) as tiny, tempfile.TemporaryDirectory(prefix="loadtests-") as work:
        env = {TINY_MODELS_VAR: tiny} if tiny is not None else {}
        progress(f"starting rmserve serve --registry {registry}")
        with serve(registry, Path(work), env, ready_timeout_s) as (server, startup_s):
            models = model_list(server.base_url)
            progress(f"models settled after {startup_s:.0f} s: {_model_states(models)}")
            ready = {m["name"]: m["kind"] for m in models if m["status"] == "ready"}
            warm = asyncio.run(warm_up(server.base_url, ready, workload, config.timeout_s))
            progress(f"warm-up: {sum(r.ok for r in warm.records)}/{len(warm.records)} answered 200")
            kinds = {m["name"]: m["kind"] for m in models}
            builder = ScenarioBuilder(config, workload, kinds)
            results = asyncio.run(drive(server.base_url, names, builder, progress))
            base_url = server.base_url
    described = _server_description(registry)
    return timing.report(base_url, config, described, models, results, startup_s)


def run_against(
    base_url: str,
    config: LoadConfig,
    names: Sequence[str],
    workload: Workload,
    progress: Progress = _stderr,
) -> Report:
    """Run the scenarios against a server that is already running at `base_url`."""
    timing = _Timing()
    models = model_list(base_url)
    kinds = {m["name"]: m["kind"] for m in models}
    results = asyncio.run(
        drive(base_url, names, ScenarioBuilder(config, workload, kinds), progress)
    )
    return timing.report(base_url, config, "a running server (started elsewhere)", models, results)


def _server_description(registry: Path) -> str:
    try:
        shown = registry.resolve().relative_to(REPO)
    except ValueError:
        shown = registry
    env = {**{k: v for k, v in os.environ.items() if k.startswith("RMSERVE_")}, **SERVER_ENV}
    env.pop(TINY_MODELS_VAR, None)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("RMSERVE_"))
    return (
        f"`rmserve serve --registry {shown}` (embedded mode) started by the suite, "
        f"{settings}, other settings default"
    )


def _model_states(models: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{m['name']} {m['status']}" for m in models) or "none"


def _progress_line(stats: PhaseStats) -> str:
    s = stats.summary
    latency = f"p50 {s.latency.p50:.3f} s, p99 {s.latency.p99:.3f} s" if s.latency else "no 200s"
    statuses = ", ".join(f"{k}: {v}" for k, v in s.by_status.items())
    return (
        f"{stats.scenario} [{stats.phase.label}]: {s.requests}/{stats.planned} sent "
        f"({statuses}), {s.items_per_s:.1f} items/s, {latency}"
    )

"""What each scenario sends and when: its phases, each one run of the generator.

A phase is a plan (requests with their arrival times), the loop that sends it (open or closed)
and its bounds: arrivals fall in `window_s`, the run ends at `max_duration_s` (the window plus
the drain time, in which requests in flight may still finish) and holds at most `max_requests`.
Arrivals are Poisson (exponential gaps, seeded): the rate of a phase is piecewise constant, so
a burst is high-rate segments between idle ones. Every phase draws from its own generator seeded
from the scenario's seed, so a scenario sends the same items at the same times on every run.

Scenarios: steady (rate R for T s), burst (alternating high rate and idle), mixed (requests
spread over several models of different kinds, by weight), large_batch (a few requests of
hundreds of items, one at a time), streaming (options.stream NDJSON) and sweep (several offered
rates one after another: throughput against offered load).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loadtests.generator import Request
from loadtests.workload import Workload

SCENARIOS = ("steady", "burst", "mixed", "large_batch", "streaming", "sweep")


@dataclass(frozen=True)
class LoadConfig:
    """Every knob of the scenarios. Rates are requests/s; durations seconds. The defaults suit
    loadtests/registry.yaml on a 2-core machine (tiny-rm scores some 60-130 items/s there): the
    suite takes about 5.5 minutes of load after the server has started."""

    model: str = "tiny-rm"
    # mixed: model names with relative weights (a model the server does not list gets items
    # of no particular kind, and its requests are counted like any other: 404s).
    mix: tuple[tuple[str, float], ...] = (
        ("tiny-rm", 3.0), ("tiny-prm", 2.0), ("math", 2.0), ("answer-format", 2.0),
        ("tiny-judge", 1.0),
    )  # fmt: skip
    batch_size: int = 8
    rate: float = 5.0
    duration_s: float = 30.0
    burst_rate: float = 20.0
    burst_s: float = 5.0
    idle_s: float = 10.0
    burst_duration_s: float = 45.0
    mixed_rate: float = 4.0
    large_batch_sizes: tuple[int, ...] = (256, 512, 1024)
    large_batch_max_s: float = 180.0
    stream_rate: float = 2.0
    stream_batch_size: int = 16
    # sweep: explicit rates, or (when empty) these fractions of the capacity a closed-loop probe
    # of probe_s seconds with probe_concurrency requests in flight measures first.
    sweep_rates: tuple[float, ...] = ()
    sweep_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    sweep_step_s: float = 20.0
    probe_s: float = 15.0
    probe_concurrency: int = 16
    drain_s: float = 30.0
    timeout_s: float = 60.0
    max_requests: int = 2000
    max_extra_steps: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "rate": self.rate, "duration_s": self.duration_s, "burst_rate": self.burst_rate,
            "burst_s": self.burst_s, "burst_duration_s": self.burst_duration_s,
            "mixed_rate": self.mixed_rate, "large_batch_max_s": self.large_batch_max_s,
            "stream_rate": self.stream_rate, "sweep_step_s": self.sweep_step_s,
            "timeout_s": self.timeout_s, "batch_size": self.batch_size,
            "stream_batch_size": self.stream_batch_size, "max_requests": self.max_requests,
            "probe_s": self.probe_s, "probe_concurrency": self.probe_concurrency,
        }  # fmt: skip
        bad = [name for name, value in positive.items() if not value > 0]
        if self.idle_s < 0 or self.drain_s < 0 or self.max_extra_steps < 0:
            bad.append("idle_s, drain_s and max_extra_steps (>= 0)")
        if not self.mix or any(not weight > 0 for _, weight in self.mix):
            bad.append("mix (model:weight with weights > 0)")
        if any(not rate > 0 for rate in self.sweep_rates):
            bad.append("sweep_rates")
        if not self.sweep_fractions or any(not f > 0 for f in self.sweep_fractions):
            bad.append("sweep_fractions")
        if not self.large_batch_sizes or any(size < 1 for size in self.large_batch_sizes):
            bad.append("large_batch_sizes")
        if bad:
            raise ValueError(f"LoadConfig: these must be > 0: {', '.join(bad)}")


@dataclass(frozen=True)
class Phase:
    label: str
    plan: list[Request] = field(repr=False)
    loop: Literal["open", "closed"]
    window_s: float  # no request is sent after it (open loop: arrivals fall in [0, window_s))
    max_duration_s: float
    timeout_s: float
    offered_rps: float | None = None  # open loop: the nominal rate
    concurrency: int = 1  # closed loop

    @property
    def open_ended(self) -> bool:
        """A closed loop that sends until its window ends: its plan is only an upper bound."""
        return self.loop == "closed" and self.window_s < self.max_duration_s


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    phases: list[Phase]


@dataclass(frozen=True)
class Segment:
    """Arrivals at `rate` requests/s from `start_s` to `end_s` (rate 0: idle)."""

    start_s: float
    end_s: float
    rate: float


def poisson_arrivals(
    rng: random.Random, segments: Sequence[Segment], max_requests: int
) -> list[float]:
    """Arrival times of a Poisson process whose rate is constant within each segment."""
    times: list[float] = []
    for segment in segments:
        if segment.rate <= 0:
            continue
        at = segment.start_s + rng.expovariate(segment.rate)
        while at < segment.end_s and len(times) < max_requests:
            times.append(at)
            at += rng.expovariate(segment.rate)
    return times


class ScenarioBuilder:
    """Builds scenarios from a LoadConfig; `kinds` gives each model's kind (from /v1/models),
    which decides the items it gets."""

    def __init__(
        self, config: LoadConfig, workload: Workload, kinds: Mapping[str, str | None]
    ) -> None:
        self.config = config
        self._workload = workload
        self._kinds = kinds

    def build(self, name: str) -> Scenario:
        builders = {
            "steady": self.steady,
            "burst": self.burst,
            "mixed": self.mixed,
            "large_batch": self.large_batch,
            "streaming": self.streaming,
            "sweep": self.sweep,
        }
        if name not in builders:
            raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
        return builders[name]()

    def steady(self) -> Scenario:
        c = self.config
        phase = self._open(f"{c.rate:g} req/s", 0, c.rate, c.duration_s, c.batch_size)
        return Scenario(
            "steady",
            f"Poisson arrivals at {c.rate:g} requests/s of {c.batch_size} items to {c.model} "
            f"for {c.duration_s:g} s.",
            [phase],
        )

    def burst(self) -> Scenario:
        c = self.config
        segments, at = [], 0.0
        while at < c.burst_duration_s:
            end = min(at + c.burst_s, c.burst_duration_s)
            segments.append(Segment(at, end, c.burst_rate))
            at = end + c.idle_s
        rng = self._rng(1)
        arrivals = poisson_arrivals(rng, segments, c.max_requests)
        plan = [self._request(rng, at, c.model, c.batch_size) for at in arrivals]
        busy_s = sum(segment.end_s - segment.start_s for segment in segments)
        mean_rate = busy_s * c.burst_rate / c.burst_duration_s
        label = f"bursts of {c.burst_rate:g} req/s"
        phase = self._phase(label, plan, c.burst_duration_s, mean_rate)
        return Scenario(
            "burst",
            f"{c.burst_s:g} s at {c.burst_rate:g} requests/s, then {c.idle_s:g} s idle, "
            f"repeated for {c.burst_duration_s:g} s ({c.batch_size} items per request to "
            f"{c.model}; offered rate is the mean over the whole window).",
            [phase],
        )

    def mixed(self) -> Scenario:
        c = self.config
        rng = self._rng(2)
        names = [name for name, _ in c.mix]
        weights = [weight for _, weight in c.mix]
        arrivals = poisson_arrivals(rng, [Segment(0, c.duration_s, c.mixed_rate)], c.max_requests)
        plan = [
            self._request(rng, at, rng.choices(names, weights)[0], c.batch_size) for at in arrivals
        ]
        phase = self._phase(f"{c.mixed_rate:g} req/s", plan, c.duration_s, c.mixed_rate)
        mix = ", ".join(
            f"{name} ({self._kinds.get(name) or 'unknown'}) x{weight:g}" for name, weight in c.mix
        )
        return Scenario(
            "mixed",
            f"Poisson arrivals at {c.mixed_rate:g} requests/s of {c.batch_size} items for "
            f"{c.duration_s:g} s, each to one model drawn by weight: {mix}.",
            [phase],
        )

    def large_batch(self) -> Scenario:
        c = self.config
        rng = self._rng(3)
        plan = [self._request(rng, 0.0, c.model, size) for size in c.large_batch_sizes]
        phase = Phase(
            label=" + ".join(str(size) for size in c.large_batch_sizes) + " items",
            plan=plan,
            loop="closed",
            window_s=c.large_batch_max_s,
            max_duration_s=c.large_batch_max_s,
            timeout_s=c.large_batch_max_s,
            concurrency=1,
        )
        return Scenario(
            "large_batch",
            f"One request each of {', '.join(map(str, c.large_batch_sizes))} items to "
            f"{c.model}, one after the other (closed loop), within {c.large_batch_max_s:g} s.",
            [phase],
        )

    def streaming(self) -> Scenario:
        c = self.config
        phase = self._open(
            f"{c.stream_rate:g} req/s", 4, c.stream_rate, c.duration_s, c.stream_batch_size, True
        )
        return Scenario(
            "streaming",
            f"Poisson arrivals at {c.stream_rate:g} requests/s of {c.stream_batch_size} items "
            f"to {c.model} with options.stream (NDJSON) for {c.duration_s:g} s: time to the "
            "first result and to the last.",
            [phase],
        )

    def probe(self) -> Phase:
        """The closed-loop capacity probe before a sweep without explicit rates."""
        c = self.config
        rng = self._rng(9)
        pool = [self._request(rng, 0.0, c.model, c.batch_size) for _ in range(64)]
        return Phase(
            label=f"probe, {c.probe_concurrency} in flight",
            plan=[pool[n % len(pool)] for n in range(c.max_requests)],  # the same 64, cycled
            loop="closed",
            window_s=c.probe_s,
            max_duration_s=c.probe_s + c.drain_s,
            timeout_s=c.timeout_s,
            concurrency=c.probe_concurrency,
        )

    def sweep(self, capacity_rps: float | None = None) -> Scenario:
        """Open-loop phases at the configured rates, or at fractions of `capacity_rps`."""
        c = self.config
        if c.sweep_rates:
            rates, how = c.sweep_rates, ""
        elif capacity_rps is not None:
            capacity = max(capacity_rps, 0.1)
            rates = tuple(round(f * capacity, 2) for f in c.sweep_fractions)
            how = (
                f" ({', '.join(f'{f:g}' for f in c.sweep_fractions)} times the "
                f"{capacity:.2f} requests/s that {c.probe_concurrency} requests in flight "
                f"(closed loop) achieved over {c.probe_s:g} s just before)"
            )
        else:
            raise ValueError("a sweep needs sweep_rates or the capacity a probe measured")
        phases = [
            self._open(f"{rate:g} req/s", 10 + n, rate, c.sweep_step_s, c.batch_size)
            for n, rate in enumerate(rates)
        ]
        return Scenario(
            "sweep",
            f"Offered rates {', '.join(f'{r:g}' for r in rates)} requests/s{how} of "
            f"{c.batch_size} items to {c.model}, {c.sweep_step_s:g} s each, one after the "
            "other: achieved throughput against offered load.",
            phases,
        )

    def _open(
        self,
        label: str,
        stream_id: int,
        rate: float,
        window_s: float,
        size: int,
        stream: bool = False,
    ) -> Phase:
        rng = self._rng(stream_id)
        arrivals = poisson_arrivals(rng, [Segment(0, window_s, rate)], self.config.max_requests)
        plan = [self._request(rng, at, self.config.model, size, stream) for at in arrivals]
        return self._phase(label, plan, window_s, rate)

    def _phase(
        self, label: str, plan: list[Request], window_s: float, rate: float | None = None
    ) -> Phase:
        c = self.config
        return Phase(
            label=label,
            plan=plan,
            loop="open",
            window_s=window_s,
            max_duration_s=window_s + c.drain_s,
            timeout_s=c.timeout_s,
            offered_rps=rate,
        )

    def _request(
        self, rng: random.Random, at: float, model: str, size: int, stream: bool = False
    ) -> Request:
        items = self._workload.batch(rng, size, self._kinds.get(model))
        return Request(at, model, items, stream)

    def _rng(self, stream_id: int) -> random.Random:
        return random.Random(self.config.seed * 1000 + stream_id)

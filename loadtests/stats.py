"""Summaries of recorded requests: throughput, latency percentiles, counts by status and error.

Latency percentiles are over the requests answered 200 (a fast 404 would flatter them); the
failures are counted by status instead. Throughput is over the phase's span: its arrival window
(open loop) or, when later, the end of its last request, so an overloaded server's backlog
counts against it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loadtests.generator import Record, Run, Status
from loadtests.scenarios import Phase


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        p50, p90, p99 = (percentile(values, q) for q in (50, 90, 99))
        return cls(p50, p90, p99, max(values))


def status_key(status: Status) -> tuple[int, str]:
    """HTTP codes in order first, then the client-side statuses by name."""
    return (status, "") if isinstance(status, int) else (1000, status)


@dataclass(frozen=True)
class Summary:
    requests: int
    items: int
    answered: int  # items in 200 responses (the only ones that can have item errors)
    scored: int  # items with a score
    ok: int  # requests answered 200
    by_status: dict[str, int]  # "200", "404", "timeout", ... in status_key order
    item_errors: dict[str, int]  # by error type, most frequent first
    requests_per_s: float  # 200 responses per second of the span
    items_per_s: float  # scored items per second of the span
    latency: Percentiles | None  # of the 200s
    first_result: Percentiles | None  # streaming 200s: to the first result line
    completion_tokens: int
    error_samples: list[str]

    @classmethod
    def of(cls, records: Sequence[Record], span_s: float) -> Summary:
        statuses = Counter(record.status for record in records)
        item_errors: Counter[str] = Counter()
        for record in records:
            item_errors.update(record.item_errors)
        ok = [record for record in records if record.ok]
        scored = sum(record.scored for record in records)
        first = [r.first_result_s for r in ok if r.first_result_s is not None]
        return cls(
            requests=len(records),
            items=sum(record.items for record in records),
            answered=sum(record.items for record in ok),
            scored=scored,
            ok=len(ok),
            by_status={str(s): statuses[s] for s in sorted(statuses, key=status_key)},
            item_errors=dict(item_errors.most_common()),
            requests_per_s=len(ok) / span_s if span_s > 0 else 0.0,
            items_per_s=scored / span_s if span_s > 0 else 0.0,
            latency=Percentiles.of([record.latency_s for record in ok]),
            first_result=Percentiles.of(first),
            completion_tokens=sum(record.completion_tokens for record in ok),
            error_samples=_samples(records),
        )


@dataclass(frozen=True)
class PhaseStats:
    scenario: str
    phase: Phase
    run: Run
    offset_s: float  # when the phase began, from the start of the suite
    span_s: float
    summary: Summary

    @classmethod
    def of(cls, scenario: str, phase: Phase, run: Run, offset_s: float) -> PhaseStats:
        span = max(phase.window_s if phase.loop == "open" else 0.0, run.seconds)
        return cls(scenario, phase, run, offset_s, span, Summary.of(run.records, span))

    @property
    def planned(self) -> int:
        return len(self.run.records) if self.phase.open_ended else self.run.planned

    @property
    def unsent(self) -> int:
        """Planned requests not sent in time (an open-ended closed loop has none)."""
        return self.planned - len(self.run.records)

    @property
    def offered_rps(self) -> float | None:
        """The realized offered rate: planned requests over the arrival window."""
        if self.phase.loop != "open":
            return None
        return self.run.planned / self.phase.window_s

    @property
    def offered_items_per_s(self) -> float | None:
        if self.phase.loop != "open":
            return None
        return sum(len(r.items) for r in self.phase.plan) / self.phase.window_s

    def by_model(self) -> dict[str, Summary]:
        models: dict[str, list[Record]] = {}
        for record in self.run.records:
            models.setdefault(record.model, []).append(record)
        return {name: Summary.of(records, self.span_s) for name, records in models.items()}


def _samples(records: Iterable[Record], limit: int = 3) -> list[str]:
    """A few distinct request errors, to say what went wrong."""
    samples: list[str] = []
    for record in records:
        if record.error is not None:
            sample = f"{record.status}: {record.error}"[:300]
            if sample not in samples:
                samples.append(sample)
                if len(samples) == limit:
                    break
    return samples

"""The load test's report: report.md, PNG plots and requests.jsonl (every recorded request).

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state): per scenario the
latency of each request over time (the 200s as dots, the failures as crosses, a rolling p50 and
p99) above the requests sent and answered per second; for a sweep, achieved throughput and
latency against offered load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loadtests.machine import Machine
from loadtests.scenarios import LoadConfig, Scenario
from loadtests.stats import Percentiles, PhaseStats, percentile

REQUESTS_FILE = "requests.jsonl"
THROUGHPUT_PLOT = "throughput_vs_offered.png"


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    phases: list[PhaseStats]
    # Seconds waited after each phase for the server's queues to empty, and whether they did
    # (None: unknown, the server's /metrics could not be read).
    settle: list[tuple[float, bool | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    title: str
    started: str  # UTC, ISO 8601
    machine: Machine
    base_url: str
    config: LoadConfig
    server: str  # how the server ran: command, registry, settings
    models: list[dict[str, Any]]  # GET /v1/models data at the start
    results: list[ScenarioResult]
    seconds: float  # the whole run
    startup_s: float | None  # server start to all models settled (None: a running server)
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def latency_plot_name(scenario: str) -> str:
    return f"latency_{scenario}.png"


def write_report(report: Report, out: Path) -> list[Path]:
    """Write report.md, the plots and requests.jsonl into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_requests(report, out / REQUESTS_FILE)]
    for result in report.results:
        written.append(plot_latency(result, out / latency_plot_name(result.scenario.name)))
    sweep = [r for r in report.results if r.scenario.name == "sweep"]
    if sweep:
        written.append(plot_throughput(sweep[0].phases, out / THROUGHPUT_PLOT))
    markdown = out / "report.md"
    markdown.write_text(render_markdown(report))
    return [markdown, *written]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", *_header(report), "", "## Summary", ""]
    lines += _summary_table(report.results)
    for result in report.results:
        lines += ["", *_scenario_section(result)]
    return "\n".join(lines) + "\n"


def _header(report: Report) -> list[str]:
    m, c = report.machine, report.config
    startup = (
        f" (server start to models settled {report.startup_s:.0f} s)"
        if report.startup_s is not None
        else ""
    )
    models = ", ".join(f"`{x['name']}` ({x['kind']}, {x['status']})" for x in report.models)
    return [
        f"- **When**: {report.started}, {report.seconds:.0f} s in all{startup}",
        f"- **rmserve**: commit {m.commit}",
        f"- **Machine**: {m.describe()}; load average {_load(report.load_before)} before, "
        f"{_load(report.load_after)} after (the client runs on the same machine)",
        f"- **Server**: {report.server} at {report.base_url}; models: {models or 'unknown'}",
        f"- **Settings**: seed {c.seed}, per-request timeout_s {c.timeout_s:g}, drain "
        f"{c.drain_s:g} s after each arrival window, at most {c.max_requests} requests per "
        f"phase, items lengthened by up to {c.max_extra_steps} reasoning steps",
        "- **Reading the tables**: offered = planned requests over the arrival window (Poisson, "
        "open loop); achieved = 200 responses and scored items per second of the phase's span "
        "(the window, or until its last response if later); latency percentiles are of the "
        "200s, from the planned send time to the end of the response; `cancelled` = still in "
        "flight at the end of the drain, `unsent` = planned but not sent by then.",
    ]


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _summary_table(results: Sequence[ScenarioResult]) -> list[str]:
    lines = [
        "| scenario | phase | offered req/s | achieved req/s | achieved items/s | "
        "p50 s | p99 s | non-200 | item errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for stats in result.phases:
            s = stats.summary
            latency = s.latency
            lines.append(
                f"| {result.scenario.name} | {stats.phase.label} | {_num(stats.offered_rps)} | "
                f"{s.requests_per_s:.2f} | {s.items_per_s:.1f} | "
                f"{_num(latency.p50 if latency else None, 3)} | "
                f"{_num(latency.p99 if latency else None, 3)} | "
                f"{s.requests - s.ok + stats.unsent} | {sum(s.item_errors.values())} |"
            )
    return lines


def _scenario_section(result: ScenarioResult) -> list[str]:
    scenario = result.scenario
    lines = [f"## {scenario.name}", "", scenario.description, "", *_phase_table(result.phases)]
    lines += ["", "Requests by status and items by error type:", ""]
    lines += _counts_table(result.phases)
    streaming = [s for s in result.phases if s.summary.first_result is not None]
    if streaming:
        lines += ["", *_streaming_table(streaming)]
    if scenario.name == "mixed":
        lines += ["", *_model_table(result.phases)]
    unsettled = [
        f"{stats.phase.label} ({seconds:.0f} s)"
        for stats, (seconds, idle) in zip(result.phases, result.settle, strict=False)
        if idle is False
    ]
    if unsettled:
        lines += ["", f"The server's queues were not empty after: {', '.join(unsettled)}."]
    samples = sorted({sample for s in result.phases for sample in s.summary.error_samples})
    if samples:
        lines += ["", "Errors (samples; for a 200, its first item error):", ""]
        lines += [f"- `{sample}`" for sample in samples[:6]]
    lines += ["", f"![latency over time]({latency_plot_name(scenario.name)})"]
    if scenario.name == "sweep":
        lines += ["", f"![throughput against offered load]({THROUGHPUT_PLOT})"]
    return lines


def _phase_table(phases: Sequence[PhaseStats]) -> list[str]:
    lines = [
        "| phase | loop | offered req/s | offered items/s | requests sent/planned | "
        "achieved req/s | achieved items/s | p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stats in phases:
        s, phase = stats.summary, stats.phase
        loop = "open" if phase.loop == "open" else f"closed, {phase.concurrency} in flight"
        lines.append(
            f"| {phase.label} | {loop} | {_num(stats.offered_rps)} | "
            f"{_num(stats.offered_items_per_s, 1)} | {s.requests}/{stats.planned} | "
            f"{s.requests_per_s:.2f} | {s.items_per_s:.1f} | {_percentiles(s.latency)} |"
        )
    return lines


def _counts_table(phases: Sequence[PhaseStats]) -> list[str]:
    lines = ["| phase | what | count | share |", "|---|---|---|---|"]
    for stats in phases:
        s = stats.summary
        for status, count in s.by_status.items():
            lines.append(
                f"| {stats.phase.label} | status {status} | {count} | "
                f"{_share(count, s.requests)} of requests |"
            )
        if stats.unsent:
            lines.append(
                f"| {stats.phase.label} | unsent | {stats.unsent} | "
                f"{_share(stats.unsent, stats.planned)} of planned |"
            )
        for error, count in s.item_errors.items():
            lines.append(
                f"| {stats.phase.label} | item error {error} | {count} | "
                f"{_share(count, s.answered)} of items answered |"
            )
    return lines


def _streaming_table(phases: Sequence[PhaseStats]) -> list[str]:
    lines = [
        "| phase | first result p50 / p90 / p99 / max s | last result p50 / p90 / p99 / max s |",
        "|---|---|---|",
    ]
    for stats in phases:
        s = stats.summary
        first, last = _percentiles(s.first_result, " / "), _percentiles(s.latency, " / ")
        lines.append(f"| {stats.phase.label} | {first} | {last} |")
    return lines


def _model_table(phases: Sequence[PhaseStats]) -> list[str]:
    lines = [
        "| model | requests | statuses | achieved items/s | p50 s | p99 s | item errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for stats in phases:
        for model, s in sorted(stats.by_model().items()):
            latency = s.latency
            lines.append(
                f"| {model} | {s.requests} | {_counts(s.by_status)} | {s.items_per_s:.1f} | "
                f"{_num(latency.p50 if latency else None, 3)} | "
                f"{_num(latency.p99 if latency else None, 3)} | {_counts(s.item_errors)} |"
            )
    return lines


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f} %" if total else "-"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in counts.items()) or "-"


def _percentiles(p: Percentiles | None, sep: str = " | ") -> str:
    values = (p.p50, p.p90, p.p99, p.max) if p else (None,) * 4
    return sep.join(_num(v, 3) for v in values)


# --------------------------------------------------------------------------------------------
# requests.jsonl
# --------------------------------------------------------------------------------------------


def _write_requests(report: Report, path: Path) -> Path:
    """One line per recorded request: scenario, phase, and the record without its scores."""
    with path.open("w") as out:
        for result in report.results:
            for stats in result.phases:
                for record in stats.run.records:
                    row = dataclasses.asdict(record)
                    del row["scores"]
                    row = {"scenario": result.scenario.name, "phase": stats.phase.label, **row}
                    out.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(9, height), layout="constrained")
    FigureCanvasAgg(figure)
    first = figure.add_subplot(rows, 1, 1)
    return figure, [first] + [
        figure.add_subplot(rows, 1, n, sharex=first) for n in range(2, rows + 1)
    ]


def plot_latency(result: ScenarioResult, path: Path) -> Path:
    """Latency of each request over time, rolling p50/p99; sent and answered per second."""
    figure, (top, bottom) = _figure(2, 6.5)
    figure.suptitle(f"{result.scenario.name}: latency by planned send time")
    base = result.phases[0].offset_s if result.phases else 0.0
    failed_t: list[float] = []
    failed_latency: list[float] = []
    sent: list[float] = []
    answered: list[float] = []
    for n, stats in enumerate(result.phases):
        offset = stats.offset_s - base
        ok = [r for r in stats.run.records if r.ok]
        ok_t = [offset + r.scheduled_s for r in ok]
        ok_latency = [r.latency_s for r in ok]
        sent += [offset + r.sent_s for r in stats.run.records]
        answered += [offset + r.ended_s for r in ok]
        failed = [r for r in stats.run.records if not r.ok]
        failed_t += [offset + r.scheduled_s for r in failed]
        failed_latency += [r.latency_s for r in failed]
        first = n == 0  # label each kind of mark once
        top.scatter(
            ok_t, ok_latency, s=6, alpha=0.5, color="tab:blue", label="200" if first else None
        )
        streamed = [(offset + r.scheduled_s, r.first_result_s or 0.0) for r in ok if r.stream]
        if streamed:
            top.scatter(
                [t for t, _ in streamed],
                [s for _, s in streamed],
                s=8,
                marker="^",
                alpha=0.5,
                color="tab:green",
                label="first result (stream)" if first else None,
            )
        for q, style in ((50, "-"), (99, "--")):  # per phase: no line across the gaps
            xs, ys = rolling_percentile(ok_t, ok_latency, q, _window(ok_t))
            label = f"rolling p{q}" if first else None
            top.plot(xs, ys, style, color="black", linewidth=1, label=label)
        if len(result.phases) > 1:
            for axes in (top, bottom):
                axes.axvline(offset, color="0.8", linewidth=0.8)
            bottom.annotate(
                stats.phase.label,
                (offset, 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(2, 0),
                textcoords="offset points",
                fontsize=6,
                va="top",
                rotation=90,
            )
    if failed_t:
        top.scatter(failed_t, failed_latency, s=14, marker="x", color="tab:red", label="not 200")
    if answered or failed_t:
        _log_seconds(top)
    top.set_ylabel("latency (s)")
    top.legend(loc="upper left", fontsize=7)
    _per_second(bottom, sent, "sent")
    _per_second(bottom, answered, "answered 200")
    bottom.set_xlabel("time since the scenario began (s)")
    bottom.set_ylabel("requests per second")
    bottom.legend(loc="upper right", fontsize=7)
    figure.savefig(path, dpi=110)
    return path


def plot_throughput(phases: Sequence[PhaseStats], path: Path) -> Path:
    """Achieved items/s and latency p50/p99 against offered items/s (the sweep)."""
    figure, (top, bottom) = _figure(2, 7)
    points = [s for s in phases if s.offered_items_per_s is not None]
    offered = [s.offered_items_per_s or 0.0 for s in points]
    top.plot(offered, [s.summary.items_per_s for s in points], "o-", label="achieved")
    if offered:
        top.plot([0, max(offered)], [0, max(offered)], ":", color="0.5", label="achieved = offered")
    for probe in (s for s in phases if s.phase.loop == "closed"):
        label = f"closed loop ({probe.phase.label})"
        top.axhline(probe.summary.items_per_s, linestyle="--", color="tab:green", label=label)
    top.set_ylabel("scored items/s")
    top.set_title("throughput against offered load")
    top.legend(loc="upper left", fontsize=8)
    latencies = [s.summary.latency for s in points]
    for name, style in (("p50", "o-"), ("p99", "s--")):
        values = [getattr(p, name) if p else math.nan for p in latencies]
        bottom.plot(offered, values, style, label=f"latency {name} (200s)")
    _log_seconds(bottom)
    bottom.set_xlabel("offered items/s (Poisson arrivals)")
    bottom.set_ylabel("latency (s)")
    bottom.legend(loc="upper left", fontsize=8)
    for axes in (top, bottom):
        axes.set_xlim(left=0)
    figure.savefig(path, dpi=110)
    return path


def rolling_percentile(
    times: Sequence[float], values: Sequence[float], q: float, window_s: float
) -> tuple[list[float], list[float]]:
    """At each point, the q-th percentile of the values in the `window_s` before it."""
    pairs = sorted(zip(times, values, strict=True))
    xs, ys = [], []
    start = 0
    for end, (t, _) in enumerate(pairs):
        while pairs[start][0] < t - window_s:
            start += 1
        xs.append(t)
        ys.append(percentile([v for _, v in pairs[start : end + 1]], q))
    return xs, ys


def _window(times: Sequence[float]) -> float:
    if not times:
        return 1.0
    return max(1.0, (max(times) - min(times)) / 20)


def _log_seconds(axes: Axes) -> None:
    """A log scale labelled 0.1, 1, 10 (not 10^-1, 10^0, 10^1)."""
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes.yaxis.set_minor_formatter(ticker.FuncFormatter(_two_and_five))


def _two_and_five(value: float, _: int) -> str:
    """Minor log ticks: label 2x and 5x a power of ten only."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if mantissa in (2, 5) else ""


def _per_second(axes: Axes, times: Sequence[float], label: str) -> None:
    """A step line of events per second, in bins of about a sixtieth of the span."""
    if not times:
        return
    width = max(0.25, max(times) / 60)
    bins = max(1, math.ceil(max(times) / width))
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    rates = [count / width for count in counts]
    edges = [n * width for n in range(bins + 1)]
    axes.step(edges, [*rates, rates[-1]], where="post", label=label, linewidth=1)
    axes.set_ylim(bottom=0)

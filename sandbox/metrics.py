"""The sidecar's Prometheus metrics: tool calls by tool and outcome, their durations, code-run
kills by reason and the code sandboxes in use."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from rmserve.sandbox.code_run import CodeResult, CodeRunner
from rmserve.web.metrics import LATENCY_BUCKETS, HttpMetrics
from rmserve.wire.tools import ToolResult

# Code-run statuses that mean the sandbox killed the run.
KILLS = ("timeout", "cpu_limit", "memory_limit", "output_limit", "killed")


class SandboxMetrics(HttpMetrics):
    def __init__(self) -> None:
        super().__init__("sandbox")
        self.tool_calls = Counter(
            "rmserve_tool_calls",
            "tool calls by tool and outcome (ok or the error type)",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.tool_duration = Histogram(
            "rmserve_tool_call_duration_seconds",
            "time to answer a tool call, by tool",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kills = Counter(
            "rmserve_sandbox_kills",
            "code runs (programs and tests) the sandbox stopped, by reason",
            ["reason"],
            registry=self.registry,
        )

        self.code_runs_active = Gauge(
            "rmserve_sandbox_code_runs_active",
            "code sandboxes running now",
            registry=self.registry,
        )
        self.code_runs_queued = Gauge(
            "rmserve_sandbox_code_runs_queued",
            "code runs admitted and waiting for a free sandbox",
            registry=self.registry,
        )

    def watch(self, runner: CodeRunner) -> None:
        """Read the runner's occupancy at each scrape."""
        self.code_runs_active.set_function(lambda: runner.in_flight)
        self.code_runs_queued.set_function(lambda: runner.queued)

    def observe(self, result: ToolResult, known: bool) -> None:
        tool = result.tool if known else "unknown"
        outcome = result.error.type if result.error is not None else "ok"
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_duration.labels(tool).observe(result.elapsed_s)

    def count_kills(self, result: CodeResult) -> None:
        statuses: list[str] = [
            run.status for run in (result.run, *(t.run for t in result.tests)) if run
        ]
        statuses += [test.status for test in result.tests if test.run is None]  # call tests
        for status in statuses:
            if status in KILLS:
                self.kills.labels(status).inc()

"""benchmarks/tenant_fairness.py run with --quick (a tiny model, small batches, fair@32 in
embedded and distributed mode, one server or fleet at a time): every phase ran, every item
was scored, every request of B was answered, and the shares were measured and printed. Never a
performance assertion: the targets (B's latency ratios, fair / fifo throughput, shares against
the weights) live in its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"embedded:fair@32", "distributed:fair@32"}
PHASES = ["A alone", "B alone", "A + B", "shares"]

pytestmark = pytest.mark.engine


def test_quick_run_scores_everything_and_measures_shares(tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/tenant_fairness.py", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    output = completed.stdout[-4000:] + completed.stderr[-3000:]
    assert out.exists(), output
    report = json.loads(out.read_text())
    assert report["failures"] == [], output
    runs = {run["config"]: run for run in report["runs"]}
    assert set(runs) == CONFIGS, output
    for name, run in runs.items():
        assert list(run["phases"]) == PHASES, name
        for phase in run["phases"].values():
            where = (name, phase["name"], phase["errors"])
            assert not any(phase["failed"].values()), where  # no failed items
            assert phase["seconds"] > 0, where
            if phase["name"] in ("B alone", "A + B"):
                assert phase["b_requests"] > 0, where
                assert phase["b_answered"] == phase["b_requests"], where  # all answered
                assert len(phase["b_latencies"]) == phase["b_requests"], where
                assert 0 < phase["b_p50_s"] <= phase["b_p99_s"], where
            if phase["name"] in ("A alone", "A + B", "shares"):
                assert phase["items"]["A"] > 0, where
        shares = run["phases"]["shares"]
        assert shares["counted"]["A"] > 0 and shares["counted"]["B"] > 0, (name, shares)
        assert shares["items"]["B"] > 0, (name, shares)
    # The shares are measured and printed against the weights, for every configuration.
    assert "shares while both saturate" in completed.stdout
    measured = [r for r in report["ratios"] if r["ratio"] == "share / weight share"]
    assert {r["config"] for r in measured} == CONFIGS
    assert len(measured) == 2 * len(CONFIGS)  # one per tenant
    assert "ratios against targets" in completed.stdout
    for ratio in report["ratios"]:
        assert ratio["met"] in (True, False, None)
        assert ratio["value"] is None or ratio["value"] >= 0
    assert completed.returncode == 0, output

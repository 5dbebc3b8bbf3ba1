"""benchmarks/redis_wait_cost.py at tiny sizes (60 requests x 4 jobs, 4 tasks, 1 round): both
configurations ran without errors and its JSON is well-formed. Never a performance assertion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def test_tiny_run_reports_both_configurations(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/redis_wait_cost.py",
            "--requests",
            "60",
            "--jobs",
            "4",
            "--concurrency",
            "4",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "WAIT 1 / off requests/s" in completed.stdout
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {"0", "1"}
    for config in report["configs"].values():
        assert config["errors"] == 0, config
        assert config["requests_per_s"] > 0, config
        assert config["p99_ms"] >= config["p50_ms"] > 0, config
        assert len(config["rounds"]) == 1
    assert set(report["ratios"]) == {"WAIT 1 / off requests/s", "p50 latency (WAIT 1 / off)"}

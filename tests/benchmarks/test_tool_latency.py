"""benchmarks/tool_latency.py's code batch at tiny sizes (4 responses x 3 tests): it runs every
path, prints the ratio lines and finds the same verdicts on each. Never a performance assertion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rmserve.sandbox.code_run import CodeRunner

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = CodeRunner.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"bubblewrap: {UNAVAILABLE}")
PATHS = (
    "after  CodeRunner, assert tests",
    "after  CodeRunner, call tests",
    "after  unit-tests verifier",
    "plain  python -I -S -c, a process per response",
    "plain  python -I -S -c, a process per test",
)


def test_code_batch_runs_every_path_and_agrees() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/tool_latency.py",
            "--only",
            "code-batch",
            "--responses",
            "4",
            "--tests-per-response",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, output[-3000:] + completed.stderr[-3000:]
    assert "4 responses x 3 tests" in output
    assert "ratio after/today" in output
    assert output.count("ratio after/unsandboxed") == 2
    assert "rewards: identical per item and per test on all" in output
    for path in PATHS:
        assert path in output, output
    assert "sidecar p50" not in output  # --only: the HTTP section did not run

"""benchmarks/grpo_throughput.py run with --quick (tiny sizes, every system, one engine at a time):
its JSON is well-formed. Never a performance assertion: only that each system ran, scored every
item and reported sane token counts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = {"a", "b", "c", "d-prefix", "d-round_robin", "d-shared", "prm-reuse", "prm-noreuse"}
RATIOS = {
    "(c)/(a) items/s",
    "(d prefix)/(d shared) items/s",
    "(d prefix)/(d round_robin) items/s",
    "(d prefix)/(c) computed prompt tokens",
    "prm reuse on/off items/s",
}

pytestmark = pytest.mark.engine


def test_quick_run_is_well_formed(tmp_path: Path) -> None:
    out = tmp_path / "grpo.json"
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/grpo_throughput.py",
            "--quick",
            "--block-size",
            "32",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "ratios against targets" in completed.stdout
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["rows"]
    assert {row["system"] for row in rows} == SYSTEMS
    for row in rows:
        assert row["errors"] == 0 and row["items"] > 0, row
        assert len(row["scores"]) == row["items"]
        assert all(isinstance(s, float) and math.isfinite(s) for s in row["scores"]), row
        assert row["seconds"] > 0 and row["items_per_s"] > 0, row
        assert row["prompt_tokens"] > 0, row
        computed = row["computed_tokens"]
        if row["system"] == "b":  # every token computed, padding included
            assert computed >= row["prompt_tokens"], row
        elif computed is not None:  # n/a when a server does not export the cache counters
            assert 0 < computed <= row["prompt_tokens"], row
    same_items = [
        row for row in rows if row["system"] in {"b", "c", "d-prefix", "d-round_robin", "d-shared"}
    ]
    for row in same_items:  # the same token ids as (a): the same per-item token counts
        (a,) = [r for r in rows if r["system"] == "a" and r["n"] == row["n"]]
        assert row["prompt_tokens"] == a["prompt_tokens"], (row, a)
    assert {ratio["ratio"] for ratio in report["ratios"]} == RATIOS
    for ratio in report["ratios"]:
        assert ratio["met"] in (True, False, None)
        assert ratio["value"] is None or ratio["value"] > 0

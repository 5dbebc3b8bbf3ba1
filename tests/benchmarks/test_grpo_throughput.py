"""benchmarks/grpo_throughput.py run with --quick (tiny sizes, every system, one engine at a time):
its JSON is well-formed. Never a performance assertion: only that each system ran, scored every
item and reported sane token counts; with --shapes, that the trainers' per-sample traffic (verl's,
OpenRLHF's) was scored in full and that the listwise judge judged complete groups only."""

from __future__ import annotations

import itertools
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


SHAPES = ("group", "verl", "openrlhf")
SHAPE_MODELS = ("tiny-rm", "tiny-listwise")
SHAPE_RATIOS = {
    f"{shape}/group {what}"
    for shape in ("verl", "openrlhf")
    for what in ("items/s", "computed prompt tokens")
}


def test_quick_shapes_run_scores_every_item_and_judges_whole_groups(tmp_path: Path) -> None:
    """2 groups x 4 responses, each shape, (c) and (d) prefix, the tiny-rm and a listwise judge.
    A group that does not complete is given up after 30 s, and a request that waits longer than
    90 s ends as a timeout: a failure, reported, never a hang."""
    out = tmp_path / "shapes.json"
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/grpo_throughput.py",
            "--quick",
            "--n",
            "4",
            "--shapes",
            ",".join(SHAPES),
            "--block-size",
            "32",
            "--group-wait-s",
            "30",
            "--timeout-s",
            "90",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    output = completed.stdout[-3000:] + completed.stderr[-3000:]
    assert out.exists(), output
    report = json.loads(out.read_text())
    assert report["failures"] == [], output
    rows = report["rows"]
    expected = set(itertools.product(("c", "d-prefix"), SHAPE_MODELS, SHAPES))
    assert {(row["system"], row["model"], row["shape"]) for row in rows} == expected
    for row in rows:
        where = (row["system"], row["model"], row["shape"], row["error_types"], row["note"])
        assert (row["groups"], row["items"]) == (2, 8), where
        assert row["errors"] == 0, where
        assert len(row["scores"]) == row["items"], where
        assert all(isinstance(s, float) and math.isfinite(s) for s in row["scores"]), where
        assert row["seconds"] > 0 and row["items_per_s"] > 0 and row["prompt_tokens"] > 0, where
        computed = row["computed_tokens"]
        assert computed is None or 0 < computed <= row["prompt_tokens"], where
    for row in rows:
        if row["model"] != "tiny-listwise":
            assert row["checks"] == [], row
            continue
        counters, seen = row["counters"], (row["system"], row["shape"], row["note"])
        # One judge job per group, every one ok: each judged its whole group.
        assert counters["jobs_ok"] == row["groups"] and counters["jobs_not_ok"] == 0, seen
        if row["shape"] != "group":  # sent in pieces: every group assembled, none given up
            assert counters["groups_completed"] == row["groups"], seen
            assert counters["groups_timed_out"] == 0, seen
        assert row["checks"] and all(check["met"] for check in row["checks"]), row["checks"]
    assert {c["shape"] for c in report["checks"]} == set(SHAPES)
    assert all(c["met"] for c in report["checks"]), report["checks"]
    found = report["ratios"]  # printed against the targets; never asserted on
    assert {r["ratio"] for r in found} == SHAPE_RATIOS
    assert {(r["system"], r["model"]) for r in found} == {
        (system, model) for system, model, _ in expected
    }
    for ratio in found:
        assert ratio["met"] in (True, False, None)
        assert ratio["value"] is None or ratio["value"] > 0
    assert completed.returncode == 0, output

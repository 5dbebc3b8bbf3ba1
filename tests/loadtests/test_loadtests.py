"""The load-test harness (loadtests/): the suite run briefly against a real `rmserve serve` on the
tiny models, its report checked against what the generator recorded; the bounds (cancelled and
unsent requests) against a real loopback server that never answers; the loopback guard."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from loadtests.__main__ import main
from loadtests.generator import CANCELLED, CONNECT_ERROR, Request, closed_loop, open_loop
from loadtests.loopback import require_loopback
from loadtests.report import REQUESTS_FILE
from loadtests.scenarios import SCENARIOS, LoadConfig, ScenarioBuilder
from loadtests.suite import REGISTRY
from loadtests.workload import Workload
from rmserve.models.spec import load_registry
from rmserve.service.launcher import free_port

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "no-such-model"
ITEM = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}

# A few seconds per scenario (about 30 s of load in all); the mix sends many requests to a model
# the registry does not have.
SUITE_FLAGS = {
    "--duration-s": "3", "--rate": "4",
    "--burst-duration-s": "4", "--burst-s": "1", "--idle-s": "1", "--burst-rate": "8",
    "--mixed-rate": "5",
    "--mix": f"tiny-rm:2,tiny-prm:1,math:1,answer-format:1,tiny-judge:1,{UNKNOWN}:3",
    "--large-batch-sizes": "128,256", "--large-batch-max-s": "60",
    "--stream-rate": "2", "--stream-batch-size": "8",
    "--probe-s": "3", "--probe-concurrency": "8", "--sweep-fractions": "0.5,1.5",
    "--sweep-step-s": "3",
    "--drain-s": "20", "--timeout-s": "30", "--seed": "7",
}  # fmt: skip


def _sections(report: str) -> dict[str, str]:
    """report.md's scenario sections by name."""
    parts = re.split(r"^## (\S+)$", report, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _status_counts(section: str) -> Counter[tuple[str, str]]:
    """(phase, status) -> count from a section's "status" rows."""
    rows = re.findall(r"^\| ([^|]+) \| status (\S+) \| (\d+) \|", section, flags=re.MULTILINE)
    return Counter({(phase, status): int(count) for phase, status, count in rows})


@pytest.mark.engine
def test_the_suite_reports_every_request_the_generator_recorded(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    args = ["suite", "--out", str(out), *(x for pair in SUITE_FLAGS.items() for x in pair)]
    assert main(args) == 0

    pngs = {path.name for path in out.glob("*.png")}
    assert pngs == {f"latency_{name}.png" for name in SCENARIOS} | {"throughput_vs_offered.png"}
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    report = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in report

    records = [json.loads(line) for line in (out / REQUESTS_FILE).read_text().splitlines()]
    sections = _sections(report)
    assert set(sections) == {"Summary", *SCENARIOS}
    for name in SCENARIOS:
        recorded = Counter((r["phase"], str(r["status"])) for r in records if r["scenario"] == name)
        assert recorded, name
        assert _status_counts(sections[name]) == recorded, name

    # The mixed plan, rebuilt from the same seed: every request to the unknown model is a 404.
    config = LoadConfig(
        mixed_rate=5, duration_s=3, seed=7, mix=tuple(
            (name, float(weight))
            for name, weight in (part.split(":") for part in SUITE_FLAGS["--mix"].split(","))
        ),
    )  # fmt: skip
    kinds = {name: spec.kind for name, spec in load_registry(REGISTRY).models.items()}
    plan = ScenarioBuilder(config, Workload.from_file(), kinds).mixed().phases[0].plan
    planned_unknown = sum(request.model == UNKNOWN for request in plan)
    mixed = [r for r in records if r["scenario"] == "mixed"]
    assert planned_unknown > 0 and len(mixed) == len(plan)
    assert [r["model"] for r in mixed] == [request.model for request in plan]
    assert {r["status"] for r in mixed if r["model"] == UNKNOWN} == {404}
    assert sum(_status_counts(sections["mixed"]).values()) == len(plan)
    assert _status_counts(sections["mixed"])[("5 req/s", "404")] == planned_unknown
    assert f"| {UNKNOWN} | {planned_unknown} | 404: {planned_unknown} |" in sections["mixed"]

    # The known models answered (the machine may be slow: a late request may be cancelled).
    known = [r for r in records if r["model"] != UNKNOWN]
    assert {r["status"] for r in known} <= {200, "timeout", CANCELLED}
    assert sum(r["status"] == 200 for r in known) >= 0.8 * len(known)
    streamed = [r for r in records if r["scenario"] == "streaming" and r["status"] == 200]
    assert streamed and all(0 < r["first_result_s"] <= r["latency_s"] for r in streamed)
    large = [r["items"] for r in records if r["scenario"] == "large_batch"]
    assert large == [128, 256]


def test_connection_errors_are_counted_by_the_run_command(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "loadtests", "run", "--url", url, "--scenario", "steady",
         "--rate", "10", "--duration-s", "1", "--drain-s", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / REQUESTS_FILE).read_text().splitlines()]
    assert records and {r["status"] for r in records} == {CONNECT_ERROR}
    section = _sections(done.stdout)["steady"]
    assert _status_counts(section) == Counter({("10 req/s", CONNECT_ERROR): len(records)})


def test_only_loopback_urls_are_accepted() -> None:
    for url in ("http://127.0.0.1:8000", "http://127.0.0.2", "http://localhost:1", "http://[::1]"):
        require_loopback(url)
    for url in ("http://192.0.2.1:8000", "http://0.0.0.0:8000", "http://localhost.example.com",
                "http://[2001:db8::1]", "ftp://127.0.0.1", "127.0.0.1:8000"):  # fmt: skip
        with pytest.raises(ValueError):
            require_loopback(url)


async def test_the_generators_refuse_a_remote_url() -> None:
    plan = [Request(0.0, "tiny-rm", [ITEM])]
    with pytest.raises(ValueError, match="loopback"):
        await open_loop("http://192.0.2.1:8000", plan, timeout_s=1, max_duration_s=1)
    with pytest.raises(ValueError, match="loopback"):
        await closed_loop(
            "http://192.0.2.1:8000", plan, concurrency=1, timeout_s=1, max_duration_s=1
        )


def test_the_cli_refuses_a_remote_url() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests", "run", "--url", "http://192.0.2.1:8000"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A real loopback HTTP endpoint that reads requests and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes away
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_requests_in_flight_at_the_end_are_cancelled_and_counted(silent_server: str) -> None:
    plan = [Request(at, "tiny-rm", [ITEM]) for at in (0.0, 0.1, 0.2, 5.0)]
    began = time.monotonic()
    run = await open_loop(silent_server, plan, timeout_s=30, max_duration_s=1.0)
    assert time.monotonic() - began < 5
    assert [r.status for r in run.records] == [CANCELLED] * 3
    assert run.unsent == 1  # due at 5 s, after the end
    assert all(0.7 <= r.latency_s <= 2 for r in run.records)

    run = await closed_loop(silent_server, plan, concurrency=2, timeout_s=30, max_duration_s=1.0)
    assert [r.status for r in run.records] == [CANCELLED] * 2
    assert run.unsent == 2


def test_plans_are_seeded_and_bounded() -> None:
    def build(config: LoadConfig, name: str) -> list[Any]:
        kinds = {"tiny-rm": "discriminative"}
        scenario = ScenarioBuilder(config, Workload.from_file(), kinds).build(name)
        return [(r.at_s, r.model, r.items) for phase in scenario.phases for r in phase.plan]

    config = LoadConfig(rate=1000, duration_s=10, max_requests=50, seed=3)
    plan = build(config, "steady")
    assert len(plan) == 50 and all(0 <= at < 10 for at, _, _ in plan)
    assert plan == build(config, "steady")
    assert plan != build(LoadConfig(rate=1000, duration_s=10, max_requests=50, seed=4), "steady")

    bursts = LoadConfig(burst_rate=20, burst_s=1, idle_s=2, burst_duration_s=9)
    arrivals = [at for at, _, _ in build(bursts, "burst")]
    assert arrivals and all(at % 3 < 1 for at in arrivals)  # only within [0,1), [3,4), [6,7)
    with pytest.raises(ValueError):
        LoadConfig(rate=0)

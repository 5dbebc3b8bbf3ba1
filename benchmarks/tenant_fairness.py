"""Two tenants sharing one model: fair scheduling against arrival order (fifo).

    python benchmarks/tenant_fairness.py [--configs embedded:fifo,...] [--weights 3:1]
        [--shared-weights 1:1]
        [--batch-items 512] [--outstanding 2] [--group-sizes 8 16] [--b-load 0.25]
        [--b-interval-ms MS] [--a-alone-s 20] [--b-alone-s 30] [--shared-s 60] [--shares-s 40]
        [--ramp-s 3] [--prompt-tokens 200] [--response-tokens 40 120] [--hidden-size 256]
        [--layers 4] [--seed 0] [--quick] [--json PATH]

A random Llama reward model (`tiny-rm`, rmserve.models.tiny, sizes from the flags) is served,
one server per configuration, with a keys file giving each of two tenants, A and B, an API key;
they share the model at --shared-weights (1:1), but for the shares phase, where they act as
tenants A-shares and B-shares (`options.tenant`) weighted --weights (3:1). A configuration is
`MODE:SCHEDULING[@CONCURRENCY]`: MODE `embedded` (`rmserve serve`) or `distributed` (redis-
server, `rmserve gateway` and one `rmserve worker`: the same one engine, scheduled through
Redis), RMSERVE_SCHEDULING (`fair`, the default, or `fifo`, arrival order) and
RMSERVE_WORKER_CONCURRENCY (the jobs the worker holds at once; without @: the default, 2 x the
engine's max_num_seqs). Every mode runs fifo and fair, at the default concurrency and at 32
(--quick: fair at 32 only, a smoke run). Every item is a GRPO-style chat: a prompt of about
--prompt-tokens tokens shared by a group of responses of --response-tokens tokens; every group
has a prompt of its own (a fresh label in its first words), so no group finds another's prompt
in the prefix cache. Each server runs, after a warm-up, one phase after the other:

  A alone   A saturates the model: async batches (POST /v1/jobs) of --batch-items items (groups
            of 16), --outstanding of them at once, each followed on GET /v1/jobs/{id}/stream;
            a batch done, the next is sent. Its items/s over the window (after --ramp-s) is
            the model's capacity under that configuration.
  B alone   B sends GRPO groups (--group-sizes MIN MAX items sharing a prompt, one
            POST /v1/score each) open loop, one every --b-interval-ms (default: its items are
            --b-load of this server's capacity, A alone); its latency p50/p99.
  A + B     A saturating as above, B as in `B alone`: B's latencies, A's items/s, the total.
  shares    A and B both saturating with batches: the items each got over the window where
            both were backlogged, from the per-tenant counter rmserve_tenant_items_total
            (/metrics, read at the window's start and end), against --weights.

Latency counts from a request's planned send time to its answer. Alongside, from the results'
timing (queue_s: waiting in rmserve's queue; compute_s: from the worker taking the item to its
score, the engine's own queue included) and from /metrics sampled every second (jobs waiting in
rmserve's queue, held by the worker, waiting in the engine's own queue): where B's time goes,
and whether the worker kept to its cap. Ratios against the targets are printed as met / NOT met
(B p50 with A / alone <= 1.5 and p99 <= 2 for fair configurations, fifo printed for contrast;
total items/s fair / fifo >= 0.95; each tenant's share within 10% of its weight's); a B alone
whose p50 is over twice the median of all servers' is flagged as a disturbed baseline (the
machine got busier). The exit code is 0 when every item was scored and every B request answered,
1 otherwise; targets never change it. The machine is shared: figures are indicative, the load
average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks`, `loadtests` importable
    sys.path.insert(0, str(REPO))

from benchmarks import traffic_shapes  # noqa: E402
from benchmarks.grpo_throughput import RM, Group, make_groups, write_registry  # noqa: E402
from benchmarks.score_throughput import machine, parameter_count  # noqa: E402
from loadtests.machine import load_average  # noqa: E402
from loadtests.stats import percentile  # noqa: E402
from rmserve.models.rendering import ChatRenderer  # noqa: E402
from rmserve.models.spec import EngineOptions  # noqa: E402
from rmserve.service.auth import hash_key, new_key  # noqa: E402
from rmserve.service.launcher import RedisServer, ServerFailed, ServerProcess  # noqa: E402

MODES = ("embedded", "distributed")
FULL = [f"{m}:{s}{c}" for m in MODES for c in ("", "@32") for s in ("fifo", "fair")]
QUICK = [f"{m}:fair@32" for m in MODES]  # a smoke run: fifo is the full run's contrast
TENANTS = ("A", "B")
SHARES = "-shares"  # the shares phase runs as tenants A-shares and B-shares (--weights)
MAX_MODEL_LEN = 2048
A_GROUP = 16  # A's batches: groups of this many responses to one prompt
READY_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 1800.0
SAMPLE_EVERY_S = 1.0
B_LOAD_LIMIT = 0.5  # B alone above this fraction of a server's capacity is no light load
BASELINE_SPREAD = 2.0  # a B alone p50 over this times the servers' median: disturbed
GAUGES = {  # /metrics gauges sampled during the windows: what waits where
    "queue waiting": "rmserve_queue_lag",
    "worker holds": "rmserve_queue_pending",
    "engine waiting": "rmserve_engine_waiting",
}
TENANT_ITEMS = "rmserve_tenant_items_total"
T = TypeVar("T")
TARGETS = {  # name: (threshold, higher is better)
    "B p50 with A / alone": (1.5, False),
    "B p99 with A / alone": (2.0, False),
    "total items/s fair / fifo": (0.95, True),
    "share / weight share": (0.10, False),  # |measured / expected - 1|
}


# --------------------------------------------------------------------------------------------
# Workload: groups with a fresh prompt each time they are sent
# --------------------------------------------------------------------------------------------


def fresh(group: Group, label: str, size: int | None = None) -> list[dict[str, Any]]:
    """The group's first `size` items (all: None) under the group id `label`, the prompt's
    first words naming it, so that no two sends share a cached prompt (grpo_throughput.relabel
    without its tokenizing: only the items are needed here)."""
    head, renamed = f"Problem {group.id} (", f"Problem {label} ("
    out = []
    for index, item in enumerate(group.items[:size]):
        *prompt, response = item["messages"]
        if not any(head in turn["content"] for turn in prompt):
            raise ValueError(f"group {group.id}: its prompt does not name it")
        prompt = [{**turn, "content": turn["content"].replace(head, renamed)} for turn in prompt]
        out.append({"id": f"{label}-r{index}", "group": label, "messages": [*prompt, response]})
    return out


class Sender:
    """Items to send for one tenant: its pool of groups, each sent under a new label."""

    def __init__(self, tenant: str, pool: list[Group], seed: int) -> None:
        self.tenant, self.pool = tenant, pool
        self.rng = random.Random(f"{seed}-{tenant}")
        self.count = 0

    def group(self, size: int | None = None) -> list[dict[str, Any]]:
        self.count += 1
        return fresh(self.rng.choice(self.pool), f"{self.tenant}{self.count:07d}", size)

    def batch(self, items: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < items:
            out += self.group(min(A_GROUP, items - len(out)))
        return out


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The mode (embedded or distributed), RMSERVE_SCHEDULING and RMSERVE_WORKER_CONCURRENCY
    (None: the server's default)."""

    mode: str
    scheduling: str
    concurrency: int | None = None

    @property
    def name(self) -> str:
        return f"{self.mode}:{self.scheduling}" + (
            f"@{self.concurrency}" if self.concurrency else ""
        )

    @classmethod
    def parse(cls, text: str) -> Config:
        mode, _, rest = text.strip().rpartition(":")
        scheduling, _, concurrency = rest.partition("@")
        if (
            mode not in MODES
            or scheduling not in ("fair", "fifo")
            or (concurrency and not concurrency.isdigit())
        ):
            raise ValueError(
                f"{text!r}: MODE:SCHEDULING[@CONCURRENCY], e.g. embedded:fair or "
                "distributed:fifo@32"
            )
        return cls(mode, scheduling, int(concurrency) if concurrency else None)


@dataclass(frozen=True)
class Server:
    base_url: str  # where clients send requests
    metrics_urls: list[str]  # every process whose /metrics counts (summed)
    note: str


def write_keys(path: Path, shared: dict[str, float], shares: dict[str, float]) -> dict[str, str]:
    """A keys file with one key per tenant; the keys. Key A acts for tenants A (its default,
    weight `shared["A"]`) and A-shares (weight `shares["A"]`, named in `options.tenant` by the
    shares phase); key B likewise."""
    keys = {tenant: new_key() for tenant in TENANTS}
    tenants = [(t, shared[t]) for t in TENANTS] + [(t + SHARES, shares[t]) for t in TENANTS]
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"name": name, "weight": weight, "priority": "training"}
                    for name, weight in tenants
                ],
                "keys": [
                    {
                        "name": f"key-{tenant}",
                        "sha256": hash_key(key),
                        "tenants": [tenant, tenant + SHARES],
                    }
                    for tenant, key in keys.items()
                ],
            }
        )
    )
    return keys


def _wait_model_ready(
    server: ServerProcess, model: str, key: str, fleet: Sequence[ServerProcess] = ()
) -> None:
    """Wait until no model is loading (GET /startupz) and `model` is ready (the keys file
    closes /v1/models to callers without a key). `server` alone: fail if it could not load
    the model. A gateway with its `fleet`: fail if one of them exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.base_url, timeout=5, headers=headers) as client:
        while time.monotonic() < deadline:
            for process in (server, *fleet):
                if process.process.poll() is not None:
                    raise ServerFailed(
                        f"{process.log_path.name}: exited with code "
                        f"{process.process.returncode}\n{process.log_tail()}"
                    )
            try:
                if client.get("/startupz").status_code == 200:
                    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
                    status = models[model]["status"]
                    if status == "ready":
                        return
                    if status == "unavailable" and not fleet:  # it failed to load
                        raise ServerFailed(f"{model}: {models[model]['reason']}")
                    # loading, or a gateway that has not yet read its workers' states
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise ServerFailed(f"{model} not ready after {READY_TIMEOUT_S:.0f} s\n{server.log_tail()}")


@contextlib.contextmanager
def start_server(
    work: Path, config: Config, registry: Path, keys_file: Path, key: str
) -> Iterator[Server]:
    """The servers of `config`, the model ready; stopped on exit. Embedded: `rmserve serve`.
    Distributed: redis-server, `rmserve gateway` and one `rmserve worker` (one engine, as
    embedded: the same compute, scheduled through Redis). `key`: any key of the keys file (to
    ask whether the model is ready)."""
    env = {
        "RMSERVE_API_KEYS_FILE": str(keys_file),
        "RMSERVE_SCHEDULING": config.scheduling,
        "RMSERVE_LOG_LEVEL": "WARNING",
    }
    if config.concurrency is not None:
        env["RMSERVE_WORKER_CONCURRENCY"] = str(config.concurrency)
    if config.mode == "distributed":
        with _fleet(work, config, registry, env, key) as server:
            yield server
        return
    log = work / f"serve-{config.name}.log"
    server = ServerProcess(registry, log, command="serve", env=env)
    try:
        _wait_model_ready(server, RM, key)
        yield Server(server.base_url, [server.base_url], f"rmserve serve, {config.name}")
    finally:
        server.stop()


@contextlib.contextmanager
def _fleet(
    work: Path, config: Config, registry: Path, env: dict[str, str], key: str
) -> Iterator[Server]:
    folder = work / f"fleet-{config.name.replace(':', '-')}"
    folder.mkdir()
    with RedisServer(folder) as redis_server:
        redis = ["--redis-url", redis_server.url]
        worker = ServerProcess(
            registry, folder / "worker.log", command="worker", args=[*redis, "--model", RM], env=env
        )
        gateway = None
        try:
            gateway = ServerProcess(
                registry, folder / "gateway.log", command="gateway", args=redis, env=env
            )
            for server in (worker, gateway):
                server.wait_ready(READY_TIMEOUT_S)
            _wait_model_ready(gateway, RM, key, [worker])
            yield Server(
                gateway.base_url,
                [worker.base_url],  # the per-tenant counters and the engine's gauges
                f"redis + rmserve gateway + 1 rmserve worker, {config.name}",
            )
        finally:
            worker.stop()  # first: it drains, then leaves the fleet
            if gateway is not None:
                gateway.stop()


# --------------------------------------------------------------------------------------------
# Tenants' traffic
# --------------------------------------------------------------------------------------------


def _ok(result: dict[str, Any]) -> bool:
    return result.get("error") is None and result.get("score") is not None


@dataclass
class Batches:
    """A tenant's async batches: when each of its results arrived (client clock)."""

    done: list[float] = field(default_factory=list)  # perf_counter of each scored item
    sent: int = 0  # items submitted
    failed: int = 0  # items without a score (in a failed batch, or with an error)
    batches: int = 0
    errors: list[str] = field(default_factory=list)

    def between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.done)


async def saturate(
    client: httpx.AsyncClient,
    sender: Sender,
    batch_items: int,
    outstanding: int,
    stop: asyncio.Event,
    out: Batches,
    tenant: str | None = None,
) -> None:
    """Keep `outstanding` batches in the queue: each lane submits one, follows its stream to
    the end, submits the next; after `stop`, the lanes finish their batches and return.
    `tenant`: the one to act for (`options.tenant`; None: the key's default)."""
    options = {"tenant": tenant} if tenant else {}

    async def lane() -> None:
        while not stop.is_set():
            items = sender.batch(batch_items)
            out.sent += len(items)
            try:
                body = {"model": RM, "items": items, "options": options}
                response = await client.post("/v1/jobs", json=body)
                if response.status_code != 202:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                batch_id = response.json()["id"]
                got = 0
                async with client.stream("GET", f"/v1/jobs/{batch_id}/stream") as stream:
                    async for line in stream.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line)
                        got += 1
                        if _ok(result):
                            out.done.append(time.perf_counter())
                        else:
                            out.failed += 1
                            out.errors.append(str(result.get("error")))
                if got != len(items):
                    raise RuntimeError(f"batch {batch_id}: {got} results of {len(items)}")
                out.batches += 1
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                out.failed += len(items)
                out.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    await asyncio.gather(*(lane() for _ in range(outstanding)))


@dataclass(frozen=True)
class Answer:
    """One of B's POST /v1/score requests."""

    at: float  # planned send time (perf_counter)
    latency_s: float  # from `at` to the answer
    items: int
    scored: int
    queue_s: float  # mean over its items: waiting in rmserve's queue
    compute_s: float  # mean over its items: from the worker taking it to its score
    error: str | None = None


async def paced(
    client: httpx.AsyncClient,
    sender: Sender,
    sizes: tuple[int, int],
    interval_s: float,
    duration_s: float,
) -> list[Answer]:
    """Open loop: a group of a random size in `sizes` every `interval_s` for `duration_s`,
    each sent at its time whatever the earlier ones are doing; every answer awaited."""

    async def one(at: float, items: list[dict[str, Any]]) -> Answer:
        try:
            response = await client.post("/v1/score", json={"model": RM, "items": items})
            latency = time.perf_counter() - at
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                return Answer(at, latency, len(items), 0, 0.0, 0.0, error)
            results = response.json()["results"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            latency = time.perf_counter() - at
            return Answer(at, latency, len(items), 0, 0.0, 0.0, f"{type(exc).__name__}: {exc}")
        scored = sum(_ok(result) for result in results)
        timing = [result.get("timing") or {} for result in results]
        return Answer(
            at,
            latency,
            len(items),
            scored,
            sum(t.get("queue_s", 0.0) for t in timing) / max(1, len(timing)),
            sum(t.get("compute_s", 0.0) for t in timing) / max(1, len(timing)),
            None
            if scored == len(items)
            else next((str(r.get("error")) for r in results if not _ok(r)), "missing results"),
        )

    rng = random.Random(f"{sender.rng.random()}-sizes")
    start, tasks = time.perf_counter(), []
    for k in range(max(1, int(duration_s / interval_s))):
        at = start + k * interval_s
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(at, sender.group(rng.randint(*sizes)))))
    return list(await asyncio.gather(*tasks))


class Sampler:
    """/metrics of the servers: counters read at a window's start and end, gauges every
    SAMPLE_EVERY_S in between."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = urls
        self.gauges: dict[str, list[float]] = {name: [] for name in GAUGES}

    async def snapshot(self) -> traffic_shapes.Snapshot:
        return await asyncio.to_thread(traffic_shapes.snapshot, self.urls)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                try:
                    snap = await self.snapshot()
                except httpx.HTTPError:  # a missed sample; the window's counters decide
                    await asyncio.sleep(SAMPLE_EVERY_S)
                    continue
                for name, metric in GAUGES.items():
                    value = traffic_shapes.total(snap, metric, model=RM)
                    if value is not None:
                        self.gauges[name].append(value)
                await asyncio.sleep(SAMPLE_EVERY_S)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def means(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.gauges.items() if v}

    def maxima(self) -> dict[str, float]:
        return {name: max(v) for name, v in self.gauges.items() if v}


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float = 0.0  # the measured window
    items: dict[str, int] = field(default_factory=dict)  # tenant -> items scored in the window
    sent: dict[str, int] = field(default_factory=dict)  # tenant -> items sent in the phase
    failed: dict[str, int] = field(default_factory=dict)  # tenant -> items without a score
    errors: list[str] = field(default_factory=list)  # the first few
    b_latencies: list[float] = field(default_factory=list)  # B's requests, answered or not
    b_requests: int = 0
    b_answered: int = 0  # requests whose every item was scored
    b_queue_s: float | None = None  # mean over B's requests
    b_compute_s: float | None = None
    b_interval_s: float | None = None
    counted: dict[str, float] = field(default_factory=dict)  # tenant -> rmserve_tenant_items
    queue_wait_s: dict[str, float] = field(default_factory=dict)  # tenant -> mean (/metrics)
    engine_batch: float | None = None  # mean requests per engine step (/metrics)
    gauges: dict[str, float] = field(default_factory=dict)  # means of GAUGES
    gauge_max: dict[str, float] = field(default_factory=dict)

    def rate(self, tenant: str | None = None) -> float:
        items = self.items.get(tenant, 0) if tenant else sum(self.items.values())
        return items / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float | None:
        return percentile(self.b_latencies, q) if self.b_latencies else None


@dataclass
class Run:
    config: str
    mode: str
    scheduling: str
    concurrency: int | None
    note: str
    cap: int  # the jobs its worker may hold: RMSERVE_WORKER_CONCURRENCY or the default
    phases: dict[str, Phase] = field(default_factory=dict)
    seconds: float = 0.0  # the server's whole run, start to stop

    def over_cap(self) -> list[str]:
        """The phases where /metrics saw the worker hold more jobs than its cap allows: the
        cap, plus a group taken whole into one free slot (A_GROUP - 1)."""
        out = []
        for phase in self.phases.values():
            held = phase.gauge_max.get("worker holds")
            if held is not None and held > self.cap + A_GROUP - 1:
                mean = phase.gauges.get("worker holds", 0.0)
                out.append(f"{phase.name}: up to {held:.0f} (mean {mean:.0f})")
        return out


@dataclass(frozen=True)
class Plan:
    batch_items: int
    outstanding: int
    sizes: tuple[int, int]
    a_alone_s: float
    b_alone_s: float
    shared_s: float
    shares_s: float
    ramp_s: float


def _take_b(phase: Phase, answers: list[Answer]) -> None:
    phase.b_requests = len(answers)
    phase.b_answered = sum(a.error is None for a in answers)
    phase.b_latencies = [a.latency_s for a in answers]
    phase.sent["B"] = sum(a.items for a in answers)
    phase.items["B"] = sum(a.scored for a in answers)  # every answer came within the window
    phase.failed["B"] = sum(a.items - a.scored for a in answers)
    phase.errors += [a.error for a in answers if a.error][:3]
    if answers:
        phase.b_queue_s = sum(a.queue_s for a in answers) / len(answers)
        phase.b_compute_s = sum(a.compute_s for a in answers) / len(answers)


def _take_batches(phase: Phase, tenant: str, batches: Batches, start: float, end: float) -> None:
    phase.items[tenant] = batches.between(start, end)
    phase.sent[tenant] = batches.sent
    phase.failed[tenant] = batches.failed
    phase.errors += batches.errors[:3]


def _take_metrics(
    phase: Phase, before: traffic_shapes.Snapshot, after: traffic_shapes.Snapshot, suffix: str
) -> None:
    """The window's counters; tenant T's are those of tenant T + `suffix`."""
    found = traffic_shapes.delta(before, after)
    for tenant in TENANTS:
        name = tenant + suffix
        phase.counted[tenant] = (
            traffic_shapes.total(found, TENANT_ITEMS, tenant=name, outcome="ok") or 0.0
        )
        wait = "rmserve_tenant_queue_wait_seconds"
        count = traffic_shapes.total(found, wait + "_count", tenant=name)
        if count:
            phase.queue_wait_s[tenant] = (
                traffic_shapes.total(found, wait + "_sum", tenant=name) or 0.0
            ) / count
    steps = traffic_shapes.total(found, "rmserve_engine_batch_size_count", model=RM)
    if steps:
        phase.engine_batch = (
            traffic_shapes.total(found, "rmserve_engine_batch_size_sum", model=RM) or 0.0
        ) / steps


async def measure(
    phase: Phase, urls: Sequence[str], body: Awaitable[T], suffix: str = ""
) -> tuple[float, float, T]:
    """Run `body` as the phase's window: /metrics read at its start and end (each tenant's
    counters those of its name + `suffix`), its gauges sampled in between; (start, end, what
    `body` returned)."""
    sampler = Sampler(urls)
    before, start = await sampler.snapshot(), time.perf_counter()
    async with sampler.sampling():
        result = await body
    end = time.perf_counter()
    _take_metrics(phase, before, await sampler.snapshot(), suffix)
    phase.gauges, phase.gauge_max = sampler.means(), sampler.maxima()
    phase.seconds = end - start
    return start, end, result


@contextlib.asynccontextmanager
async def saturating(
    clients: dict[str, httpx.AsyncClient],
    senders: dict[str, Sender],
    tenants: Sequence[str],
    plan: Plan,
    suffix: str = "",
) -> AsyncIterator[dict[str, Batches]]:
    """These tenants saturating with batches (each acting for its name + `suffix` when
    given), each with results coming in for plan.ramp_s; on exit they stop sending and their
    batches are awaited to the end (the queue empty for the next phase)."""
    stop = asyncio.Event()
    got = {tenant: Batches() for tenant in tenants}
    tasks = [
        asyncio.create_task(
            saturate(
                clients[t],
                senders[t],
                plan.batch_items,
                plan.outstanding,
                stop,
                got[t],
                t + suffix if suffix else None,
            )
        )
        for t in tenants
    ]
    try:
        while not all(b.done or b.failed for b in got.values()):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(plan.ramp_s)
        yield got
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _phases(
    server: Server,
    keys: dict[str, str],
    senders: dict[str, Sender],
    plan: Plan,
    interval: Interval,
    run: Run,
) -> None:
    """Every phase, one after the other, on one server."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    clients = {
        tenant: httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=REQUEST_TIMEOUT_S,
            limits=limits,
        )
        for tenant, key in keys.items()
    }
    urls = server.metrics_urls
    try:
        # Warm-up, untimed: one request of A's items, a few of B's groups.
        warm = senders["A"].batch(min(plan.batch_items, 64))
        (await clients["A"].post("/v1/score", json={"model": RM, "items": warm})).raise_for_status()
        for _ in range(3):
            body = {"model": RM, "items": senders["B"].group(plan.sizes[1])}
            (await clients["B"].post("/v1/score", json=body)).raise_for_status()

        phase = run.phases["A alone"] = Phase("A alone")
        async with saturating(clients, senders, ["A"], plan) as got:
            start, end, _ = await measure(phase, urls, asyncio.sleep(plan.a_alone_s))
        _take_batches(phase, "A", got["A"], start, end)
        b_interval = interval.of(phase.rate("A"))

        phase = run.phases["B alone"] = Phase("B alone", b_interval_s=b_interval)
        b = paced(clients["B"], senders["B"], plan.sizes, b_interval, plan.b_alone_s)
        _, _, answers = await measure(phase, urls, b)
        _take_b(phase, answers)

        phase = run.phases["A + B"] = Phase("A + B", b_interval_s=b_interval)
        async with saturating(clients, senders, ["A"], plan) as got:
            b = paced(clients["B"], senders["B"], plan.sizes, b_interval, plan.shared_s)
            start, end, answers = await measure(phase, urls, b)
        _take_batches(phase, "A", got["A"], start, end)
        _take_b(phase, answers)

        phase = run.phases["shares"] = Phase("shares")
        async with saturating(clients, senders, TENANTS, plan, SHARES) as got:
            window = asyncio.sleep(plan.shares_s)
            start, end, _ = await measure(phase, urls, window, SHARES)
        for tenant in TENANTS:
            _take_batches(phase, tenant, got[tenant], start, end)
    finally:
        for client in clients.values():
            await client.aclose()


class Interval:
    """B's interval between requests: given, or set on each server from its own capacity (A
    alone) so that B's items are `load` of it: the machine is shared, and a server started
    while it is busier is slower; B's load stays light on each."""

    def __init__(self, given_s: float | None, load: float, mean_items: float) -> None:
        self.given_s, self.load, self.mean_items = given_s, load, mean_items

    def of(self, capacity: float) -> float:
        if self.given_s is not None:
            return self.given_s
        if capacity <= 0:
            raise RuntimeError("A alone scored nothing: no capacity to set B's rate from")
        return self.mean_items / (self.load * capacity)


def run_config(
    work: Path,
    config: Config,
    registry: Path,
    keys_file: Path,
    keys: dict[str, str],
    senders: dict[str, Sender],
    plan: Plan,
    interval: Interval,
    default_cap: int,
) -> Run:
    cap = config.concurrency or default_cap
    run = Run(config.name, config.mode, config.scheduling, config.concurrency, "", cap)
    started = time.perf_counter()
    with start_server(work, config, registry, keys_file, keys["A"]) as server:
        run.note = server.note
        asyncio.run(_phases(server, keys, senders, plan, interval, run))
    run.seconds = time.perf_counter() - started
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(value: float | None, name: str) -> bool | None:
    threshold, higher = TARGETS[name]
    if value is None:
        return None
    return value >= threshold if higher else value <= threshold


def ratios(runs: list[Run], weights: dict[str, float]) -> list[dict[str, Any]]:
    """Each configuration against its own alone phases, fair against fifo, shares against
    the weights. `target` False: printed for contrast (fifo), not a target."""
    out: list[dict[str, Any]] = []

    def add(config: Run, name: str, value: float | None, target: bool, note: str = "") -> None:
        threshold, higher = TARGETS.get(name, (None, True))
        out.append(
            {
                "config": config.config,
                "ratio": name,
                "value": value,
                "target": threshold if target else None,
                "higher_is_better": higher,
                "met": _verdict(value, name) if target and name in TARGETS else None,
                "note": note,
            }
        )

    by_name = {run.config: run for run in runs}
    total_weight = sum(weights.values())
    alone_p50 = sorted(
        p for run in runs if "B alone" in run.phases if (p := run.phases["B alone"].p(50))
    )
    median = alone_p50[len(alone_p50) // 2] if alone_p50 else None
    for run in runs:
        fair = run.scheduling == "fair"
        alone_a, alone_b = run.phases.get("A alone"), run.phases.get("B alone")
        shared, shares = run.phases.get("A + B"), run.phases.get("shares")
        if alone_b and shared:
            p50 = alone_b.p(50)
            disturbed = bool(median and p50 and p50 > BASELINE_SPREAD * median)
            for q in (50, 99):
                alone, with_a = alone_b.p(q), shared.p(q)
                value = with_a / alone if alone and with_a is not None else None
                note = "" if fair else "contrast"
                if disturbed:
                    note = f"B alone p50 {p50:.2f} s is over {BASELINE_SPREAD:g}x the servers' "
                    note += f"median {median:.2f} s: a disturbed baseline, not comparable"
                add(run, f"B p{q} with A / alone", value, fair and not disturbed, note)
        if alone_a and alone_b and alone_b.b_interval_s and alone_a.rate("A"):
            offered = sum(alone_b.sent.values()) / alone_b.b_requests / alone_b.b_interval_s
            load = offered / alone_a.rate("A")
            note = f"B offers {offered:.1f} items/s; A alone here: {alone_a.rate('A'):.1f}"
            if load > B_LOAD_LIMIT:
                note += (
                    f"; above {B_LOAD_LIMIT}: this server was slower than the first (machine "
                    "load?), B alone is no light baseline here"
                )
            add(run, "B offered / this capacity", load, False, note)
        if alone_a and shared and alone_a.rate("A"):
            add(run, "A items/s with B / alone", shared.rate("A") / alone_a.rate("A"), False)
            add(run, "total items/s with B / A alone", shared.rate() / alone_a.rate("A"), False)
        if fair and shared:
            fifo_names = [
                Config(run.mode, "fifo", run.concurrency).name,
                Config(run.mode, "fifo").name,
            ]
            for other in dict.fromkeys(fifo_names):
                baseline = by_name.get(other)
                base = baseline.phases.get("A + B") if baseline else None
                if base is not None and base.rate() > 0:
                    add(
                        run,
                        "total items/s fair / fifo",
                        shared.rate() / base.rate(),
                        True,
                        f"A + B of {run.config} / of {other}",
                    )
        if shares:
            counted = sum(shares.counted.values())
            for tenant, weight in weights.items():
                expected = weight / total_weight
                share = shares.counted.get(tenant, 0.0) / counted if counted else None
                value = None if share is None else abs(share / expected - 1)
                note = f"{tenant}: {_fmt(share, 3)} of the items, weight share {expected:.3f}"
                add(run, "share / weight share", value, fair, note if fair else note + "; contrast")
    return out


def report(runs: list[Run], found: list[dict[str, Any]], header: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    for line in header:
        console.print(line)
    table = Table(title="phases (items/s over each window; B's latency from its planned send)")
    columns = [
        "config", "phase", "window s", "A items/s", "B items/s", "total items/s", "B reqs ok",
        "B p50 s", "B p99 s", "B queue_s", "B compute_s", "queue waiting", "worker holds (max)",
        "engine waiting", "eng batch", "failed",
    ]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("config", "phase") else "right")
    for run in runs:
        for phase in run.phases.values():
            g, held_max = phase.gauges, phase.gauge_max.get("worker holds")
            table.add_row(
                run.config,
                phase.name,
                f"{phase.seconds:.1f}",
                f"{phase.rate('A'):.1f}" if "A" in phase.items else "-",
                f"{phase.rate('B'):.1f}" if "B" in phase.items else "-",
                f"{phase.rate():.1f}",
                f"{phase.b_answered}/{phase.b_requests}" if phase.b_requests else "-",
                _fmt(phase.p(50)),
                _fmt(phase.p(99)),
                _fmt(phase.b_queue_s),
                _fmt(phase.b_compute_s),
                _fmt(g.get("queue waiting"), 0),
                f"{_fmt(g.get('worker holds'), 0)} ({_fmt(held_max, 0)})",
                _fmt(g.get("engine waiting"), 0),
                _fmt(phase.engine_batch, 1),
                ", ".join(f"{t} {n}" for t, n in phase.failed.items() if n) or "0",
            )
    console.print(table)
    shares = Table(title="shares while both saturate (rmserve_tenant_items_total over the window)")
    for column in ("config", "A items", "B items", "A share", "B share", "client-side A:B"):
        shares.add_column(column)
    for run in runs:
        measured = run.phases.get("shares")
        if measured is None:
            continue
        total = sum(measured.counted.values())
        shares.add_row(
            run.config,
            f"{measured.counted.get('A', 0):.0f}",
            f"{measured.counted.get('B', 0):.0f}",
            _fmt(measured.counted.get("A", 0) / total if total else None, 3),
            _fmt(measured.counted.get("B", 0) / total if total else None, 3),
            f"{measured.items.get('A', 0)}:{measured.items.get('B', 0)}",
        )
    console.print(shares)
    summary = Table(title="ratios against targets")
    for column in ("config", "ratio", "value", "target", "result", "note"):
        summary.add_column(column)
    for r in found:
        if r["target"] is None:
            target, result = "-", "(reported)"
        else:
            target = f"{'>=' if r['higher_is_better'] else '<='} {r['target']}"
            result = "n/a" if r["met"] is None else ("met" if r["met"] else "NOT met")
        summary.add_row(r["config"], r["ratio"], _fmt(r["value"], 3), target, result, r["note"])
    console.print(summary)
    for run in runs:
        over = run.over_cap()
        if over:
            console.print(
                f"{run.config}: the worker held more jobs than its cap of {run.cap} "
                f"(+{A_GROUP - 1} for a group taken whole) "
                f"(rmserve_queue_pending, sampled every {SAMPLE_EVERY_S:g} s): " + "; ".join(over)
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--configs",
        help="comma-separated MODE:SCHEDULING[@WORKER_CONCURRENCY], MODE embedded or "
        f"distributed (default {','.join(FULL)}; --quick {','.join(QUICK)}); fair / fifo "
        "compares a fair configuration with the fifo one of its mode and concurrency",
    )
    parser.add_argument("--weights", default="3:1", help="A:B weights in the shares phase (3:1)")
    parser.add_argument(
        "--shared-weights",
        default="1:1",
        help="A:B weights in the other phases (1:1: B's fair share is half the model)",
    )
    parser.add_argument("--batch-items", type=int, help="items per batch of A (512; --quick 64)")
    parser.add_argument("--outstanding", type=int, help="batches in flight per tenant (2)")
    parser.add_argument(
        "--group-sizes", type=int, nargs=2, metavar=("MIN", "MAX"), help="B's groups (8 16)"
    )
    parser.add_argument(
        "--b-load",
        type=float,
        default=0.25,
        help="B's items as a fraction of each server's capacity, A alone (0.25)",
    )
    parser.add_argument(
        "--b-interval-ms", type=float, help="B's interval on every server (default: from --b-load)"
    )
    parser.add_argument("--a-alone-s", type=float, help="window of A alone (20; --quick 5)")
    parser.add_argument("--b-alone-s", type=float, help="B alone: sending for (30; --quick 5)")
    parser.add_argument("--shared-s", type=float, help="A + B: B sending for (60; --quick 6)")
    parser.add_argument("--shares-s", type=float, help="window of the shares (40; --quick 5)")
    parser.add_argument("--ramp-s", type=float, help="after the first results (3; --quick 1)")
    parser.add_argument("--prompt-tokens", type=int, help="200; --quick 60")
    parser.add_argument(
        "--response-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), help="40 120; --quick 10 30"
    )
    parser.add_argument("--hidden-size", type=int, help="multiple of 64 (256; --quick 64)")
    parser.add_argument("--layers", type=int, help="4; --quick 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    sizes: dict[str, Any] = {
        "configs": ",".join(FULL), "batch_items": 512, "outstanding": 2,
        "group_sizes": [8, 16], "a_alone_s": 20.0, "b_alone_s": 30.0, "shared_s": 60.0,
        "shares_s": 40.0, "ramp_s": 3.0, "prompt_tokens": 200, "response_tokens": [40, 120],
        "hidden_size": 256, "layers": 4,
    }  # fmt: skip
    if args.quick:
        sizes |= {
            "configs": ",".join(QUICK), "batch_items": 64, "outstanding": 2, "a_alone_s": 5.0,
            "b_alone_s": 5.0, "shared_s": 6.0, "shares_s": 5.0, "ramp_s": 1.0,
            "prompt_tokens": 60, "response_tokens": [10, 30], "hidden_size": 64, "layers": 1,
        }  # fmt: skip
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        configs = [Config.parse(text) for text in args.configs.split(",") if text.strip()]
        weights, shared = (
            dict(zip(TENANTS, (float(w) for w in text.split(":")), strict=True))
            for text in (args.weights, args.shared_weights)
        )
    except ValueError as exc:
        parser.error(f"--configs, --weights or --shared-weights: {exc}")
    if not configs or len({c.name for c in configs}) < len(configs):
        parser.error("--configs: one or more distinct configurations")
    if min(*weights.values(), *shared.values()) <= 0:
        parser.error("--weights, --shared-weights: A:B, both > 0")
    low, high = args.group_sizes
    if not 1 <= low <= high <= A_GROUP:
        parser.error(f"--group-sizes: 1 <= MIN <= MAX <= {A_GROUP}")
    r_low, r_high = args.response_tokens
    if not 1 <= r_low <= r_high or args.prompt_tokens + r_high + 100 > MAX_MODEL_LEN:
        parser.error(f"prompt + response tokens must fit max_model_len {MAX_MODEL_LEN}")
    if args.batch_items < 1 or args.outstanding < 1 or not 0 < args.b_load < 1:
        parser.error("--batch-items, --outstanding >= 1; 0 < --b-load < 1")
    if args.hidden_size % 64 or args.layers < 1:
        parser.error("--hidden-size must be a multiple of 64, --layers >= 1")
    plan = Plan(
        args.batch_items,
        args.outstanding,
        (low, high),
        args.a_alone_s,
        args.b_alone_s,
        args.shared_s,
        args.shares_s,
        args.ramp_s,
    )

    from transformers import AutoTokenizer

    from rmserve.models.tiny import make_tiny_models

    started = time.perf_counter()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="rmserve-fairness-") as tmp:
        work = Path(tmp)
        paths = make_tiny_models(
            work / "models",
            hidden_size=args.hidden_size,
            layers=args.layers,
            max_positions=MAX_MODEL_LEN,
            seed=args.seed,
        )
        options = EngineOptions(
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            kv_cache_gib=0.5,
            enforce_eager=True,
            seed=args.seed,
        )
        registry = write_registry(work / "registry.yaml", RM, paths[RM], options)
        keys_file = work / "keys.yaml"
        keys = write_keys(keys_file, shared, weights)
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(paths[RM]), MAX_MODEL_LEN, "error")
        tokens = (args.prompt_tokens, (r_low, r_high))
        senders = {
            tenant: Sender(
                tenant,
                make_groups(renderer, 8, A_GROUP, *tokens, args.seed, f"pool-{tenant}"),
                args.seed,
            )
            for tenant in TENANTS
        }
        interval = Interval(
            args.b_interval_ms / 1000 if args.b_interval_ms else None, args.b_load, (low + high) / 2
        )
        runs: list[Run] = []
        failures: list[str] = []
        for config in configs:
            print(f"running {config.name} ...", flush=True)
            begun = time.perf_counter()
            try:
                runs.append(
                    run_config(
                        work,
                        config,
                        registry,
                        keys_file,
                        keys,
                        senders,
                        plan,
                        interval,
                        2 * options.max_num_seqs,  # service.worker.worker_concurrency
                    )
                )
            except (ServerFailed, RuntimeError, OSError, httpx.HTTPError) as exc:
                failures.append(f"{config.name}: {type(exc).__name__}: {exc}")
                print(f"{config.name} failed: {exc}", file=sys.stderr, flush=True)
            print(f"{config.name} done in {time.perf_counter() - begun:.0f} s", flush=True)

        cores, cpu = machine()
        model_config = json.loads((paths[RM] / "config.json").read_text())
        load_after = load_average()
        header = [
            f"machine: {cores} cores ({cpu}); load average (1/5/15 min) before "
            + "/".join(f"{x:.2f}" for x in load_before)
            + ", after "
            + "/".join(f"{x:.2f}" for x in load_after)
            + "; shared with other jobs: figures are indicative",
            f"model: {RM}, random Llama, hidden {model_config['hidden_size']}, "
            f"{model_config['num_hidden_layers']} layers, "
            f"{parameter_count(paths[RM]) / 1e6:.2f} M parameters; engine "
            f"{options.model_dump(exclude_none=True)}",
            f"tenants A and B, class training, weights {shared['A']:g}:{shared['B']:g} (as "
            f"A-shares and B-shares {weights['A']:g}:{weights['B']:g} in the shares phase); "
            f"A: batches of {plan.batch_items} items (groups of {A_GROUP}), {plan.outstanding} "
            f"outstanding; B: groups of {low}-{high} items, one POST /v1/score every "
            + (
                f"{args.b_interval_ms:g} ms"
                if args.b_interval_ms
                else f"{args.b_load:g} x (A alone's items/s on the server) / {(low + high) / 2:g}"
                " items: "
                + ", ".join(
                    f"{run.config} {run.phases['B alone'].b_interval_s * 1000:.0f} ms"
                    for run in runs
                    if "B alone" in run.phases and run.phases["B alone"].b_interval_s
                )
            ),
            f"items: prompt ~{args.prompt_tokens} tokens, responses {r_low}-{r_high} tokens; "
            f"windows: A alone {plan.a_alone_s:g} s, B alone {plan.b_alone_s:g} s, A + B "
            f"{plan.shared_s:g} s, shares {plan.shares_s:g} s (after {plan.ramp_s:g} s ramp)",
            "configs: "
            + ", ".join(f"{run.config} ({run.seconds:.0f} s)" for run in runs)
            + "; @N: RMSERVE_WORKER_CONCURRENCY=N, none: the default (2 x max_num_seqs "
            f"= {2 * options.max_num_seqs})",
        ]
        found = ratios(runs, weights)
        report(runs, found, header)
        print(f"total {time.perf_counter() - started:.0f} s", flush=True)
        for failure in failures:
            print(f"FAILED {failure}", file=sys.stderr)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "header": header,
                        "weights": weights,
                        "shared_weights": shared,
                        "runs": [
                            {
                                **asdict(run),
                                "phases": {
                                    name: {
                                        **asdict(phase),
                                        "b_p50_s": phase.p(50),
                                        "b_p99_s": phase.p(99),
                                        "rates": {t: phase.rate(t) for t in phase.items},
                                        "total_rate": phase.rate(),
                                    }
                                    for name, phase in run.phases.items()
                                },
                            }
                            for run in runs
                        ],
                        "ratios": found,
                        "over_cap": {run.config: run.over_cap() for run in runs},
                        "failures": failures,
                        "seconds": time.perf_counter() - started,
                    },
                    indent=2,
                )
            )
    failed = any(n for run in runs for phase in run.phases.values() for n in phase.failed.values())
    unanswered = any(
        phase.b_answered < phase.b_requests for run in runs for phase in run.phases.values()
    )
    return 1 if failures or failed or unanswered else 0


if __name__ == "__main__":
    sys.exit(main())

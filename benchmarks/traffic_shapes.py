"""Trainers' request shapes for GRPO groups, and the /metrics counters that show how rmserve
handled them (used by benchmarks/grpo_throughput.py --shapes).

  group     one request per group, carrying all of its items (the baseline).
  verl      verl 0.9.1's agent loop: each sample is scored by one of 8 reward-loop workers
            chosen at random (`random.choice`, agent_loop.py:1025-1026); a worker is a Ray
            async actor (`async def compute_score`, reward_loop.py:144), so it runs the calls
            it gets concurrently. Modelled as 8 clients, each with its own httpx client; every
            sample goes to a client chosen at random (a seeded `random.Random`), and each client
            sends its samples at once, one request each (the worst case: rmserve's verl adapters
            would coalesce a worker's concurrent samples into fewer requests).
  openrlhf  OpenRLHF's remote reward model: one sample per request, every request at once (at
            least 64 connections; as many in flight as there are samples).

Every item carries `id`, `group` (verl's uid) and `group_size` (rollout.n, n_samples_per_prompt)
in every shape: the shapes differ only in how the items are split into requests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

SHAPES = ("group", "verl", "openrlhf")
PER_SAMPLE = ("verl", "openrlhf")
VERL_WORKERS = 8
OPENRLHF_MIN_CONNECTIONS = 64


def bodies(
    model: str, groups: Sequence[Sequence[dict[str, Any]]], shape: str
) -> list[dict[str, Any]]:
    """The request bodies of one round: one per group (`group`) or one per item, in the batch's
    order (the other shapes)."""
    if shape == "group":
        return [{"model": model, "items": list(items)} for items in groups]
    return [{"model": model, "items": [item]} for items in groups for item in items]


def lanes(shape: str, count: int, rng: random.Random) -> list[list[int]] | None:
    """Which client sends which request, in order: verl's 8 workers (each request to one chosen
    at random), or None: every request at once from one client."""
    if shape != "verl":
        return None
    out: list[list[int]] = [[] for _ in range(VERL_WORKERS)]
    for index in range(count):
        out[rng.choice(range(VERL_WORKERS))].append(index)
    return out


@dataclass(frozen=True)
class Sent:
    seconds: float  # wall time from the first request sent to the last response received
    results: list[dict[str, Any] | None]  # each body's response JSON (None: the request failed)
    errors: list[str]
    max_in_flight: int


async def send(
    base_url: str,
    path: str,
    sent: Sequence[dict[str, Any]],
    order: list[list[int]] | None,
    timeout_s: float,
) -> Sent:
    """POST every body: all at once from one client (`order` None), or each lane of `order`
    from its own client, the lane's requests at once. The clients are opened before the clock
    starts."""
    errors: list[str] = []
    results: list[dict[str, Any] | None] = [None] * len(sent)
    in_flight = peak = 0

    async def one(client: httpx.AsyncClient, index: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            response = await client.post(path, json=sent[index])
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            in_flight -= 1
        if response.status_code != 200:
            errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
            return
        results[index] = response.json()

    async def lane(client: httpx.AsyncClient, indices: Iterable[int]) -> None:
        await asyncio.gather(*(one(client, index) for index in indices))

    width = max(OPENRLHF_MIN_CONNECTIONS, len(sent)) + 1
    lanes_ = order if order is not None else [list(range(len(sent)))]
    clients = [
        httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=width if order is None else len(ids) + 1),
        )
        for ids in lanes_
    ]
    try:
        started = time.perf_counter()
        if order is None:
            await asyncio.gather(*(one(clients[0], index) for index in range(len(sent))))
        else:
            await asyncio.gather(*(lane(c, ids) for c, ids in zip(clients, lanes_, strict=True)))
        seconds = time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()
    return Sent(seconds, results, errors, peak)


# -- /metrics -----------------------------------------------------------------------------------

Snapshot = dict[tuple[str, frozenset[tuple[str, str]]], float]

PREFIX_QUERIES = "rmserve_engine_prefix_cache_queries_total"
PREFIX_HITS = "rmserve_engine_prefix_cache_hits_total"
GROUPS = "rmserve_groups_total"
JOBS = "rmserve_jobs_total"
GROUP_WAIT_SUM, GROUP_WAIT_COUNT = (
    "rmserve_group_wait_seconds_sum",
    "rmserve_group_wait_seconds_count",
)


def snapshot(urls: Sequence[str]) -> Snapshot:
    """Every sample of these servers' /metrics, summed over the servers (each process serves
    its own counters: the sums are exact)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, frozenset(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def delta(before: Snapshot, after: Snapshot) -> Snapshot:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(snap: Snapshot, name: str, **labels: str) -> float | None:
    """The sum of the samples named `name` with these labels; None when there is none."""
    wanted = set(labels.items())
    values = [value for (n, have), value in snap.items() if n == name and wanted <= have]
    return sum(values) if values else None


def counters(snap: Snapshot, model: str) -> dict[str, float]:
    """The cohort and job counters of `model` in a snapshot (a round's delta)."""
    out = {
        f"groups_{event}": total(snap, GROUPS, model=model, event=event) or 0.0
        for event in ("opened", "completed", "timed_out")
    }
    jobs = {
        dict(labels).get("outcome", ""): value
        for (name, labels), value in snap.items()
        if name == JOBS and dict(labels).get("model") == model
    }
    out["jobs_ok"] = jobs.pop("ok", 0.0)
    out["jobs_not_ok"] = sum(jobs.values())
    out["group_wait_sum"] = total(snap, GROUP_WAIT_SUM, model=model) or 0.0
    out["group_wait_count"] = total(snap, GROUP_WAIT_COUNT, model=model) or 0.0
    return out


def listwise_checks(
    shape: str, groups: int, items: int, scored: int, partial: int, found: dict[str, float]
) -> list[dict[str, Any]]:
    """Whether a listwise judge judged complete groups only, from a round's counters and its
    results: every per-sample group assembled (completed == groups, none timed out), one judge
    job per group and all ok, every item scored, none flagged partial_group."""

    def check(name: str, value: float, expected: float) -> dict[str, Any]:
        return {"check": name, "value": value, "expected": expected, "met": value == expected}

    out = []
    if shape in PER_SAMPLE:
        out += [
            check("groups completed", found["groups_completed"], groups),
            check("groups timed out", found["groups_timed_out"], 0),
        ]
    out += [
        check("judge jobs ok", found["jobs_ok"], groups),
        check("judge jobs not ok", found["jobs_not_ok"], 0),
        check("items scored", scored, items),
        check("items flagged partial_group", partial, 0),
    ]
    return out

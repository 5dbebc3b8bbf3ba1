"""A poison item and a 4x overload, on real processes: a redis-server, a gateway and tiny-rm
workers, clients sending requests and async batches of items with known scores.

Poison: an item that crashes every worker process that takes it (a test-only sitecustomize on
the workers' PYTHONPATH makes Worker._score call os._exit(1) on it, as a segfault would), while
a supervisor thread restarts each dead worker (as an orchestrator would) and two clients keep
sending innocent items. A job whose worker died holding it is scored alone, so each later crash
takes no innocent job with it; after RMSERVE_MAX_DELIVERIES deliveries it is dead-lettered and
its item answered with the error `dead_lettered`. Every innocent item is answered once with its
score, and the fleet scores again within RECOVERY_S.

Overload: a small RMSERVE_QUEUE_CAPACITY, workers slowed to a known throughput (the same
sitecustomize adds a fixed delay before each item is scored: a slower model, so that the clients
on this 2-core machine can offer about 4 times what the workers score), small clients retrying
refusals every 0.2 s, and a client of requests larger than the capacity that honours
Retry-After. Only 200, 202, 429 with Retry-After (and 413 for a request over the item limit);
every admitted item answered once with its score; the large requests get in within a bounded
number of attempts; the backlog stays below the capacity plus one request; a request is
admitted again promptly once the load stops."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from rmserve.service.launcher import ServerProcess
from rmserve.service.queue.redis_streams import dead_key
from tests.distributed.conftest import Fleet, jobs_done, stream_lines, wait_for_workers
from tests.distributed.traffic import POOL, Load, Sent, check, reference

pytestmark = pytest.mark.engine

MODEL = "tiny-rm"

# Loaded by the worker processes of these tests only (PYTHONPATH), never by the gateway or the
# test process: it wraps Worker._score when rmserve.service.worker is imported.
SITECUSTOMIZE = r'''"""Test instrumentation of tests/distributed/test_poison_and_overload.py, on the
PYTHONPATH of that test's worker processes only. When rmserve.service.worker is imported,
Worker._score is wrapped: an item whose JSON holds $CHAOS_POISON_MARKER kills the process (its
engine processes first, then os._exit(1): a crash, as a segfault would be), and each item
waits $CHAOS_SCORE_DELAY_S before it is scored (a slower model). Events go to $CHAOS_RECORD."""

import asyncio
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

TARGET = "rmserve.service.worker"
MARKER = os.environ.get("CHAOS_POISON_MARKER", "")
DELAY_S = float(os.environ.get("CHAOS_SCORE_DELAY_S") or 0)
RECORD = os.environ.get("CHAOS_RECORD", "")


def record(line):
    if RECORD:
        with open(RECORD, "a") as out:
            out.write(line + "\n")


def die(worker, job):
    """Record the jobs this worker's queue holds (they are redelivered), then crash."""
    held = getattr(getattr(worker, "_queue", None), "_in_flight", None)
    count = sum(len(r) for r in held.values()) if isinstance(held, dict) else -1
    record(f"poisoned {os.getpid()} {job.id} {job.deliveries} {count}")
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:
        pass
    os._exit(1)


def patch(module):
    original = module.Worker._score

    async def _score(self, job):
        if MARKER and MARKER in job.item.model_dump_json():
            die(self, job)
        if DELAY_S:
            await asyncio.sleep(DELAY_S)
        return await original(self, job)

    module.Worker._score = _score
    record(f"patched {os.getpid()}")


class PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        patch(module)


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = PatchingLoader(spec.loader)
                    return spec
        return None


sys.meta_path.insert(0, PatchOnImport())

# Run the sitecustomize this one shadows, if there is one further down the path.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_other = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _other is not None and _other.loader is not None:
    _other.loader.exec_module(importlib.util.module_from_spec(_other))
'''


def hooked(tmp_path: Path, **env: str) -> dict[str, str]:
    """Worker settings whose PYTHONPATH (the test process's, if any, kept behind) starts with a
    directory holding SITECUSTOMIZE; its events are appended to tmp_path / "chaos.log"."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "CHAOS_RECORD": str(tmp_path / "chaos.log"), **env}


def chaos_log(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "chaos.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def assert_patched(tmp_path: Path, workers: list[ServerProcess]) -> None:
    patched = {int(event[1]) for event in chaos_log(tmp_path) if event[0] == "patched"}
    assert {w.process.pid for w in workers} <= patched, (patched, chaos_log(tmp_path))


# -- a poison item -------------------------------------------------------------------------

POISON = "POISON-PILL"
MAX_DELIVERIES = 3
# From the poison's answer to a new request answered, at most: a request routed to the worker
# the poison killed last waits until that worker is seen gone (service.fleet.STALE_S, 10 s) and
# another reads its stream.
RECOVERY_S = 20.0
POISON_ITEM = {"id": "poison", "messages": [
    {"role": "user", "content": f"{POISON}: a question whose answer crashes the engine"},
    {"role": "assistant", "content": "an answer"},
]}  # fmt: skip


class Supervisor(threading.Thread):
    """Keeps as many workers running as it was given: each that dies is replaced by a new one
    with the same settings, started at once (an orchestrator restarting a crashed pod)."""

    def __init__(self, fleet: Fleet, workers: list[ServerProcess], env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.fleet, self.env = fleet, env
        self.watched = list(workers)
        self.deaths: list[tuple[float, int, int]] = []  # (when, pid, exit code)
        self.restarts: list[float] = []  # when each replacement was started
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self._children: dict[int, list[psutil.Process]] = {}

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                for server in list(self.watched):
                    if server.process.poll() is None:
                        with contextlib.suppress(psutil.Error):
                            children = psutil.Process(server.process.pid).children(recursive=True)
                            self._children[server.process.pid] = children
                        continue
                    self.watched.remove(server)
                    self.deaths.append(
                        (time.monotonic(), server.process.pid, server.process.returncode)
                    )
                    for child in self._children.pop(server.process.pid, []):
                        with contextlib.suppress(psutil.Error):
                            child.kill()  # an engine process the crash left behind
                    if not self.halt.is_set():
                        self.watched.append(self._replace())
                self.halt.wait(0.1)
        except BaseException as exc:
            self.error = exc

    def _replace(self) -> ServerProcess:
        """Start a worker without waiting for it to be ready (Fleet.workers waits, in a thread
        of its own); one at a time, so that each gets its own log."""
        count = len(self.fleet.processes)
        starting = threading.Thread(target=self._start_one, daemon=True)
        starting.start()
        while len(self.fleet.processes) == count and starting.is_alive():
            time.sleep(0.01)
        assert len(self.fleet.processes) > count, "a replacement worker did not start"
        self.restarts.append(time.monotonic())
        return self.fleet.processes[count]

    def _start_one(self) -> None:
        # A replacement may die before it is seen ready (it takes the poison on its first
        # fetch): Fleet.workers then fails, and the supervisor sees the death and replaces it.
        with contextlib.suppress(BaseException):
            self.fleet.workers(1, **self.env)


def test_a_poison_item_is_dead_lettered_and_takes_no_innocent_item_with_it(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path)
    env = hooked(tmp_path, CHAOS_POISON_MARKER=POISON, RMSERVE_MAX_DELIVERIES=str(MAX_DELIVERIES))
    stop = threading.Event()
    clients: list[Load] = []
    supervisor: Supervisor | None = None
    try:
        gateway = fleet.gateway()
        workers = fleet.workers(2, **env)
        assert_patched(tmp_path, workers)
        with httpx.Client(base_url=gateway.base_url, timeout=300) as http:
            wait_for_workers(http, MODEL, 2)
            scores = reference(http)
            supervisor = Supervisor(fleet, workers, env)
            supervisor.start()
            # While no worker is up, admitted requests wait for the restarted ones (~40 s).
            clients = [Load(gateway.base_url, i, stop, timeout_s=240) for i in range(2)]
            try:
                for client in clients:
                    client.start()
                time.sleep(2)
                siblings = POOL[:6]
                request = {
                    "model": MODEL,
                    "items": [*siblings[:3], POISON_ITEM, *siblings[3:]],
                    "options": {"timeout_s": 240, "stream": True},
                }
                sent_at = time.monotonic()
                results: list[dict[str, Any]] = []
                waited: dict[int, float] = {}  # seconds from sending to each item's result
                with http.stream("POST", "/v1/score", json=request) as response:
                    assert response.status_code == 200, response.read()
                    for result in stream_lines(response):
                        results.append(result)
                        waited[result["index"]] = round(time.monotonic() - sent_at, 1)
                answered_at = time.monotonic()
                # The fleet scores again: a new request, answered with the reference scores.
                probe = POOL[20:24]
                while True:
                    again = http.post("/v1/score", json={"model": MODEL, "items": probe})
                    if again.status_code == 200 or time.monotonic() - answered_at > 60:
                        break
                    assert again.status_code == 503, again.text  # no worker ready yet
                    time.sleep(0.5)
                recovered_s = time.monotonic() - answered_at
                time.sleep(3)  # and the clients' traffic goes on for a while
            finally:
                stop.set()
                for client in clients:
                    client.join(300)
                supervisor.halt.set()
                supervisor.join(30)
            assert not any(client.is_alive() for client in clients), "a client hangs"
            assert supervisor.error is None, supervisor.error
            sent = [s for client in clients for s in client.sent]
            statuses = check(http, sent, scores, allowed={503})
            # The poison: dead-lettered, and said so; its siblings scored as the reference.
            poisoned = [r for r in results if r["id"] == POISON_ITEM["id"]]
            assert len(poisoned) == 1 and poisoned[0]["index"] == 3, results
            error = poisoned[0]["error"]
            assert error is not None and error["type"] == "dead_lettered", poisoned
            assert f"max_deliveries {MAX_DELIVERIES}" in error["message"], error
            innocent = [r for r in results if r["id"] != POISON_ITEM["id"]]
            assert again.status_code == 200, again.text
            answers = [
                Sent(sent_at, 200, [item["id"] for item in siblings], innocent),
                Sent(answered_at, 200, [item["id"] for item in probe], again.json()["results"]),
            ]
            check(http, answers, scores, allowed=set())
        dead = redis.Redis.from_url(fleet.redis.url).xrange(dead_key(MODEL))
        assert len(dead) == 1 and POISON.encode() in dead[0][1][b"job"], dead  # nothing else

        # The poison killed the workers that took it, and nothing else did.
        deaths = supervisor.deaths
        events = chaos_log(tmp_path)
        crashes = [e for e in events if e[0] == "poisoned"]  # pid, job, deliveries, jobs held
        assert sorted(pid for _, pid, _ in deaths) == sorted(int(e[1]) for e in crashes), (
            deaths,
            events,
        )
        assert all(code == 1 for _, _, code in deaths), deaths
        assert 2 <= len(crashes) <= MAX_DELIVERIES, crashes
        assert len({e[2] for e in crashes}) == 1, crashes  # one job: the poison
        # Redelivered, it was scored alone: its later crashes took no other job with them.
        for _, _, _, deliveries, held in crashes:
            if int(deliveries) > 1:
                assert held == "1", crashes
        assert recovered_s < RECOVERY_S, recovered_s
        refused = [s for s in sent if s.status == 503]
        for s in refused:  # while every worker was down or loading
            assert "loading" in s.message or "no worker" in s.message, s
        slow = [s for s in sent if s.finished - s.started > 30]
        timeline = {
            "deaths": [round(at - sent_at, 1) for at, _, _ in deaths],
            "restarts": [round(at - sent_at, 1) for at in supervisor.restarts],
            "answered (by index)": dict(sorted(waited.items())),
        }
        print(
            f"poison: {len(crashes)} workers killed (deliveries, jobs held: "
            f"{[tuple(e[3:]) for e in crashes]}); seconds after it was sent: {timeline}; scored "
            f"again {recovered_s:.1f} s after its answer; client statuses {dict(statuses)}; "
            f"client answers later than 30 s: {[round(s.finished - s.started) for s in slow]}"
        )
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.halt.set()
        fleet.stop()


# -- overload ------------------------------------------------------------------------------

CAPACITY = 16  # RMSERVE_QUEUE_CAPACITY
MAX_ITEMS = 64  # RMSERVE_MAX_ITEMS_PER_REQUEST
LARGE = 20  # items of a large request: more than the capacity
SCORE_DELAY_S = 0.1  # the slowed model: 2 workers x 2 jobs at a time, 0.1 s each
WORKER_CONCURRENCY = 2
SMALL_CLIENTS = 10
OVERLOAD_S = 30.0
# Admission is blind to a request's size: an attempt gets in when the backlog is below the
# capacity, which under 4x overload is about one attempt in 4, large or small. So a large
# request needs about 4 attempts (2 s apart: Retry-After), more than 25 with odds 0.75^25, under
# 1 in 1000; a policy that waited for room for the whole request would never admit it.
MAX_LARGE_ATTEMPTS = 25
OVERLOAD_RECOVERY_S = 5.0  # from the end of the load to a request admitted, at most


class Large(threading.Thread):
    """Requests of LARGE pool items one after another; a refused one is sent again after its
    Retry-After, as a well-behaved client does. Each request's attempts, in order."""

    def __init__(self, base_url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base_url, self.stop = base_url, stop
        self.requests: list[list[Sent]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self.stop.is_set():
                first = len(self.requests) * 5
                chosen = [POOL[(first + k) % len(POOL)] for k in range(LARGE)]
                attempts: list[Sent] = []
                self.requests.append(attempts)
                while True:
                    sent = send(client, chosen)
                    attempts.append(sent)
                    if sent.status != 429 or self.stop.is_set():
                        break
                    time.sleep(float(sent.retry_after or 1))
                time.sleep(0.5)


def send(client: httpx.Client, chosen: list[dict[str, Any]]) -> Sent:
    """POST /v1/score of `chosen`, recorded as traffic.Load records its requests."""
    sent = Sent(time.monotonic(), 0, [item["id"] for item in chosen])
    try:
        response = client.post("/v1/score", json={"model": MODEL, "items": chosen})
        sent.status = response.status_code
        if response.status_code == 200:
            sent.results = response.json()["results"]
        else:
            sent.message = response.json()["error"]["message"]
            sent.retry_after = response.headers.get("retry-after")
    except httpx.HTTPError as exc:
        sent.status = type(exc).__name__
    sent.finished = time.monotonic()
    return sent


class Backlog(threading.Thread):
    """Samples the model's backlog (pending + lag, from the gateway's /metrics)."""

    def __init__(self, base_url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base_url, self.stop = base_url, stop
        self.samples: list[float] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.stop.wait(0.2):
                with contextlib.suppress(httpx.HTTPError):
                    text = client.get("/metrics").text
                    self.samples.append(
                        sum(
                            sample.value
                            for family in text_string_to_metric_families(text)
                            if family.name in ("rmserve_queue_pending", "rmserve_queue_lag")
                            for sample in family.samples
                            if sample.labels.get("model") == MODEL
                        )
                    )


def test_four_times_overload_refuses_with_429_loses_nothing_and_starves_no_large_request(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        gateway = fleet.gateway(
            RMSERVE_QUEUE_CAPACITY=str(CAPACITY), RMSERVE_MAX_ITEMS_PER_REQUEST=str(MAX_ITEMS)
        )
        env = hooked(
            tmp_path,
            CHAOS_SCORE_DELAY_S=str(SCORE_DELAY_S),
            RMSERVE_WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
        )
        workers = fleet.workers(2, **env)
        assert_patched(tmp_path, workers)
        with httpx.Client(base_url=gateway.base_url, timeout=120) as http:
            wait_for_workers(http, MODEL, 2)
            scores = reference(http)  # 24 items: more than the capacity, on an idle queue
            # What the workers score, idle: one request of 40 items.
            started = time.monotonic()
            probe = http.post("/v1/score", json={"model": MODEL, "items": (POOL * 2)[:40]})
            assert probe.status_code == 200, probe.text
            throughput = 40 / (time.monotonic() - started)

            small = [Load(gateway.base_url, i, stop) for i in range(SMALL_CLIENTS)]
            large = Large(gateway.base_url, stop)
            backlog = Backlog(gateway.base_url, stop)
            threads = [*small, large, backlog]
            done_before = sum(jobs_done(worker) for worker in workers)
            began = time.monotonic()
            try:
                for thread in threads:
                    thread.start()
                time.sleep(OVERLOAD_S / 2)
                # Over the item limit: 413 naming it, full queue or not.
                too_many = http.post(
                    "/v1/score", json={"model": MODEL, "items": (POOL * 3)[: MAX_ITEMS + 1]}
                )
                time.sleep(OVERLOAD_S / 2)
            finally:
                stop.set()
            ended = time.monotonic()
            scored = sum(jobs_done(worker) for worker in workers) - done_before
            # Once the load stops, a request is admitted again promptly.
            while True:
                again = send(http, POOL[:4])
                if again.status != 429 or time.monotonic() - ended > 30:
                    break
                time.sleep(float(again.retry_after or 1))
            recovered_s = again.started - ended
            for thread in threads:
                thread.join(120)
            assert not any(thread.is_alive() for thread in threads), "a client hangs"

            sent = [s for client in small for s in client.sent]
            attempts = [s for request in large.requests for s in request]
            statuses = check(http, [*sent, *attempts, again], scores, allowed={429})
        refused = [s for s in [*sent, *attempts] if s.status == 429]
        assert refused, statuses  # the queue did fill up
        for s in refused:
            assert "is full" in s.message and s.retry_after is not None, s
            assert int(s.retry_after) >= 1, s
        assert too_many.status_code == 413, too_many.text
        assert too_many.json()["error"]["type"] == "payload_too_large", too_many.text
        assert f"the limit is {MAX_ITEMS}" in too_many.json()["error"]["message"], too_many.text

        # About 4x: the items the clients tried to send, against those the workers scored.
        window = ended - began
        offered = sum(len(s.ids) for s in [*sent, *attempts] if s.started < ended) / window
        served = scored / window
        # Large requests were admitted (whole: all LARGE items scored), none after more than
        # MAX_LARGE_ATTEMPTS attempts; the last, cut short by the end of the load, not yet
        # past the bound either.
        tries = [len(request) for request in large.requests if request[-1].status == 200]
        assert tries, large.requests
        assert all(len(request) <= MAX_LARGE_ATTEMPTS for request in large.requests), tries
        # Admitted while the backlog is below the capacity: it stays below capacity plus the
        # largest request.
        assert backlog.samples and max(backlog.samples) < CAPACITY + LARGE, backlog.samples
        assert again.status == 200 and recovered_s < OVERLOAD_RECOVERY_S, (again, recovered_s)
        small_rate = sum(s.status in (200, 202) for s in sent) / len(sent)
        print(
            f"overload: idle throughput {throughput:.0f} items/s; under load {served:.0f} "
            f"items/s scored, {offered:.0f} items/s sent ({offered / served:.1f}x); statuses "
            f"{dict(statuses)}; large requests admitted after {tries} attempts (an attempt "
            f"admitted: large {len(tries) / len(attempts):.0%}, small {small_rate:.0%}); backlog "
            f"max {max(backlog.samples):.0f}; admitted {recovered_s:.1f} s after the load stopped"
        )
        assert offered > 3 * served, (offered, served)
    finally:
        stop.set()
        fleet.stop()

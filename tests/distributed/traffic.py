"""Client traffic for fault-injection tests of a fleet: clients send requests of items with
known scores (a reference scored before any fault), some as async batches, and record what came
back; `check` asserts the promises: nothing accepted lost, answered twice or scored wrong, and
no status but the documented ones."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.distributed.conftest import items, stream_lines

POOL = items(24, prefix="f")  # every request scores items of this pool: a known score each


@dataclass
class Sent:
    started: float
    status: int | str  # HTTP status, or the transport error's name
    ids: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    batch: str | None = None
    retry_after: str | None = None  # a refusal's Retry-After header
    finished: float = 0.0  # when the answer (or the transport error) came


class Load(threading.Thread):
    """Back-to-back requests of 4 pool items; every 5th an async batch (POST /v1/jobs).
    `timeout_s`: how long the client waits for an answer before it gives up."""

    def __init__(
        self, base_url: str, number: int, stop: threading.Event, timeout_s: float = 60
    ) -> None:
        super().__init__(daemon=True)
        self.base_url, self.number, self.stop = base_url, number, stop
        self.timeout_s = timeout_s
        self.sent: list[Sent] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                chosen = [POOL[(self.number * 7 + n * 4 + k) % len(POOL)] for k in range(4)]
                path = "/v1/jobs" if n % 5 == 0 else "/v1/score"
                sent = Sent(time.monotonic(), 0, [item["id"] for item in chosen])
                try:
                    response = client.post(path, json={"model": "tiny-rm", "items": chosen})
                    sent.status = response.status_code
                    body = response.json()
                    if response.status_code == 200:
                        sent.results = body["results"]
                    elif response.status_code == 202:
                        sent.batch = body["id"]
                    else:
                        sent.message = body["error"]["message"]
                        sent.retry_after = response.headers.get("retry-after")
                except httpx.HTTPError as exc:
                    sent.status = type(exc).__name__
                sent.finished = time.monotonic()
                self.sent.append(sent)
                if sent.status not in (200, 202):
                    time.sleep(0.2)


def reference(http: httpx.Client) -> dict[str, float]:
    """Every pool item's score, before any fault."""
    response = http.post("/v1/score", json={"model": "tiny-rm", "items": POOL})
    assert response.status_code == 200, response.text
    return {r["id"]: r["score"] for r in response.json()["results"]}


def check(
    http: httpx.Client, sent: list[Sent], scores: dict[str, float], allowed: set[int | str]
) -> Counter[int | str]:
    """Statuses within `allowed` (a refusal says why); every answered item scored once, as
    the reference; every accepted batch completes, each item once, as the reference (read
    through `http`). The statuses, counted."""
    statuses = Counter(s.status for s in sent)
    assert set(statuses) <= allowed | {200, 202}, statuses
    for s in sent:
        if isinstance(s.status, int) and s.status not in (200, 202):
            assert s.message, s  # the error envelope says why
        if s.status == 200:
            assert Counter(r["id"] for r in s.results) == Counter(s.ids), s  # none twice
            for r in s.results:
                assert r["error"] is None, r
                assert r["score"] == pytest.approx(scores[r["id"]], abs=1e-4), r
    for s in sent:
        if s.batch is None:
            continue
        with http.stream("GET", f"/v1/jobs/{s.batch}/stream", timeout=90) as response:
            got = list(stream_lines(response))
        assert sorted(r["index"] for r in got) == [0, 1, 2, 3], (s, got)
        for r in got:
            assert r["error"] is None, r
            assert r["score"] == pytest.approx(scores[s.ids[r["index"]]], abs=1e-4), r
    return statuses


def first_admitted_after(sent: list[Sent], mark: float) -> float | None:
    """Seconds from `mark` to the first request sent after it that was admitted."""
    after = [s.started - mark for s in sent if s.status in (200, 202) and s.started > mark]
    return min(after) if after else None

"""Async batches: 202 with an id at once, then poll or stream the results; unknown ids are 404."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

ITEMS = [
    {"id": f"b{n}", "messages": [{"role": "user", "content": f"batch question {n}"},
                                 {"role": "assistant", "content": "answer " * (n + 1)}]}
    for n in range(12)
]  # fmt: skip


def test_submit_poll_and_stream(client: httpx.Client) -> None:
    submitted = client.post("/v1/jobs", json={"model": "tiny-rm", "items": ITEMS})
    assert submitted.status_code == 202
    batch = submitted.json()
    assert batch["total"] == len(ITEMS) and batch["results"] is None
    assert submitted.headers["location"] == f"/v1/jobs/{batch['id']}"

    with client.stream("GET", f"/v1/jobs/{batch['id']}/stream") as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        streamed = [json.loads(line) for line in response.iter_lines() if line]
    assert sorted(r["index"] for r in streamed) == list(range(len(ITEMS)))

    status: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{batch['id']}").json()
        if status["status"] == "done":
            break
        time.sleep(0.1)
    assert status["status"] == "done" and status["finished"] == len(ITEMS)
    assert [r["id"] for r in status["results"]] == [item["id"] for item in ITEMS]
    direct = client.post("/v1/score", json={"model": "tiny-rm", "items": ITEMS[:2]}).json()
    assert [r["score"] for r in status["results"][:2]] == [r["score"] for r in direct["results"]]


def test_batch_errors(client: httpx.Client) -> None:
    missing = client.get("/v1/jobs/batch-doesnotexist")
    assert missing.status_code == 404 and "no batch" in missing.json()["error"]["message"]
    assert client.get("/v1/jobs/batch-doesnotexist/stream").status_code == 404
    bad = client.post("/v1/jobs", json={"model": "nope", "items": ITEMS[:1]})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"

"""With the result cache on (the test server sets RMSERVE_RESULT_CACHE_TTL_S), a retried item is
answered from the cache: same score, `cached: true`, no new job for the engine."""

from __future__ import annotations

import re
import uuid

import httpx


def ok_jobs(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    match = re.search(r'rmserve_jobs_total\{model="tiny-rm",outcome="ok"\} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


def test_a_retried_item_comes_from_the_cache(client: httpx.Client) -> None:
    messages = [
        {"role": "user", "content": f"unique question {uuid.uuid4().hex}"},
        {"role": "assistant", "content": "an answer"},
    ]
    first = client.post(
        "/v1/score", json={"model": "tiny-rm", "items": [{"id": "a", "messages": messages}]}
    )
    (fresh,) = first.json()["results"]
    assert fresh["cached"] is False and fresh["error"] is None
    jobs_before = ok_jobs(client)
    retry = {"model": "tiny-rm", "items": [
        {"id": "b", "messages": messages, "metadata": {"attempt": 2}},
        {"id": "c", "messages": messages, "reference": "changes the key"},
    ]}  # fmt: skip
    hit, miss = client.post("/v1/score", json=retry).json()["results"]
    assert hit["cached"] is True and hit["id"] == "b" and hit["index"] == 0
    assert hit["score"] == fresh["score"]
    assert miss["cached"] is False and miss["id"] == "c" and miss["index"] == 1
    assert ok_jobs(client) == jobs_before + 1  # only the miss reached the engine

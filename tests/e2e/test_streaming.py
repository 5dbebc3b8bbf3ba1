"""options.stream: results as NDJSON lines as each item finishes, same scores as a plain call."""

from __future__ import annotations

import json

import httpx

LONG = "The quick brown fox jumps over the lazy dog. " * 60
ITEMS = [
    {"id": f"item-{n}", "messages": [{"role": "user", "content": f"question {n}"},
                                     {"role": "assistant", "content": "answer " * (n + 1)}]}
    for n in range(6)
] + [{"id": "too-long", "messages": [{"role": "user", "content": LONG}]}]  # fmt: skip


def test_stream_gives_one_ndjson_line_per_item(client: httpx.Client) -> None:
    plain = client.post("/v1/score", json={"model": "tiny-rm", "items": ITEMS}).json()["results"]
    with client.stream(
        "POST", "/v1/score", json={"model": "tiny-rm", "items": ITEMS, "options": {"stream": True}}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert sorted(line["index"] for line in lines) == list(range(len(ITEMS)))
    by_index = {line["index"]: line for line in lines}
    for expected in plain:
        got = by_index[expected["index"]]
        assert got["id"] == expected["id"]
        assert got["score"] == expected["score"]
        assert got["error"] == expected["error"]
    assert by_index[6]["error"]["type"] == "too_long"


def test_stream_errors_before_any_line_are_plain_http_errors(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score", json={"model": "nope", "items": ITEMS[:1], "options": {"stream": True}}
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"

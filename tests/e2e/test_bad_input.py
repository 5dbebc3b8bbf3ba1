"""Bad input gets a 4xx in the error envelope naming the problem; the service keeps serving."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import MAX_BYTES, MAX_ITEMS

OK_ITEM = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "param"}
    error: dict[str, Any] = body["error"]
    return error


def with_messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "tiny-rm", "items": [{"messages": list(messages)}]}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "tiny-rm", "items": []}, "items", "at least 1"),
        ({"model": "tiny-rm"}, "items", "required"),
        ({"items": [OK_ITEM]}, "model", "required"),
        ({"model": "tiny-rm", "items": [OK_ITEM], "extra": 1}, "extra", "not permitted"),
        (with_messages(user(123)), "items.0.messages.0.content", "valid string"),
        (
            with_messages(user([{"type": "audio", "audio": "x"}])),
            "items.0.messages.0.content.0.type",
            "audio",
        ),
        (with_messages({"role": "robot", "content": "beep"}), "items.0.messages.0.role", "robot"),
        (
            with_messages(user([image("data:image/png;base64,@@not-base64@@")])),
            "items.0.messages.0.content.0.image_url.url",
            "base64",
        ),
        (
            with_messages(user([image("https://example.com/cat.png")])),
            "items.0.messages.0.content.0.image_url.url",
            "only data: URLs",
        ),
        (
            with_messages(user([image("data:text/plain;base64,aGk=")])),
            "items.0.messages.0.content.0.image_url.url",
            "must hold an image",
        ),
        (
            with_messages(user("q"), {"role": "tool", "tool_call_id": "nope", "content": "x"}),
            "items.0.messages",
            "does not match any earlier assistant tool_calls",
        ),
        (
            {"model": "tiny-rm", "items": [{**OK_ITEM, "group_size": 4}]},
            "items.0.group_size",
            "give `group` too",
        ),
        (
            {"model": "tiny-rm", "items": [OK_ITEM], "options": {"group_wait_s": 0}},
            "options.group_wait_s",
            "greater than 0",
        ),
        (
            {"model": "tiny-rm", "items": [OK_ITEM], "options": {"timeout_s": -1}},
            "options.timeout_s",
            "greater than 0",
        ),
        (
            {"model": "tiny-rm", "items": [OK_ITEM], "options": {"aggregate": "min"}},
            "options.aggregate",
            "process reward models",
        ),
        (
            {"model": "tiny-prm", "items": [OK_ITEM], "options": {"aggregate": "median"}},
            "options.aggregate",
            "median",
        ),
    ],
)
def test_invalid_request_is_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], param: str, says: str
) -> None:
    error = error_of(client.post("/v1/score", json=body), 422)
    assert error["param"] == param
    assert param in error["message"]
    assert says in error["message"]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score",
        content=b'{"model": "tiny-rm", "items": [',
        headers={"content-type": "application/json"},
    )
    error = error_of(response, 400)
    assert error["type"] == "invalid_json"
    assert "not valid JSON" in error["message"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/score", json={"model": "nope", "items": [OK_ITEM]}), 404)
    assert error["param"] == "model"
    assert "'nope' does not exist" in error["message"] and "tiny-rm" in error["message"]


def test_too_many_items_is_413(client: httpx.Client) -> None:
    body = {"model": "tiny-rm", "items": [OK_ITEM] * (MAX_ITEMS + 1)}
    error = error_of(client.post("/v1/score", json=body), 413)
    assert error["param"] == "items"
    assert f"limit is {MAX_ITEMS}" in error["message"]


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = {"model": "tiny-rm", "items": [{"messages": [user("x" * MAX_BYTES)]}]}
    error = error_of(client.post("/v1/score", json=big), 413)
    assert "exceeds the limit" in error["message"]


def test_unknown_route_and_wrong_method_use_the_envelope(client: httpx.Client) -> None:
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "not_found"
    assert error_of(client.get("/v1/score"), 405)["type"] == "method_not_allowed"


def test_images_on_a_text_model_are_an_item_error(client: httpx.Client) -> None:
    items = [
        {
            "id": "img",
            "messages": [
                user(
                    [
                        {"type": "text", "text": "what is this?"},
                        image(f"data:image/png;base64,{PNG}"),
                    ]
                )
            ],
        },
        {"id": "ok", **OK_ITEM},
    ]
    response = client.post("/v1/score", json={"model": "tiny-rm", "items": items})
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["error"]["type"] == "unsupported_content" and first["score"] is None
    assert second["error"] is None and isinstance(second["score"], float)


def test_service_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    client.post(
        "/v1/score", content=b"\xff\xfe garbage", headers={"content-type": "application/json"}
    )
    client.post("/v1/score", json={"model": "tiny-rm", "items": [{"messages": "nope"}]})
    response = client.post("/v1/score", json={"model": "tiny-rm", "items": [OK_ITEM]})
    assert response.status_code == 200
    assert response.json()["results"][0]["error"] is None


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    def chunks():  # no Content-Length: the body arrives chunked
        yield b'{"model": "tiny-rm", "items": [{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BYTES // 65536 + 2):
            yield b"x" * 65536
        yield b'"}]}]}'

    response = client.post(
        "/v1/score", content=chunks(), headers={"content-type": "application/json"}
    )
    error = error_of(response, 413)
    assert f"exceeds the limit of {MAX_BYTES}" in error["message"]

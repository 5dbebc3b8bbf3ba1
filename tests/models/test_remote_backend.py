"""The remote judge backend against a real HTTP server on loopback that scripts its answers:
retries (429, 5xx, timeouts, refused connections), errors per item, samples as separate
requests, the API key, structured outputs in the body, and the concurrency limit."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rmserve.models.base import RequestOptions
from rmserve.models.engine import SamplingRequest
from rmserve.models.errors import ModelLoadError
from rmserve.models.generative.backends import first_turn
from rmserve.models.generative.judge import GenerativeModel
from rmserve.models.generative.prompts import JudgePrompt
from rmserve.models.generative.remote import RemoteBackend
from rmserve.models.spec import GenerativeSpec, RemoteJudge
from rmserve.service.launcher import free_port
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory

PROMPT_TOKENS = 11
RATE_IT = first_turn("Rate it.", 0)
SAMPLING = SamplingRequest(temperature=1.0, top_p=0.9, max_tokens=64, seed=None)


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # None: a chat completion built from the request; str: sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def completion_for(request: dict[str, Any]) -> dict[str, Any]:
    """A chat completion whose token count tells the requests apart: seed + 1 tokens."""
    seed = request.get("seed")
    tokens = 1 if seed is None else seed + 1
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"seed {seed}: \\boxed{{7}}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_TOKENS + tokens,
        },
    }


class Endpoint:
    """A threaded HTTP server: `script(i)` is the answer to the i-th request (from 0)."""

    def __init__(self) -> None:
        self.script: Callable[[int], Answer] = lambda _: Answer()
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = json.loads(raw)
                with endpoint._lock:
                    index = len(endpoint.requests)
                    endpoint.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    answer = endpoint.script(index)
                    time.sleep(answer.delay_s)
                finally:
                    with endpoint._lock:
                        endpoint.in_flight -= 1
                payload = answer.body if answer.body is not None else completion_for(body)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    try:
        yield server
    finally:
        server.close()


def backend(endpoint: Endpoint, **options: Any) -> RemoteBackend:
    return RemoteBackend.from_spec(
        RemoteJudge(base_url=endpoint.base_url, model="judge-model", **options)
    )


async def judge_error(remote: RemoteBackend, sampling: SamplingRequest = SAMPLING) -> ItemError:
    with pytest.raises(ItemError) as caught:
        await remote.chat(RATE_IT, sampling)
    return caught.value


async def test_a_judgement_is_one_chat_completion(endpoint: Endpoint) -> None:
    remote = backend(endpoint)
    judged = await remote.chat(RATE_IT, SAMPLING)
    (request,) = endpoint.requests
    assert request["path"] == "/v1/chat/completions"  # base_url joined without "//"
    assert request["body"] == {
        "model": "judge-model",
        "messages": [{"role": "user", "content": "Rate it."}],
        "temperature": 1.0,
        "top_p": 0.9,
        "max_tokens": 64,
        "n": 1,
    }  # no seed when none is given, no structured outputs without a regex
    assert "authorization" not in {name.lower() for name in request["headers"]}
    (completion,) = judged.completions
    assert completion.text == "seed None: \\boxed{7}" and completion.tokens == 1
    assert completion.finish_reason == "stop" and judged.prompt_tokens == PROMPT_TOKENS
    assert remote.max_model_len == 32768
    remote.shutdown()


async def test_a_trailing_slash_in_base_url_is_not_doubled(endpoint: Endpoint) -> None:
    remote = RemoteBackend.from_spec(
        RemoteJudge(base_url=endpoint.base_url + "/", model="m", max_model_len=2048)
    )
    await remote.chat(RATE_IT, SAMPLING)
    assert endpoint.requests[0]["path"] == "/v1/chat/completions"
    assert remote.max_model_len == 2048


async def test_429_is_retried_honoring_retry_after(endpoint: Endpoint) -> None:
    endpoint.script = lambda i: (
        Answer(429, "slow down", {"Retry-After": "0"}) if i < 2 else Answer()
    )
    remote = backend(endpoint, max_retries=3)
    start = time.monotonic()
    judged = await remote.chat(RATE_IT, SAMPLING)
    assert len(endpoint.requests) == 3
    assert judged.completions[0].text.endswith("\\boxed{7}")
    # Retry-After: 0 replaced the backoff (0.5 s then 1 s).
    assert time.monotonic() - start < 1.0


async def test_5xx_forever_is_remote_unavailable_after_all_retries(endpoint: Endpoint) -> None:
    endpoint.script = lambda _: Answer(503, "overloaded", {"Retry-After": "0"})
    error = await judge_error(backend(endpoint, max_retries=2))
    assert error.code == "remote_unavailable"
    assert "503" in error.message and "overloaded" in error.message
    assert len(endpoint.requests) == 3


async def test_retries_back_off_exponentially_without_retry_after(endpoint: Endpoint) -> None:
    endpoint.script = lambda i: Answer(500, "boom") if i < 2 else Answer()
    start = time.monotonic()
    await backend(endpoint, max_retries=2).chat(RATE_IT, SAMPLING)
    elapsed = time.monotonic() - start
    assert len(endpoint.requests) == 3
    assert 1.4 <= elapsed < 3.0  # 0.5 s + 1 s


async def test_a_refused_connection_is_retried_then_unavailable() -> None:
    remote = RemoteBackend.from_spec(
        RemoteJudge(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=1)
    )
    start = time.monotonic()
    error = await judge_error(remote)
    assert error.code == "remote_unavailable" and "ConnectError" in error.message
    assert "2 attempt" in error.message
    assert time.monotonic() - start >= 0.45  # one backoff of 0.5 s


async def test_a_timeout_is_retried(endpoint: Endpoint) -> None:
    endpoint.script = lambda i: Answer(delay_s=1.0) if i == 0 else Answer()
    judged = await backend(endpoint, timeout_s=0.3, max_retries=1).chat(RATE_IT, SAMPLING)
    assert len(endpoint.requests) == 2 and judged.completions[0].tokens == 1
    endpoint.script = lambda _: Answer(delay_s=1.0)
    error = await judge_error(backend(endpoint, timeout_s=0.3, max_retries=0))
    assert error.code == "remote_unavailable" and "Timeout" in error.message
    assert len(endpoint.requests) == 3


async def test_context_length_400_is_too_long_without_retry(endpoint: Endpoint) -> None:
    message = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains "
        "3000 input tokens, which exceeds this limit even without any output tokens."
    )
    body = {"error": {"message": message, "type": "BadRequestError", "code": 400}}
    endpoint.script = lambda _: Answer(400, body)
    error = await judge_error(backend(endpoint, max_retries=3))
    assert error.code == "too_long" and "maximum context length" in error.message
    assert len(endpoint.requests) == 1


async def test_other_4xx_are_remote_errors_without_retry(endpoint: Endpoint) -> None:
    endpoint.script = lambda _: Answer(401, '{"error": "Unauthorized"}' + " padding" * 200)
    error = await judge_error(backend(endpoint, max_retries=3))
    assert error.code == "remote_error"
    assert "401" in error.message and "Unauthorized" in error.message
    assert len(error.message) < 400  # a short excerpt of the 1.6 kB body
    assert len(endpoint.requests) == 1
    endpoint.script = lambda _: Answer(400, {"error": {"message": "unknown field"}})
    error = await judge_error(backend(endpoint, max_retries=3))
    assert error.code == "remote_error" and "unknown field" in error.message
    assert len(endpoint.requests) == 2


async def test_an_answer_without_choices_is_a_remote_error(endpoint: Endpoint) -> None:
    endpoint.script = lambda _: Answer(200, {"choices": [], "usage": {"prompt_tokens": 3}})
    error = await judge_error(backend(endpoint))
    assert error.code == "remote_error" and "choices" in error.message
    endpoint.script = lambda _: Answer(200, "<html>not json</html>")
    error = await judge_error(backend(endpoint))
    assert error.code == "remote_error" and "not json" in error.message


async def test_samples_are_separate_requests_with_exact_token_counts(endpoint: Endpoint) -> None:
    sampling = SamplingRequest(temperature=1.0, top_p=1.0, max_tokens=64, seed=5, n=3)
    judged = await backend(endpoint).chat(RATE_IT, sampling)
    assert len(endpoint.requests) == 3
    assert all(r["body"]["n"] == 1 for r in endpoint.requests)
    # Each request its own seed (one seed would draw one sample three times).
    assert sorted(r["body"]["seed"] for r in endpoint.requests) == [5, 6, 7]
    assert [c.text for c in judged.completions] == [f"seed {s}: \\boxed{{7}}" for s in (5, 6, 7)]
    assert [c.tokens for c in judged.completions] == [6, 7, 8]
    assert judged.prompt_tokens == 3 * PROMPT_TOKENS


async def test_a_failed_sample_fails_the_item_and_stops_the_others(endpoint: Endpoint) -> None:
    def script(i: int) -> Answer:  # the first request is refused; the others would be retried
        if i == 0:
            return Answer(401, "no")
        return Answer(503, "busy", {"Retry-After": "0"}, delay_s=0.3)

    endpoint.script = script
    sampling = SamplingRequest(temperature=1.0, top_p=1.0, max_tokens=8, seed=None, n=3)
    error = await judge_error(backend(endpoint, max_retries=3), sampling)
    assert error.code == "remote_error" and "401" in error.message
    await asyncio.sleep(0.6)
    assert len(endpoint.requests) == 3  # the other two were cancelled, not retried


async def test_structured_outputs_field_carries_the_regex(endpoint: Endpoint) -> None:
    sampling = SamplingRequest(1.0, 1.0, 64, seed=0, regex=r"[a-z ]{0,40}\\boxed\{[1-9]\}")
    await backend(endpoint).chat(RATE_IT, sampling)
    body = endpoint.requests[0]["body"]
    assert body["structured_outputs"] == {"regex": r"[a-z ]{0,40}\\boxed\{[1-9]\}"}
    assert body["seed"] == 0


async def test_the_api_key_from_an_environment_variable(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSERVE_TEST_REMOTE_KEY", "key-from-env")
    await backend(endpoint, api_key_env="RMSERVE_TEST_REMOTE_KEY").chat(RATE_IT, SAMPLING)
    assert endpoint.requests[0]["headers"]["Authorization"] == "Bearer key-from-env"


async def test_the_api_key_from_a_file(endpoint: Endpoint, tmp_path: Path) -> None:
    key_file = tmp_path / "judge.key"
    key_file.write_text("  key-from-file  \nsecond line ignored\n")
    await backend(endpoint, api_key_file=str(key_file)).chat(RATE_IT, SAMPLING)
    assert endpoint.requests[0]["headers"]["Authorization"] == "Bearer key-from-file"


def test_a_missing_or_empty_key_fails_the_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RMSERVE_TEST_NO_SUCH_KEY", raising=False)
    url = "http://127.0.0.1:9/v1"
    with pytest.raises(ModelLoadError, match="RMSERVE_TEST_NO_SUCH_KEY"):
        RemoteBackend.from_spec(
            RemoteJudge(base_url=url, model="m", api_key_env="RMSERVE_TEST_NO_SUCH_KEY")
        )
    monkeypatch.setenv("RMSERVE_TEST_NO_SUCH_KEY", "")
    with pytest.raises(ModelLoadError, match="RMSERVE_TEST_NO_SUCH_KEY"):
        RemoteBackend.from_spec(
            RemoteJudge(base_url=url, model="m", api_key_env="RMSERVE_TEST_NO_SUCH_KEY")
        )
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for path in (empty, tmp_path / "missing.key"):
        with pytest.raises(ModelLoadError, match=str(path)):
            RemoteBackend.from_spec(RemoteJudge(base_url=url, model="m", api_key_file=str(path)))


async def test_at_most_max_concurrency_requests_in_flight(endpoint: Endpoint) -> None:
    endpoint.script = lambda _: Answer(delay_s=0.2)
    remote = backend(endpoint, max_concurrency=2)
    start = time.monotonic()
    results = await asyncio.gather(
        *(remote.chat(first_turn(f"item {i}", 0), SAMPLING) for i in range(6))
    )
    assert len(results) == 6 and len(endpoint.requests) == 6
    assert endpoint.max_in_flight == 2  # the limit, and used
    assert time.monotonic() - start >= 0.55  # three waves of 0.2 s


def test_shutdown_after_the_loop_is_gone_and_reuse_in_a_new_loop(endpoint: Endpoint) -> None:
    remote = backend(endpoint)
    first = asyncio.run(remote.chat(RATE_IT, SAMPLING))
    remote.shutdown()  # the loop that owned the client is closed: no exception
    remote.shutdown()
    second = asyncio.run(remote.chat(RATE_IT, SAMPLING))  # a new client in the new loop
    assert first == second and len(endpoint.requests) == 2


async def test_shutdown_inside_the_running_loop_closes_the_client(endpoint: Endpoint) -> None:
    remote = backend(endpoint)
    await remote.chat(RATE_IT, SAMPLING)
    client = remote._client
    assert client is not None
    remote.shutdown()
    await asyncio.sleep(0.05)
    assert client.is_closed


async def test_a_vision_judge_gets_the_items_images_before_the_prompt(endpoint: Endpoint) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(picture, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    item = Trajectory.model_validate({
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What color?"},
                                         {"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "Red."},
        ],
    })  # fmt: skip

    def judge(vision: bool) -> GenerativeModel:
        remote = RemoteJudge(base_url=endpoint.base_url, model="judge-model", vision=vision)
        spec = GenerativeSpec(name="j", kind="generative", remote=remote)
        return GenerativeModel(spec, RemoteBackend.from_spec(remote), JudgePrompt.load(
            "principles_pointwise"))  # fmt: skip

    reward = await judge(vision=True).score(item, RequestOptions())
    assert reward.score == 7
    (content,) = (m["content"] for m in endpoint.requests[0]["body"]["messages"])
    assert content[0] == {"type": "image_url", "image_url": {"url": url}}
    assert content[1]["type"] == "text" and "User: What color? [image 1]" in content[1]["text"]
    with pytest.raises(ItemError, match="reads text only") as caught:
        await judge(vision=False).score(item, RequestOptions())
    assert caught.value.code == "unsupported_content" and len(endpoint.requests) == 1

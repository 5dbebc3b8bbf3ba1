"""The verl reward functions against a scripted loopback server."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from rmserve.client import RewardServiceError, verl
from tests.client import Reply, ScriptedServer, error_reply


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        monkeypatch.setenv("RMSERVE_URL", scripted.url)
        monkeypatch.setenv("RMSERVE_MODEL", "rm")
        monkeypatch.setenv("RMSERVE_API_KEY", "secret")
        yield scripted
        verl.reset_client()


def test_compute_score_sends_prompt_solution_and_reference(server: ScriptedServer) -> None:
    score = verl.compute_score("gsm8k", "abcd", "42", {"prompt": "2+2?", "split": "train"})
    assert score == 4.0 and isinstance(score, float)
    assert server.bodies[0]["model"] == "rm"
    assert server.bodies[0]["items"] == [
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "abcd"},
            ],
            "reference": "42",
            "metadata": {"data_source": "gsm8k"},
        }
    ]
    assert server.auth == ["Bearer secret"]


def test_prompt_as_chat_messages_and_no_extra_info(server: ScriptedServer) -> None:
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    verl.compute_score("chat", "yo", "hello", extra_info={"prompt": prompt})
    verl.compute_score("chat", "yo", "hello")
    first, second = (body["items"][0]["messages"] for body in server.bodies)
    assert first == [*prompt, {"role": "assistant", "content": "yo"}]
    assert second == [{"role": "assistant", "content": "yo"}]


def test_item_error_gives_zero_and_a_warning(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "rm", "results": [{"index": 0, "error": {"type": "timeout", "message": "m"}}]}
    server.script(Reply(body=body))
    with caplog.at_level(logging.WARNING, logger="rmserve.client.verl"):
        assert verl.compute_score("gsm8k", "abcd", "42") == 0.0
    assert "1 of 1 items got no score" in caplog.text and "timeout: 1" in caplog.text


def test_batch_variant_keeps_order(server: ScriptedServer) -> None:
    solutions = ["a" * n for n in range(100)]
    scores = verl.compute_score_batch(
        data_sources=["d"] * 100,
        solution_strs=solutions,
        ground_truths=[{"answer": n} for n in range(100)],
        extra_infos=[{"prompt": f"q{n}"} for n in range(100)],
    )
    assert scores == [float(n) for n in range(100)]
    assert server.requests == 2  # batches of 64
    first = next(body for body in server.bodies if len(body["items"]) == 64)
    assert first["items"][1]["reference"] == '{"answer": 1}'


def test_one_client_is_reused(server: ScriptedServer) -> None:
    verl.compute_score("d", "x", "y")
    client = verl.shared_client()
    verl.compute_score("d", "x", "y")
    assert verl.shared_client() is client


def test_model_from_reward_kwargs(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RMSERVE_MODEL")
    verl.compute_score("d", "x", "y", model="other", options={"timeout_s": 5})
    assert server.bodies[0]["model"] == "other"
    assert server.bodies[0]["options"] == {"timeout_s": 5, "stream": False}


def test_missing_model_is_a_clear_error(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RMSERVE_MODEL")
    with pytest.raises(RuntimeError, match="set RMSERVE_MODEL"):
        verl.compute_score("d", "x", "y")
    assert server.requests == 0


def test_request_failure_raises(server: ScriptedServer) -> None:
    server.script(error_reply(404, "not_found", "no model 'rm'", param="model"))
    with pytest.raises(RewardServiceError, match="no model"):
        verl.compute_score("d", "x", "y")


def test_bad_prompt_and_lengths() -> None:
    with pytest.raises(TypeError, match="prompt"):
        verl.build_item("d", "x", "y", {"prompt": 3})
    with pytest.raises(ValueError, match="length"):
        verl.compute_score_batch(["d"], ["x", "y"], ["z"])

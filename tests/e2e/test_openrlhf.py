"""OpenRLHF's /get_reward end to end, as OpenRLHF v0.11.0 (3c3be62) calls it: a real `rmserve
serve` with the tiny reward model (real vLLM CPU engine) and weight-free verifiers, queries built
as the trainer builds them (tests/service/actor_text.py: real actor chat templates, left
truncation, decode with special tokens), labels of every JSON type, and the `on_error` policies.

OpenRLHF's call (openrlhf/utils/agent.py:322-356): one sample per request,
`{"query": [q], "prompts": [p], "labels": [l]}`; it reads `rewards`, `scores` and `extra_logs`
(each list reduced to its first element) and retries any status >= 400 five times."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ready_client, start_server
from tests.distributed.conftest import Fleet, wait_for_workers
from tests.e2e import reference as ref
from tests.service.actor_text import GEMMA, LLAMA3, QWEN25, Actor, openrlhf_sample

pytestmark = pytest.mark.engine

REGISTRY = """\
models:
  tiny-rm:
    kind: discriminative
    weights: ${RMSERVE_TINY_MODELS}/tiny-rm
    engine: {max_model_len: 512, dtype: float32, kv_cache_gib: 0.25, enforce_eager: true}
    options: {too_long: error}
  math:
    kind: math
  unit-tests:
    kind: code_tests
    options: {timeout_s: 5}
"""
QUESTION = "What is 12 * 7 + 16? Show the steps."
RESPONSE = "12 * 7 = 84.\n\n84 + 16 = 100.\n\nThe answer is \\boxed{100}."
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def service(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    workdir = tmp_path_factory.mktemp("openrlhf")
    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    # The result cache on: an item scored raw and the same item scored with the template must
    # not share an entry (test_raw_scores_the_query_verbatim scores both).
    env = {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "RMSERVE_OPENRLHF_MODEL": "tiny-rm",
        "RMSERVE_RESULT_CACHE_TTL_S": "600",
    }
    with ready_client(registry, workdir, env) as client:
        yield client


def get_reward(
    client: httpx.Client,
    queries: list[str],
    prompts: list[str] | None = None,
    labels: list[Any] | None = None,
    **params: Any,
) -> httpx.Response:
    """The body OpenRLHF sends (agent.py:322-356), one list entry per sample; on_error=report
    goes in the body (a client that reads `errors`: the URL refuses it)."""
    body: dict[str, Any] = {"query": queries}
    if params.get("on_error") == "report":
        body["on_error"] = params.pop("on_error")
    if prompts is not None:
        body["prompts"] = prompts
    if labels is not None:
        body["labels"] = labels
    return client.post("/get_reward", params=params, json=body)


def rewards(response: httpx.Response) -> list[float | None]:
    assert response.status_code == 200, response.text
    data = response.json()
    n = len(data["rewards"])
    assert data["scores"] == data["rewards"]
    assert all(len(values) == n for values in data["extra_logs"].values()), data
    assert len(data["errors"]) == n
    values: list[float | None] = data["rewards"]
    return values


def score(client: httpx.Client, model: str, item: dict[str, Any], **options: Any) -> float:
    response = client.post("/v1/score", json={"model": model, "items": [item], "options": options})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["error"] is None, result
    value: float = result["score"]
    return value


@pytest.mark.parametrize("actor", [QWEN25, LLAMA3, GEMMA], ids=lambda a: a.template)
def test_a_templated_query_scores_as_its_conversation(service: httpx.Client, actor: Actor) -> None:
    conversation = [{"role": "user", "content": QUESTION}]
    sample = openrlhf_sample(actor, conversation, RESPONSE, keep_prompt_tokens=12)
    assert not sample.query.startswith(sample.prompt)  # left-truncated, as OpenRLHF may
    (reward,) = rewards(get_reward(service, [sample.query], [sample.prompt], [""]))
    system = [{"role": "system", "content": QWEN_SYSTEM}] if actor is QWEN25 else []
    messages = [*system, *conversation, {"role": "assistant", "content": RESPONSE}]
    assert reward == pytest.approx(score(service, "tiny-rm", {"messages": messages}), abs=1e-5)
    # The old way (the prompt, markers and all, as the user turn, under the reward model's own
    # template) is a different input and a different score.
    whole = openrlhf_sample(actor, conversation, RESPONSE)
    (auto,) = rewards(get_reward(service, [whole.query], [whole.prompt]))
    (plain,) = rewards(get_reward(service, [whole.query], [whole.prompt], query_format="plain"))
    assert auto is not None and plain is not None
    assert auto == pytest.approx(reward, abs=1e-5) and abs(plain - auto) > 1e-3


def test_raw_scores_the_query_verbatim(service: httpx.Client, tiny_models: dict[str, Path]) -> None:
    sample = openrlhf_sample(QWEN25, [{"role": "user", "content": QUESTION}], RESPONSE)
    (raw,) = rewards(get_reward(service, [sample.query], [sample.prompt], query_format="raw"))
    # OpenRLHF's serve_rm: tokenizer(query, add_special_tokens=False), no chat template.
    path = tiny_models["tiny-rm"]
    (expected,) = ref.sequence_logits(path, ref.token_ids(path, sample.query))
    assert raw == pytest.approx(expected, abs=1e-4)
    # /v1/score's options.render raw: the messages' text, concatenated, tokenized as is.
    prompt, response = sample.prompt, sample.query[len(sample.prompt) :]
    split = {"messages": [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": response}]}  # fmt: skip
    assert score(service, "tiny-rm", split, render="raw") == pytest.approx(raw, abs=1e-5)
    assert abs(score(service, "tiny-rm", split) - raw) > 1e-3  # the template changes the input


def test_raw_is_refused_for_models_that_do_not_read_text(service: httpx.Client) -> None:
    refused = get_reward(service, ["\\boxed{4}"], labels=["4"], model="math", query_format="raw")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "query_format" and "discriminative" in error["message"]
    item = {"messages": [{"role": "assistant", "content": "\\boxed{4}"}], "reference": "4"}
    body = {"model": "math", "items": [item], "options": {"render": "raw"}}
    scored = service.post("/v1/score", json=body)
    assert scored.status_code == 422 and scored.json()["error"]["param"] == "options.render"


def test_raw_keeps_the_models_too_long_policy(service: httpx.Client) -> None:
    long = "<|im_start|>user\n" + "the quick brown fox " * 400 + "<|im_end|>\n"
    failed = get_reward(service, [long], query_format="raw")
    assert failed.status_code == 422, failed.text
    assert "query[0]: too_long" in failed.json()["error"]["message"]
    reported = get_reward(service, [long, "<|im_start|>user\nhi<|im_end|>\n"],
                          query_format="raw", on_error="report")  # fmt: skip
    values = rewards(reported)
    assert values[0] is None and values[1] is not None
    assert reported.json()["errors"][0]["type"] == "too_long"


def test_labels_of_every_json_type(service: httpx.Client) -> None:
    prompt = "Solve it."
    answers = ["\\boxed{72}", "\\boxed{1/2}", "\\boxed{9}", "\\boxed{4}", "\\boxed{3}"]
    labels: list[Any] = [72, 0.5, "9", {"reference": "4", "metadata": {"source": "gsm8k"}}, "7"]
    values = rewards(
        get_reward(service, [prompt + a for a in answers], [prompt] * 5, labels, model="math")
    )
    assert values == [1.0, 1.0, 1.0, 1.0, 0.0]
    code = "```python\ndef add(a, b):\n    return a + b\nprint('ready')\n```"
    tests = [
        "assert add(2, 3) == 5",
        {"input": "", "output": "ready"},
        {"stdin": "", "expected_stdout": "ready"},
        {"code": "assert add(1, 1) == 3"},
    ]
    (passed,) = rewards(get_reward(service, [prompt + code], [prompt], [tests], model="unit-tests"))
    assert passed == pytest.approx(3 / 4)
    (in_object,) = rewards(
        get_reward(service, [prompt + code], [prompt], [{"tests": tests[:2]}], model="unit-tests")
    )
    assert in_object == 1.0


@pytest.mark.parametrize(
    ("label", "why"),
    [
        (True, "boolean"),
        ({"answer": "4"}, "unknown fields ['answer']"),
        ([42], "a test is test code"),
        ([{"input": "1"}], "expected_stdout"),
        ({"reference": [1]}, "a reference is a string or a finite number"),
    ],
)
def test_a_malformed_label_is_a_422_naming_it(service: httpx.Client, label: Any, why: str) -> None:
    response = get_reward(service, ["a", "b"], labels=["4", label], model="math")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"].startswith("labels[1]") and why in error["message"], error


def test_no_label_is_no_reference_and_never_a_reward(service: httpx.Client) -> None:
    queries, labels = ["\\boxed{4}", "\\boxed{4}", "\\boxed{4}", "\\boxed{4}"], ["4", "", None, " "]
    failed = get_reward(service, queries, labels=labels, model="math")
    assert failed.status_code == 422, failed.text
    message = failed.json()["error"]["message"]
    assert "3 queries not scored" in message and "query[1]: missing_reference" in message
    reported = get_reward(service, queries, labels=labels, model="math", on_error="report")
    assert rewards(reported) == [1.0, None, None, None]
    errors = reported.json()["errors"]
    assert errors[0] is None and {e["type"] for e in errors[1:]} == {"missing_reference"}
    assert set(errors[1]) == {"type", "message"}  # the contract rmserve.client.openrlhf reads
    flagged = get_reward(service, queries, labels=labels, model="math", on_error="-1")
    assert rewards(flagged) == [1.0, -1.0, -1.0, -1.0]
    assert flagged.json()["extra_logs"]["rmserve_error"] == [0.0, 1.0, 1.0, 1.0]


def test_an_unparseable_query_fails_or_is_reported(service: httpx.Client) -> None:
    tool_turn = "<|im_start|>user\nls<|im_end|>\n<|im_start|>tool\nfile.txt<|im_end|>\n"
    queries = [tool_turn + "<|im_start|>assistant\nOne file.<|im_end|>", "<|im_start|>user\n"
               "hi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"]  # fmt: skip
    failed = get_reward(service, queries)
    assert failed.status_code == 422 and "query[0]: invalid_query" in failed.text, failed.text
    reported = get_reward(service, queries, on_error="report")
    values = rewards(reported)
    assert values[0] is None and isinstance(values[1], float)
    assert "query_format=raw" in reported.json()["errors"][0]["message"]
    (as_text,) = rewards(get_reward(service, queries[:1], query_format="raw"))
    assert isinstance(as_text, float)


def test_on_error_must_be_a_policy_or_a_number(service: httpx.Client) -> None:
    for bad in ("zero", "nan", "inf"):
        response = get_reward(service, ["x"], on_error=bad)
        assert response.status_code == 422 and response.json()["error"]["param"] == "on_error"


@pytest.fixture(scope="module")
def timing_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A service whose items all time out: a failure on the server's side, not the input's."""
    workdir = tmp_path_factory.mktemp("openrlhf-timeouts")
    registry = workdir / "registry.yaml"
    registry.write_text("models:\n  math:\n    kind: math\n")
    env = {"RMSERVE_OPENRLHF_MODEL": "math", "RMSERVE_DEFAULT_TIMEOUT_S": "0.000001"}
    server = start_server(registry, workdir, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            yield client
    finally:
        server.stop()


def test_a_server_side_failure_is_a_503_or_reported(timing_out: httpx.Client) -> None:
    failed = get_reward(timing_out, ["\\boxed{4}"], labels=["4"])
    assert failed.status_code == 503, failed.text  # OpenRLHF retries it, then the step fails
    assert "query[0]: timeout" in failed.json()["error"]["message"]
    reported = get_reward(timing_out, ["\\boxed{4}"], labels=["4"], on_error="report")
    assert rewards(reported) == [None] and reported.json()["errors"][0]["type"] == "timeout"
    flagged = get_reward(timing_out, ["\\boxed{4}"], labels=["4"], on_error="0")
    assert rewards(flagged) == [0.0] and flagged.json()["extra_logs"]["rmserve_error"] == [1.0]


def test_raw_goes_through_the_distributed_job_path(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """`rmserve gateway` + `rmserve worker` over a real Redis: the render option travels with
    the job to the worker (tests/registry.tiny.yaml's tiny-rm)."""
    fleet = Fleet(tmp_path)
    try:
        gateway = fleet.gateway(RMSERVE_OPENRLHF_MODEL="tiny-rm")
        fleet.workers(1)
        with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
            wait_for_workers(client, "tiny-rm", 1)
            sample = openrlhf_sample(LLAMA3, [{"role": "user", "content": QUESTION}], RESPONSE)
            (raw,) = rewards(
                get_reward(client, [sample.query], [sample.prompt], query_format="raw")
            )
            path = tiny_models["tiny-rm"]
            (expected,) = ref.sequence_logits(path, ref.token_ids(path, sample.query))
            assert raw == pytest.approx(expected, abs=1e-4)
            (auto,) = rewards(get_reward(client, [sample.query], [sample.prompt]))
            messages = [{"role": "user", "content": QUESTION},
                        {"role": "assistant", "content": RESPONSE}]  # fmt: skip
            assert auto == pytest.approx(score(client, "tiny-rm", {"messages": messages}), abs=1e-5)
    finally:
        fleet.stop()


def test_an_empty_share_of_a_multi_url_request_is_answered_empty(service: httpx.Client) -> None:
    """OpenRLHF 0.11 splits each one-sample request over all its URLs
    (openrlhf/utils/agent.py:329-336 at 3c3be62): the others get empty lists. Failing those
    (OpenRLHF's own serve_rm answers 500) would lose the sample's reward."""
    response = service.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rewards"] == [] and body["scores"] == [] and body["errors"] == []
    assert all(values == [] for values in body["extra_logs"].values())

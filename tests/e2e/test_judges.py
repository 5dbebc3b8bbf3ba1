"""Generative judges end to end: a real `rmserve serve` with vLLM generating on tiny causal LMs,
through HTTP. tiny-lm's weights are random: its free-form judgements do not parse, while
structured outputs make every judgement parse. A copy fine-tuned by the tests answers three
known items with a valid verdict or with prose, so one batch mixes both."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rmserve.models.generative.prompts import JudgePrompt, split_response, transcript
from rmserve.service.launcher import ServerProcess
from rmserve.wire.trajectory import Trajectory
from tests.conftest import TESTS, start_server
from tests.trained_judge import train_judge

pytestmark = pytest.mark.engine

CONVERSATION = [{"role": "user", "content": "What is 12 * 7?"}]
SYSTEM = {"role": "system", "content": "Answer in one line."}


def item(n: int) -> dict[str, Any]:
    return {"id": f"j{n}", "messages": [*CONVERSATION,
            {"role": "assistant", "content": f"It is {80 + n}."}]}  # fmt: skip


def answered(text: str, n: int) -> dict[str, Any]:
    return {"id": f"t{n}", "messages": [*CONVERSATION, {"role": "assistant", "content": text}]}


# What the trained judge answers for each of these items (greedy decoding).
TRAINED = [
    (answered("The answer is 84 because 12 times 7 is 84.", 0), "Correct and clear. \\boxed{7}"),
    (answered("No idea, maybe ninety?", 1), "I cannot tell."),
    (answered("Twelve sevens: 84, checked twice.", 2), "Wrong product. \\boxed{2}"),
]


@pytest.fixture(scope="module")
def judges(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    trained = train_judge(tiny_models["tiny-lm"], tmp_path_factory.mktemp("trained"), TRAINED)
    os.environ["RMSERVE_TRAINED_JUDGE"] = str(trained)
    server: ServerProcess = start_server(
        TESTS / "registry.judge.yaml",
        tmp_path_factory.mktemp("judges"),
        {"VLLM_LOGGING_LEVEL": "WARNING"},
    )
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            seeded = models.pop("tiny-judge-seeded")
            assert seeded["status"] == "unavailable" and "seed" in seeded["reason"], seeded
            assert all(m["status"] == "ready" for m in models.values()), models
            yield client
    finally:
        server.stop()


def test_a_judgement_that_does_not_parse_is_an_error_and_the_rest_is_scored(
    judges: httpx.Client,
) -> None:
    items = [item for item, _ in TRAINED] + [{"id": "no-response", "messages": CONVERSATION}]
    results = judges.post("/v1/score", json={"model": "tiny-judge-trained", "items": items})
    first, unparsed, third, no_response = results.json()["results"]
    assert first["error"] is None and first["score"] == 7, first
    assert first["critique"] == "Correct and clear."
    assert third["error"] is None and third["score"] == 2, third
    assert unparsed["error"]["type"] == "parse_error"
    assert "no \\boxed{score}" in unparsed["error"]["message"]
    assert "I cannot tell." in unparsed["error"]["message"]  # the raw text
    assert no_response["error"]["type"] == "no_response"


def test_structured_pointwise_judgements_always_parse(judges: httpx.Client) -> None:
    body = {"model": "tiny-judge-structured", "items": [item(n) for n in range(6)]}
    results = judges.post("/v1/score", json=body).json()["results"]
    for result in results:
        assert result["error"] is None, result
        assert 1 <= result["score"] <= 10 and result["score"] == int(result["score"])
        assert isinstance(result["critique"], str) and len(result["critique"]) <= 40
        assert result["usage"]["completion_tokens"] > 0 and result["usage"]["prompt_tokens"] > 0


def test_samples_are_drawn_counted_and_averaged(judges: httpx.Client) -> None:
    options = {"judge": {"samples": 4, "return_samples": True, "meta_filter": False}}
    body = {"model": "tiny-judge-structured", "items": [item(1)], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    samples = result["samples"]
    assert len(samples) == 4 and all(s["error"] is None for s in samples)
    assert result["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert result["score"] == pytest.approx(sum(s["score"] for s in samples) / 4)
    too_many = {**body, "options": {"judge": {"samples": 9}}}
    refused = judges.post("/v1/score", json=too_many)
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "options.judge.samples"


def test_random_free_form_text_never_becomes_a_default_score(judges: httpx.Client) -> None:
    body = {"model": "tiny-judge", "items": [item(n) for n in range(3)]}
    for result in judges.post("/v1/score", json=body).json()["results"]:
        if result["error"] is not None:  # random text almost never holds a valid \boxed{}
            assert result["error"]["type"] == "parse_error"
            assert "raw text" in result["error"]["message"]
        else:
            assert 1 <= result["score"] <= 10


def test_pairwise_verdicts_with_shuffled_samples(judges: httpx.Client) -> None:
    pair = {"id": "p", "messages": CONVERSATION, "candidates": ["It is 84.", "It is 85."]}
    options = {"judge": {"samples": 4, "return_samples": True, "meta_filter": False}}
    body = {"model": "tiny-pair-structured", "items": [pair], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"] is None, result
    assert result["verdict"] in ("A", "B") and len(result["scores"]) == 2
    assert sum(result["scores"]) == pytest.approx(1.0)
    samples = result["samples"]
    assert len(samples) == 4 and samples[0]["order"] == ["A", "B"]
    votes = [s["verdict"] for s in samples]
    assert result["scores"] == [votes.count("A") / 4, votes.count("B") / 4]
    no_candidates = {"model": "tiny-pair-structured", "items": [item(0)]}
    (missing,) = judges.post("/v1/score", json=no_candidates).json()["results"]
    assert missing["error"]["type"] == "missing_candidates"


def test_a_seed_is_refused_on_the_cpu_build_instead_of_crashing_the_engine(
    judges: httpx.Client,
) -> None:
    options = {"judge": {"seed": 3}}
    body = {"model": "tiny-judge-structured", "items": [item(0)], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"]["type"] == "unsupported_option"
    assert "CPU build" in result["error"]["message"]
    after = judges.post("/v1/score", json={"model": "tiny-judge-structured", "items": [item(1)]})
    assert after.json()["results"][0]["error"] is None  # the engine still serves


def meta_ratings(
    judges: httpx.Client, prompts: list[str], samples: list[dict[str, Any]]
) -> list[float]:
    """What the meta reward model says of each judgement, asked directly."""
    items = [{"messages": [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": sample["text"]}]}
             for prompt, sample in zip(prompts, samples, strict=True)]  # fmt: skip
    response = judges.post("/v1/score", json={"model": "tiny-meta-rm", "items": items})
    return [result["score"] for result in response.json()["results"]]


def test_the_meta_reward_model_keeps_the_best_rated_half_of_the_judgements(
    judges: httpx.Client,
) -> None:
    options = {"judge": {"samples": 4, "return_samples": True}}
    body = {"model": "tiny-judge-structured", "items": [item(2)], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"] is None, result
    samples = result["samples"]
    assert len(samples) == 4 and all(s["meta_score"] is not None for s in samples)
    kept = [s for s in samples if s["kept"]]
    assert len(kept) == 2  # meta_keep 0.5
    ratings = sorted((s["meta_score"] for s in samples), reverse=True)
    assert sorted((s["meta_score"] for s in kept), reverse=True) == ratings[:2]
    assert result["score"] == pytest.approx(sum(s["score"] for s in kept) / 2)
    # The ratings are the discriminative model's own scores of (judge prompt, judgement).
    context, response = split_response(Trajectory.model_validate(item(2)).messages)
    prompt = JudgePrompt.load("principles_pointwise").pointwise(
        transcript(context), transcript(response), None, 1, 10
    )
    direct = meta_ratings(judges, [prompt] * 4, samples)
    assert [s["meta_score"] for s in samples] == pytest.approx(direct, abs=1e-3)


def test_meta_filtering_of_pairwise_votes_and_turning_it_off(judges: httpx.Client) -> None:
    pair = {"id": "p", "messages": CONVERSATION, "candidates": ["It is 84.", "It is 85."]}
    options = {"judge": {"samples": 4, "return_samples": True}}
    body = {"model": "tiny-pair-structured", "items": [pair], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"] is None, result
    samples = result["samples"]
    kept = [s for s in samples if s["kept"]]
    assert len(kept) == 3  # meta_keep 0.75 of 4
    votes = [s["verdict"] for s in kept]
    assert result["scores"] == [votes.count("A") / 3, votes.count("B") / 3]
    # Each sample was shown its own candidate order, so each has its own judge prompt.
    texts = {"A": "Assistant: It is 84.", "B": "Assistant: It is 85."}
    rubric = JudgePrompt.load("rubric_pairwise")
    prompts = [
        rubric.choice(transcript(Trajectory.model_validate(pair).messages),
                      [texts[label] for label in s["order"]], None)
        for s in samples
    ]  # fmt: skip
    direct = meta_ratings(judges, prompts, samples)
    assert [s["meta_score"] for s in samples] == pytest.approx(direct, abs=1e-3)

    off = {**body, "options": {"judge": {"samples": 4, "return_samples": True,
                                         "meta_filter": False}}}  # fmt: skip
    (unfiltered,) = judges.post("/v1/score", json=off).json()["results"]
    assert all(s["meta_score"] is None and s["kept"] is None for s in unfiltered["samples"])
    asked = {"model": "tiny-judge-trained", "items": [item(0)],
             "options": {"judge": {"meta_filter": True}}}  # fmt: skip
    refused = judges.post("/v1/score", json=asked)
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "options.judge.meta_filter"


def image_url(width: int, height: int, payload: bytes | None = None) -> dict[str, Any]:
    if payload is None:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
        payload = buffer.getvalue()
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def pictured(*images: dict[str, Any], text: str = "What is in the picture?") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}, *images]},
                         {"role": "assistant", "content": "A red square."}]}  # fmt: skip


def test_a_vision_judge_reads_images_as_image_tokens(judges: httpx.Client) -> None:
    items = [
        pictured(),
        pictured(image_url(64, 64)),
        pictured(image_url(64, 64), image_url(256, 256)),
    ]
    body = {"model": "tiny-vision-judge", "items": items}
    none, one, two = judges.post("/v1/score", json=body).json()["results"]
    for result in (none, one, two):
        assert result["error"] is None, result
        assert 1 <= result["score"] <= 10
    # tiny-vlm's processor turns a square image into 17 tiles of 4 image tokens each (plus
    # wrapper tokens): prompt tokens grow by at least 68 per image only if the engine got it.
    tokens = [r["usage"]["prompt_tokens"] for r in (none, one, two)]
    assert tokens[1] - tokens[0] >= 68 and tokens[2] - tokens[1] >= 68, tokens


def test_vision_limits_are_per_item_errors(judges: httpx.Client) -> None:
    square = image_url(64, 64)
    items = [
        pictured(square, square, square),
        pictured(image_url(1200, 1000)),
        pictured(square, text="look at <image> here"),
        pictured(square),
    ]
    body = {"model": "tiny-vision-judge", "items": items}
    results = judges.post("/v1/score", json=body).json()["results"]
    errors = [r["error"]["type"] if r["error"] else None for r in results]
    assert errors == ["too_many_images", "image_too_large", "unsupported_content", None], results
    assert "3 images; the limit is 2" in results[0]["error"]["message"]
    assert "1200x1000" in results[1]["error"]["message"]
    text_only = {"model": "tiny-judge-structured", "items": [pictured(square)]}
    (refused,) = judges.post("/v1/score", json=text_only).json()["results"]
    assert refused["error"]["type"] == "unsupported_content"
    # An image that is no image never reaches a model: the gateway refuses the request.
    garbage = {**body, "items": [pictured(image_url(0, 0, payload=b"GIF89a but not really"))]}
    answer = judges.post("/v1/score", json=garbage)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"].endswith("image_url.url")


def test_an_agentic_judge_calls_a_tool_then_answers_with_evidence(judges: httpx.Client) -> None:
    agentic = {**item(4), "documents": [{"id": "facts", "text": "12 times 7 is 84."}]}
    options = {"judge": {"samples": 2, "return_samples": True}}
    body = {"model": "tiny-agent-judge", "items": [agentic], "options": options}
    (result,) = judges.post("/v1/score", json=body).json()["results"]
    assert result["error"] is None, result
    assert all(1 <= s["score"] <= 10 for s in result["samples"])
    evidence = result["evidence"]
    assert sorted(e["sample"] for e in evidence) == [0, 1]  # one call per judgement
    for call in evidence:
        assert call["turn"] == 0 and call["tool"] in ("calculator", "search"), call
        assert isinstance(call["arguments"], dict) and call["elapsed_s"] > 0
        assert (call["output"] is None) != (call["error"] is None), call
    # Each judgement's tokens cover both its turns (the call, then the verdict).
    assert result["usage"]["completion_tokens"] == sum(
        s["completion_tokens"] for s in result["samples"]
    )
    without = {**body, "options": {"judge": {"tools": []}}}
    (plain,) = judges.post("/v1/score", json=without).json()["results"]
    assert plain["error"] is None and plain["evidence"] is None
    refused = judges.post("/v1/score", json={**body, "options": {"judge": {"tools": ["code_run"]}}})
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "options.judge.tools"


def engine_counters(client: httpx.Client, model: str) -> dict[str, float]:
    wanted = {
        "rmserve_engine_prompt_tokens_total",
        "rmserve_engine_generation_tokens_total",
        "rmserve_engine_batch_size_sum",
        "rmserve_engine_batch_size_count",
    }
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name in wanted and sample.labels.get("model") == model
    }


def test_engine_metrics_count_the_tokens_the_responses_report(judges: httpx.Client) -> None:
    before = engine_counters(judges, "tiny-judge-structured")
    body = {"model": "tiny-judge-structured", "items": [item(n) for n in range(3)]}
    results = judges.post("/v1/score", json=body).json()["results"]
    after = engine_counters(judges, "tiny-judge-structured")
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    prompt = sum(result["usage"]["prompt_tokens"] for result in results)
    generated = sum(result["usage"]["completion_tokens"] for result in results)
    assert delta["rmserve_engine_prompt_tokens_total"] == prompt
    assert delta["rmserve_engine_generation_tokens_total"] == generated
    # Every generated token is one step's advance of its request.
    assert delta["rmserve_engine_batch_size_sum"] == generated
    assert 1 <= delta["rmserve_engine_batch_size_count"] <= generated


def grpo_group(name: str, n: int) -> list[dict[str, Any]]:
    return [{**item(k), "id": f"{name}-{k}", "group": name} for k in range(n)]


def jobs_ok(client: httpx.Client, model: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "rmserve_jobs_total"
        and sample.labels == {"model": model, "outcome": "ok"}
    )


def test_a_listwise_judge_scores_each_group_in_one_call_and_answers_per_item(
    judges: httpx.Client,
) -> None:
    # Two groups, interleaved, and an item that holds its own candidates.
    first, second = grpo_group("g1", 6), grpo_group("g2", 3)
    pair = {"id": "pair", "messages": CONVERSATION, "candidates": ["It is 84.", "It is 85."]}
    items = [*first[:3], *second, pair, *first[3:]]
    before = jobs_ok(judges, "tiny-listwise")
    body = {"model": "tiny-listwise", "items": items, "options": {"judge": {"samples": 2}}}
    response = judges.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert jobs_ok(judges, "tiny-listwise") - before == 3  # one judge job per group, one pair
    assert [r["id"] for r in results] == [i["id"] for i in items]
    assert [r["index"] for r in results] == list(range(len(items)))
    for result in results:
        assert result["error"] is None, result
    grouped = [r for r in results if r["id"] != "pair"]
    # Each item's score is the mean of its 2 judgements' integer scores in the range.
    assert all(1 <= r["score"] <= 10 and (2 * r["score"]).is_integer() for r in grouped)
    assert all(r["scores"] is None for r in grouped)
    (whole,) = [r for r in results if r["id"] == "pair"]
    assert len(whole["scores"]) == 2 and whole["verdict"] in ("A", "B")
    # A group's tokens are shared out among its items.
    assert all(r["usage"]["completion_tokens"] > 0 for r in grouped)


def test_a_listwise_group_streams_per_item_and_bad_groups_are_422s(judges: httpx.Client) -> None:
    body = {"model": "tiny-listwise", "items": grpo_group("s", 4), "options": {"stream": True}}
    with judges.stream("POST", "/v1/score", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2, 3]
    for items, param in [
        (grpo_group("one", 1), "items.0.group"),
        ([item(0), item(1)], "items.0.group"),
        ([*grpo_group("g", 2), {**item(3), "group": "g", "reference": "84"}], "items.2.reference"),
        # No user message in the group's items (no prompt), or prompts that differ.
        ([{**i, "messages": i["messages"][1:]} for i in grpo_group("a", 2)], "items.0.messages"),
        (
            [{**i, "messages": [SYSTEM, *i["messages"][1:]]} for i in grpo_group("s", 2)],
            "items.0.messages",
        ),
        (
            [
                *grpo_group("p", 2),
                {**item(2), "group": "p", "messages": [SYSTEM, *item(2)["messages"]]},
            ],
            "items.2.messages",
        ),
    ]:
        response = judges.post("/v1/score", json={"model": "tiny-listwise", "items": items})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param
    batch = judges.post("/v1/jobs", json={"model": "tiny-listwise", "items": grpo_group("b", 2)})
    assert batch.status_code == 422 and batch.json()["error"]["param"] == "items.0.group"


def test_a_group_sent_one_item_per_request_is_judged_as_one_group(judges: httpx.Client) -> None:
    """verl's agent loop and OpenRLHF send one sample per request: with `group_size` the
    gateway holds a group's items until all are in and the judge compares them in one call;
    /get_reward does the same with ?group_size= (OpenRLHF's n_samples_per_prompt)."""
    from concurrent.futures import ThreadPoolExecutor

    group = [{**i, "group_size": 3} for i in grpo_group("pieces", 3)]
    before = jobs_ok(judges, "tiny-listwise")

    def one(item: dict[str, Any]) -> httpx.Response:
        return judges.post("/v1/score", json={"model": "tiny-listwise", "items": [item]})

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(one, group))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    results = [r.json()["results"][0] for r in responses]
    assert [r["id"] for r in results] == ["pieces-0", "pieces-1", "pieces-2"]
    assert all(r["error"] is None and 1 <= r["score"] <= 10 for r in results), results
    assert jobs_ok(judges, "tiny-listwise") - before == 1  # the three judged together

    prompt = "<|user|>Which is best?<|assistant|>"
    queries = [f"{prompt}Answer {k}" for k in range(2)]

    def reward(query: str) -> httpx.Response:
        return judges.post(
            "/get_reward",
            params={"model": "tiny-listwise", "group_size": 2, "query_format": "plain"},
            json={"query": [query], "prompts": [prompt]},
        )

    with ThreadPoolExecutor(2) as pool:
        rewarded = list(pool.map(reward, queries))
    assert all(r.status_code == 200 for r in rewarded), [r.text for r in rewarded]
    assert all(1 <= r.json()["rewards"][0] <= 10 for r in rewarded)
    assert jobs_ok(judges, "tiny-listwise") - before == 2

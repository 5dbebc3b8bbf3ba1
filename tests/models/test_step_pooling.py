"""Issue #23: a Qwen2ForProcessRewardModel served as `kind: process` failed every item with
`internal_error: scoring failed: IndexError: list index out of range`. vLLM pools this
architecture's tokens with STEP pooling (vllm/model_executor/models/qwen2_rm.py), which returns
head rows only at the tokens equal to its step_tag_id (151651 unless configured,
vllm/model_executor/models/config.py), while ProcessModel indexed the rows by token position.

rmserve now asks vLLM for per-token (ALL) pooling and checks what it gets: rows that are not one
per token are the item error `unsupported_model` naming the pooling, and a PRM engine pooling
otherwise is refused at load. These tests need no engine: vLLM's outputs are imitated the way
StepPool.forward and AllPool.forward shape them (vllm/model_executor/layers/pooler/tokwise/
methods.py). tests/models/test_twins_qwen2_heads.py serves the twins on the real engine."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from rmserve.models import loader
from rmserve.models.base import RequestOptions
from rmserve.models.engine import VllmPoolingEngine, engine_args
from rmserve.models.errors import ModelLoadError
from rmserve.models.process import ProcessModel
from rmserve.models.rendering import ChatRenderer
from rmserve.models.spec import EngineOptions, ProcessSpec
from rmserve.models.tiny.qwen2_heads import STEP_TAG
from rmserve.wire.errors import ItemError
from rmserve.wire.trajectory import Trajectory

# The real Qwen2.5-Math-PRM-7B's id of <extra_0>: vLLM's default step_tag_id for the model.
VLLM_DEFAULT_STEP_TAG_ID = 151651
STEPS = ["First, 12 * 7 = 84.", "Then 84 + 16 = 100.", "The answer is \\boxed{100}."]
ITEM = Trajectory.model_validate(
    {
        "messages": [
            {"role": "user", "content": "What is 12 * 7 + 16?"},
            {"role": "assistant", "content": "\n\n".join(STEPS)},
        ]
    }
)


def test_vllm_pools_this_architecture_per_step_unless_told() -> None:
    """The root cause, as vLLM 0.32 states it: what rmserve's engine arguments override."""
    from vllm.config import PoolerConfig
    from vllm.model_executor.models.config import Qwen2ForProcessRewardModelConfig
    from vllm.model_executor.models.interfaces_base import get_default_tok_pooling_type
    from vllm.model_executor.models.qwen2_rm import (
        Qwen2ForProcessRewardModel,
        Qwen2ForRewardModel,
    )

    assert get_default_tok_pooling_type(Qwen2ForProcessRewardModel) == "STEP"
    assert get_default_tok_pooling_type(Qwen2ForRewardModel) == "ALL"
    pooler = PoolerConfig()
    Qwen2ForProcessRewardModelConfig.verify_and_update_model_config(
        SimpleNamespace(pooler_config=pooler)  # type: ignore[arg-type]
    )
    assert pooler.step_tag_id == VLLM_DEFAULT_STEP_TAG_ID


def test_pooling_engines_ask_for_one_row_per_token(tmp_path: Path) -> None:
    pooling = engine_args(tmp_path, tmp_path, EngineOptions())
    assert pooling.pooler_config.tok_pooling_type == "ALL"
    # The rest is left to the model (its sequence pooling, activation, ...).
    assert pooling.pooler_config.seq_pooling_type is None
    assert engine_args(tmp_path, tmp_path, EngineOptions(), "generate").pooler_config is None


class FakeLLM:
    """An AsyncLLM's pooling surface, shaping outputs as vLLM's poolers do: ALL gives a row per
    token, STEP the rows at `step_tag_id` only, `classify` the last token's row. Row i of token
    t is [i / 10, t / 100]."""

    def __init__(
        self,
        tasks: set[str],
        tok_pooling: str = "ALL",
        step_tag_id: int | None = None,
        attn_type: str = "decoder",
    ) -> None:
        self.tasks = tasks
        pooler = SimpleNamespace(
            tok_pooling_type=tok_pooling,
            seq_pooling_type="LAST",
            step_tag_id=step_tag_id,
            returned_token_ids=None,
        )
        self.model_config = SimpleNamespace(
            pooler_config=pooler, attn_type=attn_type, max_model_len=512
        )
        self.requests: list[tuple[str, int]] = []
        self.shut_down = False

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.tasks))

    async def encode(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        ids = prompt["prompt_token_ids"]
        assert params.task in self.tasks, f"vLLM refuses task {params.task}"
        self.requests.append((params.task, len(ids)))
        rows = [[i / 10, t / 100] for i, t in enumerate(ids)]
        if params.task == "classify":
            rows = rows[-1:]
        elif self.model_config.pooler_config.tok_pooling_type == "STEP":
            tag = self.model_config.pooler_config.step_tag_id
            rows = [row for row, t in zip(rows, ids, strict=True) if t == tag]
        data = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 2)
        yield SimpleNamespace(outputs=SimpleNamespace(data=data), finished=True)

    def shutdown(self) -> None:
        self.shut_down = True


def spec(path: Path, **options: Any) -> ProcessSpec:
    return ProcessSpec.model_validate(
        {
            "name": "qwen-math-prm",
            "kind": "process",
            "weights": str(path),
            "engine": {"max_model_len": 512, "dtype": "float32"},
            "options": {"step_tag": STEP_TAG, "steps": "separator", **options},
        }
    )


def process_model(path: Path, llm: FakeLLM, **options: Any) -> ProcessModel:
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(path), 512, "error")
    return ProcessModel(spec(path, **options), renderer, VllmPoolingEngine(llm, 512))


def tag_id(path: Path) -> int:
    tag: int = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(STEP_TAG)
    return tag


@pytest.mark.parametrize("reuse_prefix", [True, False])
@pytest.mark.parametrize("engine_tag", ["vllm-default", "twin"])
def test_step_pooled_rows_are_an_item_error_not_an_index_error(
    qwen2_head_twins: dict[str, Path], reuse_prefix: bool, engine_tag: str
) -> None:
    """The engine as vLLM configures this architecture by default: STEP pooling at 151651 (no
    such token in the twin: no rows, the IndexError of the issue), or at the twin's own tag
    (a row per step, which per-token indexing would misread or overrun)."""
    path = qwen2_head_twins["prm"]
    step_tag_id = VLLM_DEFAULT_STEP_TAG_ID if engine_tag == "vllm-default" else tag_id(path)
    llm = FakeLLM({"token_classify"}, "STEP", step_tag_id)
    model = process_model(path, llm, reuse_prefix=reuse_prefix)
    with pytest.raises(ItemError) as caught:
        asyncio.run(model.score(ITEM, RequestOptions()))
    assert caught.value.code == "unsupported_model"
    expected_rows = 0 if engine_tag == "vllm-default" else len(STEPS)
    assert f"returned {expected_rows} head rows for" in caught.value.message
    assert f"STEP: rows only at token id {step_tag_id}" in caught.value.message
    assert [task for task, _ in llm.requests] == ["token_classify"]


def test_rows_that_are_not_one_per_token_fail_the_item_with_any_engine(
    qwen2_head_twins: dict[str, Path],
) -> None:
    """ProcessModel checks the rows itself, whatever PoolingEngine it is given."""

    class StepRowsEngine:
        max_model_len = 512

        async def pool(self, token_ids: list[int], task: str) -> list[list[float]]:
            return [[0.0, 1.0]] * len(STEPS)

        async def supports(self, task: str) -> bool:
            return task == "token_classify"

        def shutdown(self) -> None:
            pass

    path = qwen2_head_twins["prm"]
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(path), 512, "error")
    model = ProcessModel(spec(path), renderer, StepRowsEngine())  # type: ignore[arg-type]
    with pytest.raises(ItemError) as caught:
        asyncio.run(model.score(ITEM, RequestOptions()))
    assert caught.value.code == "unsupported_model"
    assert "one row per token" in caught.value.message


def test_per_token_rows_give_the_tag_rows_and_reuse_prefix_falls_back_explicitly(
    qwen2_head_twins: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = qwen2_head_twins["prm"]
    tag = tag_id(path)
    scores = {}
    for reuse in (True, False):
        llm = FakeLLM({"token_classify"})
        model = process_model(path, llm, reuse_prefix=reuse, activation="none", positive_label=1)
        with caplog.at_level(logging.WARNING, logger="rmserve.models.process"):
            caplog.clear()
            rewards = [asyncio.run(model.score(ITEM, RequestOptions())) for _ in range(2)]
        # No last-token classify for this head: one per-token request per item either way.
        assert llm.requests == [("token_classify", rewards[0].prompt_tokens)] * 2
        fallback = [r for r in caplog.records if "reuse_prefix is on" in r.getMessage()]
        assert len(fallback) == (1 if reuse else 0)  # said once per model, not per item
        scores[reuse] = rewards[0].step_scores
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(path), 512, "error")
    chat = [
        {"role": "user", "content": "What is 12 * 7 + 16?"},
        {"role": "assistant", "content": STEP_TAG.join(STEPS) + STEP_TAG},
    ]
    ids = renderer.encode(renderer.render(chat))
    assert scores[True] == scores[False] == pytest.approx([t / 100 for t in ids if t == tag])


def test_a_prm_engine_pooling_per_step_is_refused_at_load(
    qwen2_head_twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = qwen2_head_twins["prm"]
    llm = FakeLLM({"token_classify"}, "STEP", VLLM_DEFAULT_STEP_TAG_ID)
    monkeypatch.setattr(
        loader.VllmPoolingEngine, "start", lambda *args, **kwargs: VllmPoolingEngine(llm, 512)
    )
    with pytest.raises(ModelLoadError) as caught:
        loader.load_model(spec(path))
    assert str(caught.value) == (
        "vLLM pools this model's tokens with STEP pooling: rows only at token id 151651, not "
        "one row per token (ALL), so rmserve cannot read the head at its own step tags"
    )
    assert llm.shut_down


def test_a_head_served_only_per_token_is_classified_by_its_last_row() -> None:
    """Qwen2ForRewardModel as a discriminative model: vLLM serves its head per token only; the
    sequence's score is the last token's row (not from the prefix cache: no `classify`)."""
    ids = [5, 9, 2, 7]
    llm = FakeLLM({"token_classify"})
    engine = VllmPoolingEngine(llm, 512)
    last_row = [[pytest.approx(0.3), pytest.approx(0.07)]]
    assert asyncio.run(engine.pool(ids, "classify")) == last_row
    assert llm.requests == [("token_classify", 4)]
    assert not asyncio.run(engine.supports("classify"))

    both = FakeLLM({"classify", "token_classify"})
    assert asyncio.run(VllmPoolingEngine(both, 512).pool(ids, "classify")) == last_row
    assert both.requests == [("classify", 4)]

    # Without causal attention the last row is not the sequence's: refused, with the reason.
    encoder = VllmPoolingEngine(FakeLLM({"token_classify"}, attn_type="encoder_only"), 512)
    with pytest.raises(ItemError) as caught:
        asyncio.run(encoder.pool(ids, "classify"))
    assert caught.value.code == "unsupported_model"
    assert caught.value.message == (
        "vLLM serves this model's head for token_classify, not classify (nor token_classify "
        "of a causal model)"
    )

"""How many jobs a worker holds: the setting, else twice what the model's engine runs at once."""

from __future__ import annotations

import pydantic

from rmserve.models.spec import ModelSpec
from rmserve.service.worker import DEFAULT_CONCURRENCY, worker_concurrency

SPECS: pydantic.TypeAdapter[ModelSpec] = pydantic.TypeAdapter(ModelSpec)


def spec(**fields: object) -> ModelSpec:
    return SPECS.validate_python({"name": "m", **fields})


def test_an_engine_model_holds_twice_what_its_engine_runs_at_once() -> None:
    assert worker_concurrency(spec(kind="discriminative", weights="/m"), None) == 512
    small = spec(kind="generative", weights="/m", engine={"max_num_seqs": 24})
    assert worker_concurrency(small, None) == 48


def test_a_model_without_an_engine_holds_the_default() -> None:
    assert worker_concurrency(spec(kind="math"), None) == DEFAULT_CONCURRENCY


def test_the_setting_wins() -> None:
    small = spec(kind="generative", weights="/m", engine={"max_num_seqs": 24})
    assert worker_concurrency(small, 512) == 512
    assert worker_concurrency(spec(kind="math"), 3) == 3

"""The adapters say each item's group size (so that the service assembles groups a trainer
sends in pieces: service.cohorts) and give grouped items ids (so that a resent item is
recognised): verl's rollout.n, TRL's num_generations, OpenRLHF's n_samples_per_prompt."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from rmserve.client import verl_manager
from rmserve.client.openrlhf_scoring import Endpoint
from rmserve.client.openrlhf_scoring import Settings as OpenRLHFSettings
from rmserve.client.trl import RMServeReward, sized
from rmserve.client.verl_scoring import Settings, build_item


def config(n: int, val_n: int | None) -> dict[str, Any]:
    rollout: dict[str, Any] = {"n": n}
    if val_n is not None:
        rollout["val_kwargs"] = {"n": val_n}
    return {"actor_rollout_ref": {"rollout": rollout}}


def test_verl_reward_kwargs_group_size_marks_grouped_items_only() -> None:
    settings = Settings.from_kwargs({"model": "judge", "group_size": 8})
    item = build_item("gsm8k", "42", "42", {"question": "What is 6 * 7?"})
    marked = settings.sized(item)
    assert marked["group_size"] == 8 and marked["group"] == item["group"]
    assert len(marked["id"]) == 32 and settings.sized(item)["id"] != marked["id"]
    alone = build_item("gsm8k", "42", "42", None)  # no prompt: in no group, nothing to size
    assert settings.sized(alone) == alone
    assert Settings.from_kwargs({"model": "judge", "group_size": 1}).sized(item) == item
    for bad in (0, "8", 2.5, True):
        with pytest.raises(TypeError, match="group_size"):
            Settings.from_kwargs({"model": "judge", "group_size": bad})


def test_the_verl_manager_takes_rollout_n_when_validation_samples_as_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert verl_manager.with_group_size({}, config(8, 8)) == {"group_size": 8}
    assert verl_manager.with_group_size({}, config(8, None)) == {"group_size": 8}
    assert verl_manager.with_group_size({"group_size": 4}, config(8, 8)) == {"group_size": 4}
    assert verl_manager.with_group_size({}, config(1, 1)) == {}
    with caplog.at_level(logging.WARNING):
        assert verl_manager.with_group_size({}, config(8, 1)) == {}
    assert "val_kwargs.n (1) differ" in caplog.text


def test_trl_items_carry_num_generations_and_a_prompt_met_twice_is_two_groups() -> None:
    items = [{"group": "p", "messages": []}] * 6 + [{"group": "q", "messages": []}] * 3
    out = sized(items, 3)
    assert [i["group"] for i in out] == ["p"] * 3 + ["p:1"] * 3 + ["q"] * 3
    assert all(i["group_size"] == 3 for i in out) and len({i["id"] for i in out}) == 9
    reward = RMServeReward("judge", "http://127.0.0.1:9", group_size=2)
    built = reward._items(["a", "a", "b"], ["x", "y", "z"], {})
    assert [i["group_size"] for i in built] == [2, 2, 2]
    with pytest.raises(ValueError, match="num_generations"):
        RMServeReward("judge", group_size=1)
    assert "group_size" not in RMServeReward("judge")._items(["a"], ["x"], {})[0]


def test_openrlhf_group_size_from_the_environment_goes_on_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RMSERVE_MODEL", "judge")
    monkeypatch.setenv("RMSERVE_GROUP_SIZE", "8")
    assert Endpoint(OpenRLHFSettings.from_env()).path == "/get_reward?model=judge&group_size=8"
    monkeypatch.setenv("RMSERVE_GROUP_SIZE", "one")
    with pytest.raises(ValueError, match="RMSERVE_GROUP_SIZE"):
        OpenRLHFSettings.from_env()

"""service.groups: prompt keys for routing, and folding groups for listwise judges."""

from __future__ import annotations

from typing import Any

import pytest

from rmserve.client.client import _batches
from rmserve.service.groups import fold, prefix_key, unfold
from rmserve.service.jobs import GroupMember
from rmserve.service.protocol import ItemErrorBody, ItemResult, Usage
from rmserve.web.errors import UnprocessableEntity
from rmserve.wire.trajectory import Trajectory

PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
]


def item(response: str, group: str | None = "g", prompt: Any = None, **fields: Any) -> Trajectory:
    messages = [*(PROMPT if prompt is None else prompt), {"role": "assistant", "content": response}]
    return Trajectory.model_validate({"messages": messages, "group": group, **fields})


def test_items_answering_one_prompt_share_a_key_whatever_their_response_or_group() -> None:
    keys = {prefix_key(item(r, group=g)) for r, g in [("4", "a"), ("5", "b"), ("four", None)]}
    assert len(keys) == 1 and None not in keys
    other = [{"role": "user", "content": "What is 2+3?"}]
    assert prefix_key(item("4", prompt=other)) not in keys


def test_an_item_without_a_response_is_keyed_by_its_group_or_not_at_all() -> None:
    raw = Trajectory.model_validate({"messages": PROMPT, "group": "p1"})
    same = Trajectory.model_validate({"messages": [PROMPT[1]], "group": "p1"})
    assert prefix_key(raw) == prefix_key(same) is not None
    assert prefix_key(Trajectory.model_validate({"messages": PROMPT})) is None


def test_a_group_folds_into_one_item_with_its_responses_as_candidates_in_order() -> None:
    items = [
        item("4", id="a"),
        item("5", id="b", group="h"),
        item("four", id="c"),
        item("5", group="h"),
    ]
    (i, first, members_g), (j, second, members_h) = fold(items)[0]
    assert (i, j) == (0, 1)
    assert first.candidates is not None and second.candidates is not None
    assert [c.id for c in first.candidates] == ["a", "c"]
    assert [m.index for m in members_g or []] == [0, 2]
    assert [m.index for m in members_h or []] == [1, 3]
    assert list(first.messages) == list(items[0].messages[:2])
    # An item that already holds candidates is judged as it is, at its own index.
    pair = Trajectory.model_validate({"messages": PROMPT, "candidates": ["4", "5"]})
    _, (k, whole, members) = fold([items[0], items[2], pair])[0]
    assert k == 2 and members is None and whole is pair


@pytest.mark.parametrize(
    ("items", "param", "says"),
    [
        ([item("4"), item("5", group=None)], "items.1.group", "same `group`"),
        ([item("4")], "items.0.group", "one response"),
        (
            [item("4"), item("5", prompt=[{"role": "user", "content": "x"}])],
            "items.1.messages",
            "differs",
        ),
        (
            [item("4"), item("5", prompt=[{"role": "system", "content": "Be terse."}, PROMPT[1]])],
            "items.1.messages",
            "differs",
        ),
        # No user message, so no prompt to compare the responses to (was a 500).
        ([item("4", prompt=[]), item("5", prompt=[])], "items.0.messages", "no user message"),
        (
            [item("4", prompt=PROMPT[:1]), item("5", prompt=PROMPT[:1])],
            "items.0.messages",
            "no user message",
        ),
        ([item("4"), item("5", prompt=PROMPT[:1])], "items.1.messages", "no user message"),
        (
            [item("4", reference="4"), item("5", reference="5")],
            "items.1.reference",
            "one reference",
        ),
        ([item(str(i)) for i in range(27)], "items.26.group", "at most 26"),
        (
            [
                Trajectory.model_validate(
                    {"messages": PROMPT, "group": "g", "candidates": ["4", "5"]}
                )
            ],
            "items.0.group",
            "not both",
        ),
    ],
)
def test_a_group_a_listwise_judge_cannot_take_is_a_422_naming_the_field(
    items: list[Trajectory], param: str, says: str
) -> None:
    with pytest.raises(UnprocessableEntity) as raised:
        fold(items)
    assert raised.value.param == param
    assert says in str(raised.value)


def test_unfolding_gives_each_item_its_score_and_an_error_where_the_judge_gave_none() -> None:
    members = [GroupMember(index=4, id="x"), GroupMember(index=1, id="y"), GroupMember(index=2)]
    result = ItemResult(
        index=4,
        scores=[7.0, None, 3.0],
        score=7.0,
        critique="A is right",
        usage=Usage(prompt_tokens=10, completion_tokens=5),
    )
    x, y, z = unfold(result, members)
    assert (x.index, x.id, x.score, x.critique) == (4, "x", 7.0, "A is right")
    assert y.score is None and y.error is not None and y.error.type == "judge_skipped"
    assert "response 2 of 3" in y.error.message
    assert z.score == 3.0 and z.index == 2
    assert sum(r.usage.prompt_tokens for r in (x, y, z)) == 10
    assert sum(r.usage.completion_tokens for r in (x, y, z)) == 5
    failed = unfold(
        result.model_copy(update={"error": ItemErrorBody(type="parse_error", message="?")}), members
    )
    assert all(
        r.error is not None and r.error.type == "parse_error" and r.score is None for r in failed
    )


def test_the_client_does_not_split_a_group_across_requests() -> None:
    groups = ["a"] * 3 + ["b"] * 3 + [None] * 2 + ["c"] * 5
    items = [{"messages": PROMPT, **({"group": g} if g else {})} for g in groups]
    batches = _batches(items, 4)
    seen = [[i.get("group") for i in batch.items] for batch in batches]
    assert seen == [["a"] * 3, ["b"] * 3 + [None], [None], ["c"] * 5]
    assert [batch.offset for batch in batches] == [0, 3, 7, 8]
    plain = [{"messages": PROMPT}] * 10
    assert [len(b.items) for b in _batches(plain, 4)] == [4, 4, 2]  # no groups: as before

"""GRPO groups: the items of a request that answer one prompt (`group` on each item).

- Every job carries a prefix key, a hash of its prompt (the conversation before the response),
  so that distributed mode sends a group, and later requests with the same prompt, to the
  worker whose engine has that prompt cached.
- A listwise judge scores a whole group in one call. The gateway folds each group into one job
  whose item has the group's responses as `candidates`, and unfolds the judge's answer into one
  result per item, in the request's order. A response the judge gave no score is an error of
  that item (`judge_skipped`), never a number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rmserve.service.jobs import GroupMember
from rmserve.service.protocol import ItemErrorBody, ItemResult, Usage
from rmserve.web.errors import UnprocessableEntity
from rmserve.wire.trajectory import Candidate, Message, Trajectory, UserMessage

MAX_GROUP = 26  # a listwise judge labels responses A..Z


def split_prompt(item: Trajectory) -> tuple[list[Message], list[Message]]:
    """(prompt, response): the response is the turns after the last user message (none for an
    item that carries `candidates`, or whose last turn is the user's)."""
    if item.candidates:
        return list(item.messages), []
    last_user = max(
        (i for i, message in enumerate(item.messages) if isinstance(message, UserMessage)),
        default=-1,
    )
    return list(item.messages[: last_user + 1]), list(item.messages[last_user + 1 :])


def prefix_key(item: Trajectory) -> str | None:
    """Items with the same key share their prompt. By the prompt's messages when the item has a
    response after it; else by its `group`; None when neither says what the prompt is."""
    prompt, response = split_prompt(item)
    if response or item.candidates:
        payload = json.dumps(
            [message.model_dump(mode="json", exclude_none=True) for message in prompt],
            sort_keys=True,
            separators=(",", ":"),
        )
    elif item.group is not None:
        payload = f"group:{item.group}"
    else:
        return None
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


Unit = tuple[int, Trajectory, list[GroupMember] | None]


@dataclass(frozen=True)
class Piece:
    """The items of one group that one request carries (fewer than the group's size)."""

    group: str
    size: int
    members: list[tuple[int, Trajectory]]  # (index in the request, item)
    prompt: list[Any]  # the conversation before the response, as JSON
    responses: list[list[Any]]  # each member's response turns, as JSON


def fold(items: Sequence[Trajectory]) -> tuple[list[Unit], list[Piece]]:
    """What a listwise judge scores, as (index in the request, item, members): one item per
    group (its responses as candidates, at the place of the group's first item), and items with
    `candidates` as they are; and the groups this request carries only part of (`group_size`
    larger than its items here), to be assembled across requests (service.cohorts). 422 naming
    the field when a group cannot be judged as one."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.candidates and item.group is not None:
            raise UnprocessableEntity(
                f"items.{index}: give either `candidates` (the responses in one item) or "
                "`group` (one response per item), not both",
                param=f"items.{index}.group",
            )
        if not item.candidates:
            if item.group is None:
                raise UnprocessableEntity(
                    f"items.{index}.group: a listwise judge compares the responses to one "
                    "prompt; give the items of each group the same `group`, or give one item "
                    "its responses as `candidates`",
                    param=f"items.{index}.group",
                )
            groups.setdefault(item.group, []).append(index)
    folded: dict[int, Unit] = {
        index: (index, item, None) for index, item in enumerate(items) if item.candidates
    }
    pieces: list[Piece] = []
    for name, indices in groups.items():
        members = [(i, items[i]) for i in indices]
        size = _announced_size(name, members)
        prompt, responses = _check_group(name, members, size)
        if len(members) < size:
            pieces.append(
                Piece(
                    group=name,
                    size=size,
                    members=members,
                    prompt=[m.model_dump(mode="json", exclude_none=True) for m in prompt],
                    responses=[
                        [m.model_dump(mode="json", exclude_none=True) for m in response]
                        for response in responses
                    ],
                )
            )
            continue
        first_index, first = members[0]
        judged = Trajectory(
            id=first.id,
            messages=prompt,
            candidates=[
                Candidate(id=item.id, messages=response)
                for (_, item), response in zip(members, responses, strict=True)
            ],
            reference=first.reference,
            documents=first.documents,
            metadata=first.metadata,
        )
        group_members = [GroupMember(index=index, id=item.id) for index, item in members]
        folded[first_index] = (first_index, judged, group_members)
    return [folded[index] for index in sorted(folded)], pieces


def _announced_size(name: str, members: list[tuple[int, Trajectory]]) -> int:
    """The group's size: its `group_size`, the same on each of its items (else the items in
    this request)."""
    sizes = {item.group_size for _, item in members}
    if len(sizes) > 1:
        index = next(i for i, item in members if item.group_size != members[0][1].group_size)
        raise UnprocessableEntity(
            f"items.{index}.group_size differs from that of items.{members[0][0]}, in the same "
            f"group {name!r}",
            param=f"items.{index}.group_size",
        )
    size = sizes.pop()
    if size is not None and len(members) > size:
        index = members[size][0]
        raise UnprocessableEntity(
            f"items.{index}.group: group {name!r} has {len(members)} items in this request, "
            f"more than its group_size {size}",
            param=f"items.{index}.group",
        )
    return size if size is not None else len(members)


def _check_group(
    name: str, members: list[tuple[int, Trajectory]], size: int
) -> tuple[list[Message], list[list[Message]]]:
    """The group's prompt and each item's response; 422 when the group cannot be judged as one
    (too small or large, or items that do not share a prompt, reference, documents, metadata)."""
    first_index, first = members[0]
    if size < 2:
        raise UnprocessableEntity(
            f"items.{first_index}.group: group {name!r} has one response; a listwise judge "
            "needs 2 or more to compare",
            param=f"items.{first_index}.group",
        )
    if size > MAX_GROUP:
        where = f"items.{members[-1][0]}.group" + ("_size" if size > len(members) else "")
        raise UnprocessableEntity(
            f"{where}: group {name!r} has {size} responses; a listwise judge compares "
            f"at most {MAX_GROUP} in one call (split the group, or use a pointwise judge)",
            param=where,
        )
    prompt, _ = _prompt_and_response(first_index, first)
    responses: list[list[Message]] = []
    for index, item in members:
        own_prompt, response = _prompt_and_response(index, item)
        if own_prompt != prompt:
            raise UnprocessableEntity(
                f"items.{index}.messages: the conversation before the response differs from "
                f"that of items.{first_index}, in the same group {name!r}",
                param=f"items.{index}.messages",
            )
        for field in ("reference", "documents", "metadata"):
            if getattr(item, field) != getattr(first, field):
                raise UnprocessableEntity(
                    f"items.{index}.{field} differs from that of items.{first_index}, in the "
                    f"same group {name!r}: a group is judged against one {field}",
                    param=f"items.{index}.{field}",
                )
        responses.append(response)
    return prompt, responses


def _prompt_and_response(index: int, item: Trajectory) -> tuple[list[Message], list[Message]]:
    """split_prompt of a group's item; 422 naming its messages when it has no user message
    (no prompt to compare the responses to) or no turn after the last one (no response)."""
    prompt, response = split_prompt(item)
    if not prompt:
        raise UnprocessableEntity(
            f"items.{index}.messages: no user message; a listwise judge compares responses to "
            "one prompt, the conversation up to the last user message",
            param=f"items.{index}.messages",
        )
    if not response:
        raise UnprocessableEntity(
            f"items.{index}.messages: no response after the last user message to compare",
            param=f"items.{index}.messages",
        )
    return prompt, response


def unfold(result: ItemResult, members: Sequence[GroupMember]) -> list[ItemResult]:
    """One result per item of a folded group. The group's tokens are shared out among its
    items (so that a request's usage adds up); its critique and samples go to every item."""
    usages = _share(result.usage, len(members))
    results = []
    for k, member in enumerate(members):
        base = ItemResult(
            id=member.id,
            index=member.index,
            cached=result.cached,
            usage=usages[k],
            timing=result.timing,
        )
        score = result.scores[k] if result.scores is not None and k < len(result.scores) else None
        if result.error is not None:
            results.append(base.model_copy(update={"error": result.error}))
        elif score is None:
            message = (
                f"the listwise judge's answer has no score for this response (response {k + 1} "
                f"of {len(members)} in its group)"
            )
            error = ItemErrorBody(type="judge_skipped", message=message)
            results.append(base.model_copy(update={"error": error}))
        else:
            update = {
                "score": score,
                "critique": result.critique,
                "samples": result.samples,
                "evidence": result.evidence,
            }
            results.append(base.model_copy(update=update))
    return results


def _share(usage: Usage, n: int) -> list[Usage]:
    def parts(total: int) -> list[int]:
        return [total // n + (1 if k < total % n else 0) for k in range(n)]

    prompt, truncated, completion = (
        parts(usage.prompt_tokens),
        parts(usage.truncated_tokens),
        parts(usage.completion_tokens),
    )
    return [
        Usage(prompt_tokens=p, truncated_tokens=t, completion_tokens=c)
        for p, t, c in zip(prompt, truncated, completion, strict=True)
    ]

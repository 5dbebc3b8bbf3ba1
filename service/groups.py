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


def fold(items: Sequence[Trajectory]) -> list[Unit]:
    """What a listwise judge scores, as (index in the request, item, members): one item per
    group (its responses as candidates, at the place of the group's first item), and items with
    `candidates` as they are. 422 naming the field when a group cannot be judged as one."""
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
    for name, indices in groups.items():
        folded[indices[0]] = (indices[0], *_fold_group(name, [(i, items[i]) for i in indices]))
    return [folded[index] for index in sorted(folded)]


def _fold_group(
    name: str, members: list[tuple[int, Trajectory]]
) -> tuple[Trajectory, list[GroupMember]]:
    first_index, first = members[0]
    where = f"items.{members[-1][0]}.group"
    if len(members) < 2:
        raise UnprocessableEntity(
            f"items.{first_index}.group: group {name!r} has one response; a listwise judge "
            "needs 2 or more to compare",
            param=f"items.{first_index}.group",
        )
    if len(members) > MAX_GROUP:
        raise UnprocessableEntity(
            f"{where}: group {name!r} has {len(members)} responses; a listwise judge compares "
            f"at most {MAX_GROUP} in one call (split the group, or use a pointwise judge)",
            param=where,
        )
    prompt, _ = _prompt_and_response(first_index, first)
    responses: list[Candidate] = []
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
        responses.append(Candidate(id=item.id, messages=response))
    judged = Trajectory(
        id=first.id,
        messages=prompt,
        candidates=responses,
        reference=first.reference,
        documents=first.documents,
        metadata=first.metadata,
    )
    return judged, [GroupMember(index=index, id=item.id) for index, item in members]


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

"""Chat-templated text back into messages: queries built as OpenRLHF builds them, with the real
chat templates of Qwen2.5-Instruct, Llama-3-Instruct and Gemma-2-it (tests/service/actor_text.py
says where they come from), left-truncated at every token."""

from __future__ import annotations

import pytest

from rmserve.service.chat_text import (
    MIN_OVERLAP,
    ChatTextError,
    Message,
    parse_query,
    split_plain,
)
from tests.service.actor_text import GEMMA, LLAMA3, QWEN25, Actor, actor_tokenizer, openrlhf_sample

QUESTION = "What is 12 * 7 + 16? Show the steps, s'il vous plaît. 😀"
RESPONSE = "12 * 7 = 84.\n\n84 + 16 = 100.\n\nThe answer is \\boxed{100}."
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
MULTI_TURN = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": QUESTION},
]


def messages(parsed: list[Message]) -> list[dict[str, str]]:
    return [m.as_dict() for m in parsed]


def expected(actor: Actor, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation the reward model should see: as sent, plus the response (Qwen2.5's
    template adds its default system turn when there is none)."""
    turns = list(conversation)
    if actor is QWEN25 and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": QWEN_SYSTEM})
    return [*turns, {"role": "assistant", "content": RESPONSE}]


@pytest.mark.parametrize("actor", [QWEN25, LLAMA3, GEMMA], ids=lambda a: a.template)
def test_every_left_truncation_parses_back_to_the_conversation(actor: Actor) -> None:
    conversation = [{"role": "user", "content": QUESTION}]
    if actor is not GEMMA:  # Gemma's template refuses system turns
        conversation = MULTI_TURN
    whole = openrlhf_sample(actor, conversation, RESPONSE)
    assert whole.query.startswith(whole.prompt)
    for keep in range(1, whole.prompt_tokens + 1):
        sample = openrlhf_sample(actor, conversation, RESPONSE, keep_prompt_tokens=keep)
        assert keep == whole.prompt_tokens or not sample.query.startswith(sample.prompt)
        parsed = parse_query(sample.query, sample.prompt)
        kept = len(sample.query) - len(RESPONSE) - len(actor.eos)
        if kept < MIN_OVERLAP:  # a piece of the generation header: the prompt's turns still
            assert messages(parsed.messages)[:-1] == expected(actor, conversation)[:-1]
            assert parsed.messages[-1].content.endswith(RESPONSE), keep
            continue
        # `prompts` is untruncated, so the whole conversation comes back, markers stripped.
        assert messages(parsed.messages) == expected(actor, conversation), keep
        assert parsed.template is not None and not parsed.unmatched_prompt


def test_chatml_without_prompts_keeps_what_truncation_left_as_its_own_turn() -> None:
    sample = openrlhf_sample(QWEN25, MULTI_TURN, RESPONSE)
    tokenizer = actor_tokenizer(QWEN25)
    ids = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    # Cut inside the second user turn's content: its tail is a user turn of its own.
    cut = ids.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 20) + 5
    query = tokenizer.decode(ids[cut:], skip_special_tokens=False) + RESPONSE + "<|im_end|>"
    parsed = messages(parse_query(query, "").messages)
    assert parsed[0]["role"] == "user" and parsed[0]["content"]
    assert MULTI_TURN[0]["content"].endswith(parsed[0]["content"]) or any(
        turn["content"].endswith(parsed[0]["content"]) for turn in MULTI_TURN
    )
    assert parsed[1:] == expected(QWEN25, MULTI_TURN)[-len(parsed) + 1 :]
    assert parsed[-1] == {"role": "assistant", "content": RESPONSE}


def test_a_cut_inside_a_header_keeps_its_role() -> None:
    chatml = (
        "system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
    )
    assert messages(parse_query(chatml, "").messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    sample = openrlhf_sample(LLAMA3, [{"role": "user", "content": QUESTION}], RESPONSE)
    # What is left when left truncation drops <|begin_of_text|><|start_header_id|>.
    llama = sample.query.removeprefix("<|begin_of_text|><|start_header_id|>")
    assert llama.startswith("user<|end_header_id|>")
    assert messages(parse_query(llama, "").messages) == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": RESPONSE},
    ]


@pytest.mark.parametrize("actor", [QWEN25, LLAMA3, GEMMA], ids=lambda a: a.template)
def test_a_response_cut_at_max_tokens_is_still_the_response(actor: Actor) -> None:
    conversation = [{"role": "user", "content": QUESTION}]
    cut = openrlhf_sample(actor, conversation, "12 * 7 = 84.\n\n84 +", eos=False)
    parsed = parse_query(cut.query, cut.prompt).messages
    assert parsed[-1] == Message("assistant", "12 * 7 = 84.\n\n84 +")
    # Tokens after EOS (padding, or a base model's <|endoftext|>) are not content either.
    padded = openrlhf_sample(QWEN25, conversation, RESPONSE, after_eos="<|endoftext|>")
    assert parse_query(padded.query, padded.prompt).messages[-1] == Message("assistant", RESPONSE)


def test_a_character_cut_in_half_by_truncation_is_dropped() -> None:
    tokenizer = actor_tokenizer(QWEN25)
    conversation = [{"role": "user", "content": "😀😀 " + QUESTION}]
    whole = openrlhf_sample(QWEN25, conversation, RESPONSE)
    ids = tokenizer(whole.prompt, add_special_tokens=False)["input_ids"]
    cuts = [
        keep
        for keep in range(1, len(ids))
        if tokenizer.decode(ids[-keep:], skip_special_tokens=False).startswith("\ufffd")
    ]
    assert cuts, "the byte-level tokenizer splits the emoji into several tokens"
    sample = openrlhf_sample(QWEN25, conversation, RESPONSE, keep_prompt_tokens=cuts[-1])
    assert messages(parse_query(sample.query, sample.prompt).messages) == expected(
        QWEN25, conversation
    )
    assert sample.query.startswith("\ufffd")  # inside the first emoji: the rest of the turn
    first = parse_query(sample.query, "").messages[0]
    assert first == Message("user", "😀 " + QUESTION)


def test_a_plain_prompts_response_is_what_follows_it() -> None:
    prompt = "Question: what is 12 * 7 + 16?\nAnswer:"
    answer = " 100, because 12 * 7 = 84."
    parsed = parse_query(prompt + answer + "</s>", prompt)
    assert parsed.template is None and not parsed.unmatched_prompt
    assert messages(parsed.messages) == [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]
    # Left-truncated: the query repeats only the prompt's end; it is not sent twice.
    truncated = parse_query(prompt[10:] + answer, prompt)
    assert messages(truncated.messages)[1] == {"role": "assistant", "content": answer}
    assert messages(truncated.messages)[0]["content"] == prompt
    # A leading BOS the tokenizer added is no part of the prompt's text.
    assert parse_query("<s>" + prompt + answer, prompt).messages[1].content == answer


def test_a_query_that_does_not_start_with_its_prompt_is_all_response() -> None:
    parsed = parse_query("Something else entirely.", "Question: what is 2 + 2?")
    assert parsed.unmatched_prompt
    assert messages(parsed.messages) == [
        {"role": "user", "content": "Question: what is 2 + 2?"},
        {"role": "assistant", "content": "Something else entirely."},
    ]
    # An overlap shorter than MIN_OVERLAP is chance, not truncation: nothing is cut off.
    short = "2 + 2?"[: MIN_OVERLAP - 1]
    assert split_plain(short + " is 4", "Question: what is 2 + 2?") is None
    long = "what is 2 + 2?"
    assert len(long) >= MIN_OVERLAP
    assert split_plain(long + " It is 4.", "Question: what is 2 + 2?") == " It is 4."


def test_a_plain_prompt_decides_even_when_the_response_has_markers() -> None:
    prompt = "Write a ChatML header."
    answer = " Like this: <|im_start|>user\nhello<|im_end|>"
    parsed = parse_query(prompt + answer, prompt)
    assert parsed.template is None
    assert parsed.messages[1].content == " Like this: <|im_start|>user\nhello"
    # Plain format (the request's choice) never looks for templates.
    sample = openrlhf_sample(QWEN25, [{"role": "user", "content": QUESTION}], RESPONSE)
    plain = parse_query(sample.query, sample.prompt, templates=False)
    assert plain.template is None
    assert plain.messages == [Message("user", sample.prompt), Message("assistant", RESPONSE)]


def test_turns_that_cannot_be_messages_are_refused() -> None:
    tool_turn = "<|im_start|>user\nls<|im_end|>\n<|im_start|>tool\nfile.txt<|im_end|>\n"
    with pytest.raises(ChatTextError, match="'tool'"):
        parse_query(tool_turn + "<|im_start|>assistant\nOne file.", "")
    with pytest.raises(ChatTextError, match="no assistant turn"):
        parse_query("<|im_start|>user\nHello<|im_end|>\n", "")

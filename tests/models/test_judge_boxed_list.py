"""Listwise judgements in DeepSeek-GRM's format: principles and analysis, then every candidate's
score in one box, in the order shown, `Scores: \\boxed{6, 3}` (arXiv:2504.02495, appendix prompt:
"Scores: <the overall comprehensive score of all responses in order, separate by comma in the
boxed, e.g., \\boxed{x, x} if there exists 2 responses>"). The parser, its structured-output
regex, the option that selects them and the built-in template."""

from __future__ import annotations

import random
import re

import pytest
from pydantic import ValidationError

from rmserve.models.generative.parsing import (
    JudgementParseError,
    boxed_list_answer_regex,
    parse_boxed_list,
)
from rmserve.models.generative.prompts import JudgePrompt
from rmserve.models.spec import GenerativeOptions

JUDGEMENT = (
    "Specific Criteria: correctness (70%), clarity (30%).\n"
    "Analysis: Response 1 is right, Response 2 adds instead of subtracting.\n"
    "Scores: \\boxed{6, 3}"
)


@pytest.mark.parametrize(
    ("text", "candidates", "scores"),
    [
        (JUDGEMENT, 2, (6.0, 3.0)),
        ("Scores: \\boxed{ 6 ,3 }", 2, (6.0, 3.0)),
        ("Scores: \\boxed{6,3,10}", 3, (6.0, 3.0, 10.0)),
        ("Scores: \\boxed{6.5, 3}", 2, (6.5, 3.0)),
        ("Scores: \\boxed{6/10, 3/10}", 2, (6.0, 3.0)),  # a fraction of the top score
        ("Scores: \\boxed{\\text{6, 3}}", 2, (6.0, 3.0)),
        ("Scores: \\boxed{1, 10}", 2, (1.0, 10.0)),
        # The last box wins: boxes in the analysis are intermediate values.
        ("Response 1: \\boxed{2}. Both: \\boxed{1, 1}.\nScores: \\boxed{6, 3}", 2, (6.0, 3.0)),
        # Thinking is ignored, a box in it too.
        ("<think>\\boxed{1, 1}</think>\nScores: \\boxed{6, 3}", 2, (6.0, 3.0)),
        ("<think>a</think>x</think>\\boxed{6, 3}", 2, (6.0, 3.0)),
    ],
)
def test_scores_every_candidate_in_order(
    text: str, candidates: int, scores: tuple[float, ...]
) -> None:
    verdict = parse_boxed_list(text, candidates, 1, 10)
    assert verdict.scores == scores and verdict.problems == ()


def test_critique_is_the_text_before_the_final_box() -> None:
    verdict = parse_boxed_list(JUDGEMENT, 2, 1, 10)
    assert verdict.critique == JUDGEMENT[: JUDGEMENT.index("\\boxed")].strip()
    assert verdict.critique.startswith("Specific Criteria:") and verdict.critique.endswith(
        "Scores:"
    )
    thinking = parse_boxed_list("<think>plan</think><answer>Fine.\\boxed{6, 3}</answer>", 2, 1, 10)
    assert thinking.critique == "Fine."


@pytest.mark.parametrize(
    ("text", "scores", "problem"),
    [
        ("Scores: \\boxed{6, 11}", (6.0, None), "B: 11 is outside 1-10"),
        ("Scores: \\boxed{0, 3}", (None, 3.0), "A: 0 is outside 1-10"),
        ("Scores: \\boxed{6, good}", (6.0, None), "B: 'good' is not a number"),
        ("Scores: \\boxed{6, }", (6.0, None), "B: '' is not a number"),
        ("Scores: \\boxed{6, nan}", (6.0, None), "B: 'nan' is not a number"),
        ("Scores: \\boxed{6, 3/5}", (6.0, None), "B: 3/5 is not a fraction of 10"),
    ],
)
def test_a_candidate_without_a_usable_score_is_none(
    text: str, scores: tuple[float | None, ...], problem: str
) -> None:
    verdict = parse_boxed_list(text, 2, 1, 10)
    assert verdict.scores == scores and verdict.problems == (problem,)


@pytest.mark.parametrize(
    ("text", "candidates", "reason"),
    [
        ("Specific Criteria: x.\nAnalysis: I cannot decide.", 2, "no \\boxed{s1, s2, ...}"),
        ("Scores: 6, 3", 2, "no \\boxed{s1, s2, ...}"),
        # The scores carry no labels: with one too few or too many, which is whose is unknown.
        ("Scores: \\boxed{7}", 2, "has 1 score for 2 candidates"),
        ("Scores: \\boxed{6, 3, 2}", 2, "has 3 scores for 2 candidates"),
        ("Scores: \\boxed{6, 3}", 3, "has 2 scores for 3 candidates"),
        ("Scores: \\boxed{}", 2, "has 1 score for 2 candidates"),
        ("Scores: \\boxed{0, 11}", 2, "no usable score (A: 0 is outside 1-10; B: 11 is"),
        ("Scores: \\boxed{a, b}", 2, "no usable score"),
        ("Scores: \\boxed{6, 3", 2, "unclosed"),
        ("Scores: \\boxed{6, 3} and \\boxed{5, ", 2, "unclosed"),
        ("<think>Scores: \\boxed{6, 3}</think>\nSo, a tie.", 2, "only in the thinking"),
        ("<think>Scores: \\boxed{6, 3}", 2, "unclosed <think>"),
    ],
)
def test_no_usable_answer_is_an_error_never_a_default(
    text: str, candidates: int, reason: str
) -> None:
    with pytest.raises(JudgementParseError) as caught:
        parse_boxed_list(text, candidates, 1, 10)
    assert reason in caught.value.reason and caught.value.raw == text


def test_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="invalid score range"):
        parse_boxed_list(JUDGEMENT, 2, 10, 1)
    with pytest.raises(ValueError, match="2-26 candidates"):
        parse_boxed_list("\\boxed{6}", 1, 1, 10)
    with pytest.raises(ValueError, match="2-26 candidates"):
        boxed_list_answer_regex(27, 1, 10, 100)
    with pytest.raises(ValueError, match="invalid score range"):
        boxed_list_answer_regex(2, 10, 1, 100)


# -- the structured-output regex --------------------------------------------------------------

_PIECES = [
    "Specific Criteria: correctness (60%).",
    "\nAnalysis: ",
    "Response 1 is right",
    ", ",
    " ",
    "\n",
    "\n\n",
    "{6, 3}",
    "boxed{9}",
    "}",
    "[8, 9]",
    "<",
    "</think>",
    "<think>",
    "<answer>",
    "Scores: ",
    "Scores: A=3, B=4",
    "\\",
    "\\boxed{3, 4}",
]


def _plain_regex(regex: str) -> None:
    """Only character classes, bounded repetition and alternation: no lookarounds etc."""
    assert "(?" not in regex
    assert not re.search(r"\\[1-9]", regex)
    assert not re.search(r"[*+?}]\?", regex.replace(")?", ")"))
    re.compile(regex)


@pytest.mark.parametrize("candidates", [2, 3, 8, 26])
def test_every_text_the_regex_matches_parses_to_its_box(candidates: int) -> None:
    regex = boxed_list_answer_regex(candidates, 1, 10, 300)
    _plain_regex(regex)
    rng = random.Random(candidates)
    for _ in range(300):
        pieces = [p for p in _PIECES if "\\" not in p]  # the critique has no backslash
        critique = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        critique = critique.lstrip(" \t\r\n")
        while critique.startswith("<t"):
            critique = critique[1:].lstrip(" \t\r\n")
        critique = critique[:300]
        scores = [rng.randint(1, 10) for _ in range(candidates)]
        text = f"{critique}\\boxed{{{', '.join(map(str, scores))}}}"
        assert re.fullmatch(regex, text), text
        verdict = parse_boxed_list(text, candidates, 1, 10)
        assert verdict.scores == tuple(float(n) for n in scores), text
        assert verdict.problems == ()


def test_the_regex_accepts_exactly_the_valid_answers() -> None:
    regex = boxed_list_answer_regex(2, 1, 10, 200)
    for text in [
        "\\boxed{1, 10}",
        JUDGEMENT,
        "Analysis: {6, 3} was a draft.\nScores: \\boxed{9, 2}",
        "</think>x [[B]] Scores: A=9\nScores: \\boxed{9, 2}",
    ]:
        assert re.fullmatch(regex, text), text
    for text in [
        "Scores: \\boxed{6}",  # a candidate skipped
        "Scores: \\boxed{6, 3, 2}",  # a candidate too many
        "Scores: \\boxed{0, 3}",  # out of range
        "Scores: \\boxed{6, 11}",
        "Scores: \\boxed{6.5, 3}",  # integers only
        "Scores: \\boxed{06, 3}",
        "Scores: \\boxed{6,3}",  # exactly ", " between scores
        "Scores: \\boxed{6, 3}.",  # nothing after the box
        "\\boxed{1, 1} Scores: \\boxed{6, 3}",  # a second box
        "Scores: \\text{x} \\boxed{6, 3}",  # no backslash in the critique
        " Scores: \\boxed{6, 3}",  # no leading space
        "<think>\\boxed{6, 3}",  # cannot open a thinking block
        "<think>Scores: \\boxed{6, 3}",
    ]:
        assert re.fullmatch(regex, text) is None, text
    short = boxed_list_answer_regex(2, 1, 10, 3)
    assert re.fullmatch(short, "abc\\boxed{6, 3}") and not re.fullmatch(short, "abcd\\boxed{6, 3}")
    assert re.fullmatch(boxed_list_answer_regex(2, -2, 2, 0), "\\boxed{-2, 0}")


# -- the option and the template ----------------------------------------------------------------


def test_the_format_is_a_listwise_option_with_its_own_default_template() -> None:
    options = GenerativeOptions(mode="listwise", answer_format="boxed_list")
    assert options.template_name == "deepseek_grm"
    custom = GenerativeOptions(mode="listwise", answer_format="boxed_list", template="my.jinja")
    assert custom.template_name == "my.jinja"
    assert GenerativeOptions(mode="listwise").answer_format == "scores_block"
    assert GenerativeOptions(mode="listwise").template_name == "listwise"
    for mode in ("pointwise", "pairwise"):
        with pytest.raises(ValidationError, match="applies to mode listwise only"):
            GenerativeOptions(mode=mode, answer_format="boxed_list")


def test_the_template_asks_for_principles_analysis_and_one_box_in_order() -> None:
    prompt = JudgePrompt.load("deepseek_grm").listwise(
        "User: What is 12 * 7?", ["Assistant: 84.", "Assistant: 96."], "84", 1, 10
    )
    assert prompt.index("User: What is 12 * 7?") < prompt.index("84\n") < prompt.index("[The")
    assert "[The Begin of Response 1]\nAssistant: 84.\n[The End of Response 1]\n" in prompt
    assert "[The Begin of Response 2]\nAssistant: 96.\n[The End of Response 2]" in prompt
    assert "an integer between 1 and 10" in prompt
    for line in ("Specific Criteria: <", "Analysis: <", "Scores: <"):
        assert f"\n{line}" in prompt
    assert prompt.endswith("\\boxed{x, x} for 2 responses>.")
    three = JudgePrompt.load("deepseek_grm").listwise("User: q", ["a", "b", "c"], None, 0, 4)
    assert "\\boxed{x, x, x} for 3 responses" in three and "Reference" not in three

"""Parsing LLM-judge judgements (pointwise `\\boxed{N}`, pairwise `[[X]]`, listwise
`Scores: A=7, B=3`) and answer regexes."""

from __future__ import annotations

import random
import re

import pytest

from rmserve.models.generative.parsing import (
    ChoiceVerdict,
    JudgementParseError,
    PointwiseVerdict,
    candidate_label,
    choice_answer_regex,
    listwise_answer_regex,
    parse_choice,
    parse_listwise,
    parse_pointwise,
    pointwise_answer_regex,
)

GRM_CRITIQUE = """Specific Criteria:
Principle 1: Correctness (weight 40%): the response computes 12 * 7 = 84 correctly and the
final number matches the reference.
Principle 2: Completeness (weight 30%): it explains each step, but skips the unit conversion.
Principle 3: Clarity (weight 30%): the explanation is well organised and easy to follow.

Analysis:
- Correctness: 9/10. The arithmetic is right.
- Completeness: 6/10. The conversion from minutes to hours is asserted, not shown.
- Clarity: 8/10.

Weighted: 0.4*9 + 0.3*6 + 0.3*8 = 7.8, so the response is mostly correct."""

RM_R1_EVAL = """<rubric>
1. Factual accuracy of the historical dates (most important).
2. Whether the answer addresses both parts of the question.
<justify>Accuracy comes first because a wrong date makes the answer useless.</justify>
</rubric>
<eval>
<quote_A>The treaty was signed in 1648.</quote_A> This is correct: the Peace of Westphalia
was signed in 1648. However, Chatbot A ignores the second part of the question.
<quote_B>Signed in 1648, it ended the Thirty Years' War.</quote_B> Chatbot B gets the date
right and answers both parts.
</eval>"""

QWEN_THINK = """<think>
Okay, let me look at the response. The user asks for 12 * 7 in hours... Maybe \\boxed{3}?
No wait, the arithmetic is right, so something like \\boxed{6} at least. Or is [[A]] better?
Let me write the final evaluation.
</think>

"""


# -- pointwise -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "score"),
    [
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{7}", 7.0),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{7.8}", 7.8),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{ 8 }", 8.0),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{7/10}", 7.0),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{6.5 / 10}", 6.5),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{\\text{7}}", 7.0),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{\\text{ 9 }}", 9.0),
        (GRM_CRITIQUE + "\n\nFinal score: $\\boxed{+10}$", 10.0),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{1.}", 1.0),
        # Intermediate values boxed or restated earlier: the last box wins.
        ("Correctness: \\boxed{9}. Completeness: \\boxed{5}.\n\nFinal score: \\boxed{6}", 6.0),
        ("Final score: \\boxed{4}\n\nOn reflection the proof is complete.\n\\boxed{8}", 8.0),
        # A box in the thinking is ignored when there is one after </think>.
        (QWEN_THINK + GRM_CRITIQUE + "\n\nFinal score: \\boxed{7}", 7.0),
        # DeepSeek-R1-like templates put <think> in the prompt: only </think> is generated.
        ("so \\boxed{2} maybe\n</think>\nThe response is good.\n\\boxed{9}", 9.0),
        # Boxes are matched by balanced braces, so a {set} before does not confuse them.
        ("The set {1, {2}} is handled. \\boxed{\\text{5}} and text {after}", 5.0),
    ],
)
def test_pointwise_scores(text: str, score: float) -> None:
    assert parse_pointwise(text, 1, 10).score == pytest.approx(score)


def test_pointwise_ranges_and_signs() -> None:
    assert parse_pointwise("Harmful.\n\\boxed{-3}", -5, 5).score == -3.0
    assert parse_pointwise("\\boxed{-0.5}", -1, 1).score == -0.5
    assert parse_pointwise("\\boxed{.25}", 0, 1).score == 0.25
    assert parse_pointwise("\\boxed{0}", 0, 10).score == 0.0
    assert parse_pointwise("\\boxed{85/100}", 0, 100).score == 85.0


@pytest.mark.parametrize(
    ("text", "low", "high", "phrase"),
    [
        (GRM_CRITIQUE, 1, 10, "no \\boxed{score} in the judgement"),
        (GRM_CRITIQUE + "\n\nFinal score: 7", 1, 10, "no \\boxed{score}"),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{}", 1, 10, "is empty"),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{ \\text{} }", 1, 10, "is empty"),
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{good}", 1, 10, "\\boxed{good} is not a number"),
        ("Final score: \\boxed{7 out of 10}", 1, 10, "\\boxed{7 out of 10} is not a number"),
        ("Final score: \\boxed{nan}", 1, 10, "\\boxed{nan} is not a number"),
        ("Final score: \\boxed{inf}", 1, 10, "\\boxed{inf} is not a number"),
        ("Final score: \\boxed{1e1}", 1, 10, "not a number"),
        ("Final score: \\boxed{\\frac{1}{2}}", 0, 1, "\\boxed{\\frac{1}{2}} is not a number"),
        ("Final score: \\boxed{\\boxed{7}}", 1, 10, "not a number"),
        ("Final score: \\boxed{" + "9" * 400 + "}", 1, 10, "is not finite"),
        ("Final score: \\boxed{11}", 1, 10, "score 11 is outside 1-10"),
        ("Final score: \\boxed{0}", 1, 10, "score 0 is outside 1-10"),
        ("Final score: \\boxed{-2}", 1, 10, "score -2 is outside 1-10"),
        ("Final score: \\boxed{10.5}", 1, 10, "score 10.5 is outside 1-10"),
        ("Final score: \\boxed{7/5}", 1, 10, "fraction of 5, not of the top score 10"),
        ("Final score: \\boxed{70/100}", 1, 10, "fraction of 100"),
        # The last box decides, even when an earlier one was fine.
        ("Draft: \\boxed{7}. Final score: \\boxed{twelve}", 1, 10, "\\boxed{twelve}"),
        # Truncated generations.
        (GRM_CRITIQUE + "\n\nFinal score: \\boxed{8", 1, 10, "unclosed"),
        ("Draft \\boxed{6}. Final score: \\boxed{\\text{8}", 1, 10, "truncated"),
        ("<think>\nThe response looks right, maybe \\boxed{8}. But", 1, 10, "unclosed <think>"),
        # Answers only in the thinking.
        (QWEN_THINK + GRM_CRITIQUE, 1, 10, "no final answer after </think>"),
        (QWEN_THINK + "Final score: 7", 1, 10, "no final answer after </think>"),
    ],
)
def test_pointwise_errors(text: str, low: float, high: float, phrase: str) -> None:
    with pytest.raises(JudgementParseError) as caught:
        parse_pointwise(text, low, high)
    assert phrase in caught.value.reason
    assert caught.value.raw == text
    assert str(caught.value) == caught.value.reason


def test_pointwise_critique() -> None:
    text = QWEN_THINK + "  " + GRM_CRITIQUE + "\n\nFinal score: \\boxed{7}\n"
    assert parse_pointwise(text, 1, 10) == PointwiseVerdict(
        score=7.0, critique=GRM_CRITIQUE + "\n\nFinal score:"
    )
    assert parse_pointwise("<answer>\\boxed{3}</answer>", 1, 10).critique == ""
    tagged = "<answer>Weak proof. \\boxed{2}</answer>\n</answer> Revised: \\boxed{4}"
    assert parse_pointwise(tagged, 1, 10) == PointwiseVerdict(
        4.0, "Weak proof. \\boxed{2}\n Revised:"
    )


def test_pointwise_rejects_invalid_range() -> None:
    with pytest.raises(ValueError, match="range"):
        parse_pointwise("\\boxed{5}", 10, 1)
    with pytest.raises(ValueError, match="range"):
        parse_pointwise("\\boxed{5}", 1, float("inf"))


# -- choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "candidates", "choice"),
    [
        (RM_R1_EVAL + "\n<answer>[[B]]</answer>", 2, 1),
        (RM_R1_EVAL + "\n<answer>[[A]]</answer>", 2, 0),
        ("Assistant B misreads the question.\n\nFinal verdict: [[a]]", 2, 0),
        ("Assistant A is off-topic.\n\nFinal verdict: [[b]]", 2, 1),
        ("Both are polite, A is accurate.\n\nFinal verdict: [[ A ]]", 2, 0),
        ("Both are polite, B is accurate.\n\nFinal verdict: [[B ]]", 2, 1),
        # Several markers: the last one wins, ties included.
        ("At first [[A]] seemed better, but B cites sources.\n<answer>[[B]]</answer>", 2, 1),
        ("[[A]] and [[B]] are equally good.", 2, 1),
        ("[[B]] and [[A]] are equally good.", 2, 0),
        # More candidates.
        ("Candidate C is the only one with a runnable program.\n<answer>[[C]]</answer>", 3, 2),
        ("Response D handles the edge cases.\n\n[[D]]", 4, 3),
        # A marker in the thinking is ignored when there is one after </think>.
        (QWEN_THINK + RM_R1_EVAL + "\n<answer>[[B]]</answer>", 2, 1),
        # Numpy-like indexing is not a marker unless it comes last.
        ("Response A uses x[[0, 1]] correctly.\n<answer>[[A]]</answer>", 2, 0),
    ],
)
def test_choices(text: str, candidates: int, choice: int) -> None:
    assert parse_choice(text, candidates).choice == choice


@pytest.mark.parametrize(
    ("text", "candidates", "phrase"),
    [
        (RM_R1_EVAL, 2, "no verdict [[A]]/[[B]] in the judgement"),
        (RM_R1_EVAL + "\n<answer>B</answer>", 3, "no verdict [[A]]/[[B]]/[[C]] in the judgement"),
        (RM_R1_EVAL + "\n<answer>[B]</answer>", 2, "no verdict"),
        (RM_R1_EVAL + "\n<answer>[[C]]</answer>", 2, "[[C]] is not one of [[A]]/[[B]]"),
        ("Both are equally helpful.\n\nFinal verdict: [[tie]]", 2, "[[tie]] is not one of"),
        ("Both are equally helpful.\n\nFinal verdict: [[C]]", 2, "[[C]] is not one of"),
        ("A is better. [[A]] Hmm, on balance: [[A=B]]", 2, "[[A=B]] is not one of"),
        ("Final verdict: [[]]", 2, "[[]] is not one of"),
        ("Final verdict: [[AB]]", 2, "[[AB]] is not one of"),
        (QWEN_THINK + RM_R1_EVAL, 2, "no final answer after </think>"),
        (QWEN_THINK + RM_R1_EVAL + "\n<answer>", 2, "[[A]]/[[B]] is only in the thinking"),
        ("<think>\nA is right, so [[A]]... but B", 2, "unclosed <think>"),
    ],
)
def test_choice_errors(text: str, candidates: int, phrase: str) -> None:
    with pytest.raises(JudgementParseError) as caught:
        parse_choice(text, candidates)
    assert phrase in caught.value.reason
    assert caught.value.raw == text


def test_choice_error_reason_is_shortened() -> None:
    text = "Final verdict: [[" + "x" * 500 + "]]"
    with pytest.raises(JudgementParseError) as caught:
        parse_choice(text, 2)
    assert len(caught.value.reason) < 100
    assert caught.value.raw == text


def test_choice_critique() -> None:
    text = QWEN_THINK + RM_R1_EVAL + "\n<answer>[[B]]</answer>\n"
    assert parse_choice(text, 2) == ChoiceVerdict(choice=1, critique=RM_R1_EVAL)
    text = "  A ignores the question.\n\nFinal verdict: [[B]]"
    assert parse_choice(text, 2).critique == "A ignores the question.\n\nFinal verdict:"


def test_candidate_labels() -> None:
    assert [candidate_label(i) for i in (0, 1, 2, 25)] == ["A", "B", "C", "Z"]
    for index in (-1, 26):
        with pytest.raises(ValueError, match="no label"):
            candidate_label(index)
    for candidates in (1, 27):
        with pytest.raises(ValueError, match="2-26 candidates"):
            parse_choice("[[A]]", candidates)


# -- answer regexes --------------------------------------------------------------------------

# Characters a sampled critique is built from: prose plus the parser's special characters.
_PIECES = [
    "The",
    " response",
    " is",
    " right",
    ".",
    "\n",
    "\n\n",
    " ",
    "7",
    "/10",
    "{",
    "}",
    "]",
    "]]",
    "[",
    "[[A]]",
    "\\",
    "\\boxed{3}",
    "boxed{9}",
    "<",
    "</think>",
    "<think>",
    "<answer>",
    "<rubric>",
    "Principle 1: Correctness (weight 40%)",
    "Final score:",
    "$",
]


def _sample_critique(rng: random.Random, forbidden: str, max_chars: int) -> str:
    """A critique the answer regexes allow: no `forbidden`, not starting with space or `<t`."""
    pieces = [p for p in _PIECES if forbidden not in p]
    text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
    while text and (text[0] in " \t\r\n" or text.startswith("<t")):
        text = text[1:]
    return text[:max_chars]


def _plain_regex(regex: str) -> None:
    """Only character classes, bounded repetition and alternation: no lookarounds etc."""
    assert "(?" not in regex
    assert not re.search(r"\\[1-9]", regex)
    assert not re.search(r"[*+?}]\?", regex.replace(")?", ")"))
    re.compile(regex)


def test_pointwise_regex_matches_what_parses() -> None:
    regex = pointwise_answer_regex(1, 10, 200)
    _plain_regex(regex)
    rng = random.Random(1234)
    for _ in range(500):
        critique = _sample_critique(rng, "\\", 200)
        score = rng.randint(1, 10)
        text = f"{critique}\\boxed{{{score}}}"
        assert re.fullmatch(regex, text), text
        verdict = parse_pointwise(text, 1, 10)
        assert verdict.score == score, text
        if "</think>" not in critique:
            assert verdict.critique == critique.replace("<answer>", "").strip(), text


@pytest.mark.parametrize(
    "text",
    [
        "The answer is right.\n\\boxed{7}",
        "\\boxed{1}",
        "\\boxed{10}",
        "Principle 1: Correctness (weight 40%): fine. {x} [[A]] </think> 3/10\n\\boxed{2}",
    ],
)
def test_pointwise_regex_accepts(text: str) -> None:
    regex = pointwise_answer_regex(1, 10, 200)
    match = re.fullmatch(regex, text)
    assert match is not None
    assert parse_pointwise(text, 1, 10).score == float(match.groups()[-1])


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{11}",
        "\\boxed{0}",
        "\\boxed{07}",
        "\\boxed{7.5}",
        "\\boxed{ 7}",
        "Good.\n\\boxed{7} ",
        "Good.\n\\boxed{7}\nThat is all.",
        "Maybe \\boxed{3}. Final: \\boxed{7}",
        "Good.",
        "x" * 201 + "\\boxed{7}",
        "\nGood.\\boxed{7}",
        "<think>Good.\\boxed{7}",
        "<t\\boxed{7}",
    ],
)
def test_pointwise_regex_rejects(text: str) -> None:
    assert re.fullmatch(pointwise_answer_regex(1, 10, 200), text) is None


def test_pointwise_regex_ranges() -> None:
    regex = pointwise_answer_regex(-2, 2, 0)
    assert [n for n in range(-5, 6) if re.fullmatch(regex, f"\\boxed{{{n}}}")] == [-2, -1, 0, 1, 2]
    assert re.fullmatch(regex, "x\\boxed{0}") is None
    assert re.fullmatch(pointwise_answer_regex(1, 10, 1), "x\\boxed{5}")
    assert re.fullmatch(pointwise_answer_regex(1, 10, 1), "xy\\boxed{5}") is None
    with pytest.raises(ValueError, match="range"):
        pointwise_answer_regex(5, 1, 100)
    with pytest.raises(ValueError, match="max_critique_chars"):
        pointwise_answer_regex(1, 10, -1)


@pytest.mark.parametrize("candidates", [2, 3, 5])
def test_choice_regex_matches_what_parses(candidates: int) -> None:
    regex = choice_answer_regex(candidates, 300)
    _plain_regex(regex)
    rng = random.Random(candidates)
    for _ in range(300):
        critique = _sample_critique(rng, "[", 300)
        choice = rng.randrange(candidates)
        text = f"{critique}[[{candidate_label(choice)}]]"
        assert re.fullmatch(regex, text), text
        verdict = parse_choice(text, candidates)
        assert verdict.choice == choice, text
        if "</think>" not in critique:
            assert verdict.critique == critique.replace("<answer>", "").strip(), text


@pytest.mark.parametrize(
    "text",
    [
        "[[C]]",
        "[[a]]",
        "[[ A ]]",
        "[[A]] ",
        "B is better.\n[[B]]\nDone.",
        "At first [[A]]. Final: [[B]]",
        "[[A]][[B]]",
        "Good.",
        "x" * 301 + "[[A]]",
        " B is better.[[B]]",
        "<think>B is better.[[B]]",
        "<table>B is better.[[B]]",
    ],
)
def test_choice_regex_rejects(text: str) -> None:
    assert re.fullmatch(choice_answer_regex(2, 300), text) is None


def test_choice_regex_accepts() -> None:
    regex = choice_answer_regex(3, 1000)
    for text, choice in [
        (RM_R1_EVAL + "\n<answer>[[B]]", 1),
        ("\\boxed{1} A is wrong ]] </think> C is right.\n[[C]]", 2),
        ("[[A]]", 0),
        ("<[[A]]", 0),
        ("<b>A</b> wins.[[A]]", 0),
    ]:
        assert re.fullmatch(regex, text), text
        assert parse_choice(text, 3).choice == choice
    with pytest.raises(ValueError, match="2-26 candidates"):
        choice_answer_regex(1, 100)


# -- listwise ------------------------------------------------------------------------------

LIST_CRITIQUE = """A computes 12 * 7 = 84 and shows the step. B says 86, a slip. C is right but
terse, and D refuses. Overall A > C > B > D."""


@pytest.mark.parametrize(
    ("text", "scores"),
    [
        (LIST_CRITIQUE + "\nScores: A=9, B=3, C=7, D=1", (9.0, 3.0, 7.0, 1.0)),
        (LIST_CRITIQUE + "\nscores: a=9 b=3 c=7 d=1", (9.0, 3.0, 7.0, 1.0)),
        (LIST_CRITIQUE + "\nScores:\nA: 9\nB: 3\nC: 7.5\nD: 1", (9.0, 3.0, 7.5, 1.0)),
        (LIST_CRITIQUE + "\nScores: A = 9/10, B = 3 / 10, C=7, D=1", (9.0, 3.0, 7.0, 1.0)),
        (LIST_CRITIQUE + "\nScores: D=1, C=7, B=3, A=9", (9.0, 3.0, 7.0, 1.0)),  # any order
        (LIST_CRITIQUE + "\n<answer>Scores: A=9, B=3, C=7, D=1</answer>", (9.0, 3.0, 7.0, 1.0)),
        # The last block wins; a block in the thinking is ignored.
        (
            "Scores: A=1, B=1, C=1, D=1\nOn reflection:\nScores: A=9, B=3, C=7, D=1",
            (9.0, 3.0, 7.0, 1.0),
        ),
        (QWEN_THINK + "Scores: A=2, B=2, C=2, D=2", (2.0, 2.0, 2.0, 2.0)),
        ("so Scores: A=1 maybe\n</think>\nScores: A=8, B=6, C=4, D=2", (8.0, 6.0, 4.0, 2.0)),
        # The block ends at a blank line: later prose with `x=5` is not an entry.
        ("Scores: A=9, B=3, C=7, D=1\n\nNote: x=5 and I=2 elsewhere.", (9.0, 3.0, 7.0, 1.0)),
        # A constrained critique may end in a letter right before the block.
        ("A wins, clearlyScores: A=9, B=3, C=7, D=1", (9.0, 3.0, 7.0, 1.0)),
        # The same score repeated is no conflict.
        ("Scores: A=9, B=3, C=7, D=1, A=9", (9.0, 3.0, 7.0, 1.0)),
    ],
)
def test_listwise_scores_every_candidate_in_order(text: str, scores: tuple[float, ...]) -> None:
    verdict = parse_listwise(text, 4, 1, 10)
    assert verdict.scores == scores
    assert verdict.problems == ()


def test_listwise_critique_is_the_text_before_the_last_block() -> None:
    verdict = parse_listwise(LIST_CRITIQUE + "\n<answer>Scores: A=9, B=3, C=7, D=1", 4, 1, 10)
    assert verdict.critique == LIST_CRITIQUE
    assert parse_listwise(QWEN_THINK + "Fine.\nScores: A=1, B=2", 2, 1, 10).critique == "Fine."


@pytest.mark.parametrize(
    ("text", "scores", "problem"),
    [
        # Skipped candidates get None, never a default.
        ("Scores: A=9, C=7, D=1", (9.0, None, 7.0, 1.0), "B: no score"),
        ("Scores: A=9, B=, C=7, D=1", (9.0, None, 7.0, 1.0), "B: no score"),
        ("Scores: A=9, B=?, C=7", (9.0, None, 7.0, None), "D: no score"),
        # Out of range, a fraction of another total: None, naming it.
        ("Scores: A=9, B=11, C=7, D=0", (9.0, None, 7.0, None), "B: 11 is outside 1-10"),
        ("Scores: A=9, B=-3, C=7, D=1", (9.0, None, 7.0, 1.0), "B: -3 is outside 1-10"),
        ("Scores: A=9, B=3/5, C=7, D=1", (9.0, None, 7.0, 1.0), "not a fraction of 10"),
        # Conflicting duplicates: None; an out-of-range duplicate spoils the candidate too.
        ("Scores: A=9, B=3, C=7, D=1, B=4", (9.0, None, 7.0, 1.0), "B: conflicting scores 3, 4"),
        ("Scores: A=9, B=3, C=7, D=1, B=40", (9.0, None, 7.0, 1.0), "B: 40 is outside 1-10"),
        # A label that is not a candidate is ignored (and named).
        ("Scores: A=9, B=3, C=7, D=1, E=5", (9.0, 3.0, 7.0, 1.0), "E is not a candidate (A-D)"),
    ],
)
def test_listwise_a_candidate_without_a_usable_score_is_none(
    text: str, scores: tuple[float | None, ...], problem: str
) -> None:
    verdict = parse_listwise(text, 4, 1, 10)
    assert verdict.scores == scores
    assert any(problem in p for p in verdict.problems), verdict.problems


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (LIST_CRITIQUE, "no `Scores: A=.., B=..` block"),
        ("A=9, B=3, C=7, D=1", "no `Scores: A=.., B=..` block"),
        ("<think>Scores: A=9, B=3, C=7, D=1</think>A is best.", "only in the thinking"),
        ("<think>\nScores: A=9, B=3, C=7, D=1", "unclosed <think>"),
        ("Scores: A=9, B=3, C=7, D=1\nWait:\nScores: none of them", "no usable score"),
        ("Scores: A=11, B=0, C=12, D=-1", "no usable score (A: 11 is outside 1-10"),
        ("Scores: A=9, A=3", "A: conflicting scores 3, 9"),
    ],
)
def test_listwise_without_any_usable_score_is_an_error(text: str, reason: str) -> None:
    with pytest.raises(JudgementParseError) as caught:
        parse_listwise(text, 4, 1, 10)
    assert reason in caught.value.reason
    assert caught.value.raw == text


def test_listwise_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="2-26 candidates"):
        parse_listwise("Scores: A=1", 1, 1, 10)
    with pytest.raises(ValueError, match="invalid score range"):
        parse_listwise("Scores: A=1, B=2", 2, 10, 1)
    with pytest.raises(ValueError, match="2-26 candidates"):
        listwise_answer_regex(27, 1, 10, 100)
    with pytest.raises(ValueError, match="invalid score range"):
        listwise_answer_regex(2, 10, 1, 100)


_LIST_PIECES = [*_PIECES, "Scores: A=3, B=4", "scores:", "A=11", "\n\n", "Z=1", "[[B]]", "\\"]


@pytest.mark.parametrize("candidates", [2, 3, 8, 26])
def test_listwise_regex_matches_what_parses(candidates: int) -> None:
    """Every text the regex matches parses to the scores of its final block, in order."""
    regex = listwise_answer_regex(candidates, 1, 10, 300)
    _plain_regex(regex)
    rng = random.Random(candidates)
    for _ in range(300):
        pieces = "".join(rng.choice(_LIST_PIECES) for _ in range(rng.randrange(12)))
        critique = pieces.lstrip(" \t\r\n")
        while critique.startswith("<t"):
            critique = critique[1:].lstrip(" \t\r\n")
        critique = critique[:300]
        scores = [rng.randint(1, 10) for _ in range(candidates)]
        block = ", ".join(f"{candidate_label(i)}={n}" for i, n in enumerate(scores))
        text = f"{critique}Scores: {block}"
        assert re.fullmatch(regex, text), text
        verdict = parse_listwise(text, candidates, 1, 10)
        assert verdict.scores == tuple(float(n) for n in scores), text
        assert verdict.problems == ()


def test_listwise_regex_accepts_exactly_the_valid_answers() -> None:
    regex = listwise_answer_regex(3, 1, 10, 100)
    for text in [
        "Scores: A=1, B=10, C=5",
        "A is best, C close.\nScores: A=9, B=2, C=8",
        "<b>A</b> wins.\n\nScores: A=9, B=2, C=8",
        "Scores: A=1, B=1, C=1 was a draft.\nScores: A=9, B=2, C=8",
        "</think>x\\boxed{3} [[B]]Scores: A=9, B=2, C=8",
    ]:
        assert re.fullmatch(regex, text), text
    for text in [
        "Scores: A=1, B=10",  # a candidate skipped
        "Scores: A=1, C=5, B=10",  # out of order
        "Scores: A=1, B=10, C=5, D=5",  # a candidate too many
        "Scores: A=0, B=10, C=5",  # out of range
        "Scores: A=1, B=11, C=5",
        "Scores: A=1.5, B=10, C=5",  # integers only
        "Scores: A=01, B=10, C=5",
        "Scores: a=1, b=10, c=5",
        "Scores: A=1,B=10,C=5",
        "Scores: A=1, B=10, C=5\n",  # nothing after the block
        "Scores: A=1, B=10, C=5 Done.",
        " A wins.Scores: A=1, B=10, C=5",  # the critique starts with a space
        "<think>A wins.Scores: A=1, B=10, C=5",
        "x" * 101 + "Scores: A=1, B=10, C=5",  # the critique is too long
        "A wins.",
    ]:
        assert re.fullmatch(regex, text) is None, text
    assert re.fullmatch(listwise_answer_regex(2, 1, 10, 0), "Scores: A=3, B=4")
    assert re.fullmatch(listwise_answer_regex(2, 1, 10, 0), "x Scores: A=3, B=4") is None
    assert re.fullmatch(listwise_answer_regex(2, -2, 2, 0), "Scores: A=-2, B=0")
    assert re.fullmatch(listwise_answer_regex(2, -2, 2, 0), "Scores: A=-3, B=0") is None

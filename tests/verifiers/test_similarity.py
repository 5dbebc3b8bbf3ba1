"""Similarity metrics: bounds, identity, ordering, normalization and empty texts."""

from __future__ import annotations

import pytest

from rmserve.models.verifiers.similarity import METRICS, Metric, similarity

REFERENCE = "the cat sat on the mat"
CLOSE = "the cat sat on a mat"
FAR = "a dog ran in the park"
DISJOINT = "xyz qqq"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("text", [REFERENCE, "x", "Paris", "日本語のテキスト", "  spaced   out \n"])
def test_identical_texts_score_one(metric: Metric, text: str) -> None:
    assert similarity(text, text, metric) == 1.0
    assert similarity(text, text, metric, case_sensitive=True, normalize_whitespace=False) == 1.0


@pytest.mark.parametrize("metric", METRICS)
def test_disjoint_texts_score_zero(metric: Metric) -> None:
    assert similarity(DISJOINT, REFERENCE, metric) == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize("metric", ["exact", "bleu", "rouge1", "rouge2", "rougeL"])
def test_disjoint_words_score_exactly_zero(metric: Metric) -> None:
    assert similarity(DISJOINT, REFERENCE, metric) == 0.0


@pytest.mark.parametrize("metric", [m for m in METRICS if m != "exact"])
def test_a_closer_answer_scores_higher(metric: Metric) -> None:
    close, far = similarity(CLOSE, REFERENCE, metric), similarity(FAR, REFERENCE, metric)
    assert 0.0 < close < 1.0
    assert 0.0 <= far < close


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("answer", "reference"),
    [(CLOSE, REFERENCE), (FAR, REFERENCE), ("a", "b"), ("3.14", "3.14159"), ("é", "e")],
)
def test_scores_are_within_bounds(metric: Metric, answer: str, reference: str) -> None:
    assert 0.0 <= similarity(answer, reference, metric) <= 1.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("Paris", 1.0), ("paris", 1.0), (" Paris\n", 1.0), ("Pari", 0.0), ("Paris.", 0.0)],
)
def test_exact(answer: str, expected: float) -> None:
    assert similarity(answer, "PARIS", "exact") == expected


def test_case_sensitivity() -> None:
    assert similarity("Paris", "paris", "exact", case_sensitive=True) == 0.0
    assert similarity("Paris", "paris", "fuzzy", case_sensitive=True) == pytest.approx(0.8)
    assert similarity("The Cat", "the cat", "chrf", case_sensitive=True) < 1.0
    assert similarity("The Cat", "the cat", "bleu", case_sensitive=True) < 1.0
    # rouge_score's tokenizer lowercases: case never matters for ROUGE.
    assert similarity("The Cat", "the cat", "rouge1", case_sensitive=True) == 1.0


def test_case_folding_goes_beyond_lowercase() -> None:
    assert similarity("STRASSE", "straße", "exact") == 1.0


def test_whitespace_normalization() -> None:
    assert similarity("a  b\n c ", "a b c", "exact") == 1.0
    assert similarity("a  b\n c ", "a b c", "exact", normalize_whitespace=False) == 0.0
    assert similarity("a  b", "a b", "fuzzy", normalize_whitespace=False) < 1.0


@pytest.mark.parametrize("metric", METRICS)
def test_empty_texts(metric: Metric) -> None:
    assert similarity("", "", metric) == 1.0
    assert similarity("  \n", "", metric) == 1.0  # empty once whitespace is normalized
    assert similarity("", "something", metric) == 0.0
    assert similarity("something", "", metric) == 0.0
    assert similarity(" ", "", metric, normalize_whitespace=False) == 0.0


def test_short_answers_are_not_zeroed_by_bleu() -> None:
    # Effective order: a two-word answer has no 3- or 4-grams, which alone would zero BLEU.
    assert similarity("cat sat", "the cat sat", "bleu") > 0.3


def test_rouge_drops_non_ascii_text() -> None:
    # Documented limitation of rouge_score's default tokenizer.
    assert similarity("日本語", "日本", "rouge1") == 0.0
    assert similarity("日本語", "日本", "chrf") > 0.5


def test_rouge_does_not_stem() -> None:
    assert similarity("cats running", "cat run", "rouge1") == 0.0


def test_unknown_metric_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        similarity("a", "a", "meteor")  # type: ignore[arg-type]

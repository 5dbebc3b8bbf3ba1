"""Similarity of an answer to a reference in [0, 1]: exact, fuzzy, BLEU, chrF or ROUGE.

Both texts are normalized first (whitespace runs to one space and trimmed, case folded unless
`case_sensitive`). Identical normalized texts score 1.0 with every metric, and an empty text
against a non-empty one 0.0. Caveats of the underlying libraries:

- BLEU is sacrebleu's sentence BLEU (13a tokenizer, exp smoothing) with effective order, so
  answers shorter than four tokens are not zeroed by the missing n-gram orders.
- ROUGE is rouge_score's F-measure without stemming. Its tokenizer lowercases and keeps only
  ASCII letters and digits: `case_sensitive` has no effect there, and non-ASCII text (accents,
  CJK, ...) is dropped, so such answers score 0.0 unless identical to the reference.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

from rapidfuzz import fuzz
from rouge_score import rouge_scorer  # type: ignore[import-untyped]
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.chrf import CHRF

Metric = Literal["exact", "fuzzy", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]
METRICS: tuple[str, ...] = get_args(Metric)


def similarity(
    answer: str,
    reference: str,
    metric: Metric,
    *,
    case_sensitive: bool = False,
    normalize_whitespace: bool = True,
) -> float:
    """How close `answer` is to `reference` under `metric`, in [0, 1] (1.0: identical)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    answer = _normalize(answer, case_sensitive, normalize_whitespace)
    reference = _normalize(reference, case_sensitive, normalize_whitespace)
    if answer == reference:
        return 1.0
    if metric == "exact" or not answer or not reference:
        return 0.0
    return min(1.0, max(0.0, _score(answer, reference, metric)))


def _normalize(text: str, case_sensitive: bool, normalize_whitespace: bool) -> str:
    if normalize_whitespace:
        text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def _score(answer: str, reference: str, metric: Metric) -> float:
    if metric == "fuzzy":
        return float(fuzz.ratio(answer, reference)) / 100
    if metric == "bleu":
        return float(_bleu().sentence_score(answer, [reference]).score) / 100
    if metric == "chrf":
        return float(_chrf().sentence_score(answer, [reference]).score) / 100
    score = _rouge(metric).score(target=reference, prediction=answer)[metric]
    return float(score.fmeasure)


@functools.cache
def _bleu() -> BLEU:
    return BLEU(effective_order=True)


@functools.cache
def _chrf() -> CHRF:
    return CHRF()


@functools.cache
def _rouge(metric: str) -> Any:
    return rouge_scorer.RougeScorer([metric], use_stemmer=False)

"""Search tool: BM25 (`bm25s`) over the documents supplied with the item, or a configured corpus.

Documents longer than `passage_words` words are split into passages of about that many words
(balanced, none longer), whose ids are the document id plus `#n`, 1-based ("doc1#2"); a short
document is one passage with the document's own id. Passages are indexed with their document's
title, tokenized by bm25s's tokenizer (lowercase words of 2+ characters, English stopwords
removed, no stemming). Only passages scoring above zero are returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, Final

import bm25s  # type: ignore[import-untyped]
from bm25s.tokenization import Tokenizer  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field

from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import Document

MAX_QUERY_CHARS: Final = 1000
MAX_TOP_K: Final = 20
_WORD = re.compile(r"\S+")


class SearchArguments(BaseModel):
    """Arguments of the search tool."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="Keywords to look for in the documents (BM25 keyword search, not semantic).",
    )
    top_k: int = Field(
        default=3, ge=1, le=MAX_TOP_K, description="How many passages to return at most."
    )


@dataclass(frozen=True)
class Passage:
    """A passage found: `id` is the document id, plus `#n` when the document was split."""

    id: str
    title: str | None
    text: str
    score: float


class SearchIndex:
    """A BM25 index over the passages of `documents`, built once; `search` is read-only, so
    one index can serve concurrent searches."""

    def __init__(self, documents: Sequence[Document], passage_words: int = 200) -> None:
        if passage_words < 1:
            raise ValueError(f"passage_words must be at least 1, got {passage_words}")
        if not documents:
            raise ToolError(
                "not_found",
                "no documents to search: give the item `documents` (id, text, optional title) "
                "or configure a corpus",
            )
        _check_unique("document", (document.id for document in documents))
        self.passages: list[Passage] = [
            passage for document in documents for passage in split(document, passage_words)
        ]
        _check_unique(
            "passage", (passage.id for passage in self.passages), " (a document id ending in #n?)"
        )
        self._tokenizer: Any = Tokenizer(stopwords="en")
        corpus = [_indexed_text(passage) for passage in self.passages]
        tokens = self._tokenizer.tokenize(
            corpus, update_vocab=True, return_as="tuple", show_progress=False
        )
        self._retriever: Any = bm25s.BM25(backend="numpy")
        self._retriever.index(tokens, show_progress=False)

    def search(self, query: str, top_k: int = 3) -> list[Passage]:
        """The `top_k` best passages for `query`, best first; [] when none matches a word."""
        _validate_query(query, top_k)
        words = self._tokenizer.tokenize(
            [query], update_vocab=False, return_as="string", allow_empty=False, show_progress=False
        )[0]
        if not words:  # only stopwords, or words absent from every passage
            return []
        k = min(top_k, len(self.passages))
        indices, scores = self._retriever.retrieve(
            [words], k=k, show_progress=False, backend_selection="numpy"
        )
        return [
            replace(self.passages[int(index)], score=float(score))
            for index, score in zip(indices[0], scores[0], strict=True)
            if score > 0
        ]


def split(document: Document, passage_words: int = 200) -> list[Passage]:
    """The passages of `document`: one if it has at most `passage_words` words, else
    ceil(words / passage_words) passages of balanced length, keeping the original spacing."""
    spans = [match.span() for match in _WORD.finditer(document.text)]
    count = -(-len(spans) // passage_words)  # ceiling division
    if count <= 1:
        return [Passage(document.id, document.title, document.text.strip(), 0.0)]
    bounds = [round(i * len(spans) / count) for i in range(count + 1)]
    return [
        Passage(
            f"{document.id}#{n}",
            document.title,
            document.text[spans[start][0] : spans[end - 1][1]],
            0.0,
        )
        for n, (start, end) in enumerate(pairwise(bounds), start=1)
    ]


def _check_unique(kind: str, ids: Iterable[str], hint: str = "") -> None:
    seen: set[str] = set()
    for id_ in ids:
        if id_ in seen:
            raise ToolError("invalid_arguments", f"{kind} id {id_!r} occurs more than once{hint}")
        seen.add(id_)


def _indexed_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def _validate_query(query: str, top_k: int) -> None:
    if not query.strip():
        raise ToolError("invalid_arguments", "query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ToolError("invalid_arguments", f"query is longer than {MAX_QUERY_CHARS} characters")
    if isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise ToolError("invalid_arguments", f"top_k must be from 1 to {MAX_TOP_K}, got {top_k}")

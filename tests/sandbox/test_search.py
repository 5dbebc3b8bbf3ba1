"""BM25 search over a small corpus: ranking, passages, bounds and refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rmserve.sandbox.search import SearchArguments, SearchIndex, split
from rmserve.wire.errors import ToolError
from rmserve.wire.trajectory import Document

CORPUS = [
    Document(
        id="photosynthesis",
        title="Photosynthesis",
        text="Plants convert sunlight, water and carbon dioxide into glucose and oxygen. "
        "Chlorophyll in the chloroplasts absorbs light, mostly red and blue wavelengths.",
    ),
    Document(
        id="eiffel",
        title="Eiffel Tower",
        text="The wrought-iron lattice tower on the Champ de Mars in Paris was designed by "
        "Gustave Eiffel's company and completed in 1889 for the World's Fair.",
    ),
    Document(
        id="python",
        text="Python is a high-level programming language created by Guido van Rossum. Its "
        "design emphasises code readability with significant indentation.",
    ),
    Document(
        id="great-wall",
        title="Great Wall of China",
        text="A series of fortifications built across northern China over many dynasties to "
        "protect against nomadic raids from the Eurasian steppe.",
    ),
    Document(
        id="volcano",
        text="A volcano is a rupture in the crust where lava, ash and gases escape from a magma "
        "chamber. Mount Vesuvius buried Pompeii in 79 AD.",
    ),
    Document(
        id="bees",
        title="Honey bees",
        text="Honey bees live in colonies with a queen, drones and workers. Workers forage for "
        "nectar and pollen and communicate with the waggle dance.",
    ),
]


@pytest.fixture(scope="module")
def index() -> SearchIndex:
    return SearchIndex(CORPUS)


@pytest.mark.parametrize(
    ("query", "first"),
    [
        ("how do plants make oxygen from sunlight", "photosynthesis"),
        ("when was the tower in Paris completed", "eiffel"),
        ("who created the Python programming language", "python"),
        ("fortifications in northern China", "great-wall"),
        ("which volcano buried Pompeii", "volcano"),
        ("waggle dance of the workers", "bees"),
        ("CHLOROPHYLL", "photosynthesis"),  # case-insensitive
        ("honey", "bees"),  # only in the title
    ],
)
def test_right_document_ranks_first(index: SearchIndex, query: str, first: str) -> None:
    passages = index.search(query, top_k=3)
    assert passages[0].id == first
    scores = [passage.score for passage in passages]
    assert scores == sorted(scores, reverse=True)
    assert all(score > 0 for score in scores)


def test_passage_fields(index: SearchIndex) -> None:
    (passage,) = index.search("Vesuvius", top_k=5)  # zero-score passages are left out
    assert passage.id == "volcano"
    assert passage.title is None
    assert passage.text == CORPUS[4].text
    assert passage.score > 0
    assert index.search("Eiffel", top_k=1)[0].title == "Eiffel Tower"


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_limits_results(index: SearchIndex, top_k: int) -> None:
    assert len(index.search("China tower Python volcano bees light", top_k=top_k)) == top_k


def test_top_k_larger_than_corpus(index: SearchIndex) -> None:
    passages = index.search("China tower Python volcano bees light", top_k=20)
    assert sorted(passage.id for passage in passages) == sorted(doc.id for doc in CORPUS)


@pytest.mark.parametrize("top_k", [0, -1, 21])
def test_top_k_out_of_range(index: SearchIndex, top_k: int) -> None:
    with pytest.raises(ToolError) as caught:
        index.search("python", top_k=top_k)
    assert caught.value.code == "invalid_arguments"
    assert "top_k" in caught.value.message


@pytest.mark.parametrize("query", ["zyzzyva quokka", "the of and", "a", "?!", "   "])
def test_queries_without_known_words(index: SearchIndex, query: str) -> None:
    if query.strip():
        assert index.search(query) == []
    else:
        with pytest.raises(ToolError, match="query is empty"):
            index.search(query)


def test_query_too_long(index: SearchIndex) -> None:
    with pytest.raises(ToolError, match="query is longer than 1000"):
        index.search("python " * 200)


def test_long_documents_are_split_into_passages() -> None:
    words = [f"w{i}" for i in range(450)]
    text = " ".join(words[:100]) + "\n\n" + " ".join(words[100:]) + " needle"
    document = Document(id="doc1", title="Long", text=text)
    passages = split(document, passage_words=200)
    assert [passage.id for passage in passages] == ["doc1#1", "doc1#2", "doc1#3"]
    assert all(passage.title == "Long" for passage in passages)
    lengths = [len(passage.text.split()) for passage in passages]
    assert sum(lengths) == 451 and max(lengths) <= 200 and min(lengths) >= 150
    assert " ".join(" ".join(passage.text.split()) for passage in passages) == " ".join(
        text.split()
    )
    assert "\n\n" in passages[0].text  # original spacing kept
    index = SearchIndex([document, *CORPUS], passage_words=200)
    assert [passage.id for passage in index.search("needle")] == ["doc1#3"]


def test_short_documents_keep_their_id() -> None:
    exact = Document(id="d", text=" ".join(["word"] * 200))
    assert [passage.id for passage in split(exact, 200)] == ["d"]
    assert [passage.id for passage in split(Document(id="e", text=""), 200)] == ["e"]
    assert [passage.id for passage in split(exact, 100)] == ["d#1", "d#2"]


def test_empty_corpus() -> None:
    with pytest.raises(ToolError) as caught:
        SearchIndex([])
    assert caught.value.code == "not_found"
    assert "no documents to search: give the item `documents`" in caught.value.message


def test_duplicate_ids() -> None:
    with pytest.raises(ToolError) as caught:
        SearchIndex([CORPUS[0], CORPUS[1], CORPUS[0]])
    assert caught.value.code == "invalid_arguments"
    assert "'photosynthesis'" in caught.value.message
    long = Document(id="x", text="word " * 300)
    with pytest.raises(ToolError, match="'x#1'"):
        SearchIndex([long, Document(id="x#1", text="other")])


def test_documents_without_words_are_indexed() -> None:
    index = SearchIndex([Document(id="blank", text=""), Document(id="stop", text="the of and")])
    assert index.search("anything") == []


def test_trajectory_documents_are_accepted() -> None:
    index = SearchIndex([Document(id="t", text="Saturn has rings", title="Saturn")])
    assert index.search("rings")[0].id == "t"


def test_arguments_models() -> None:
    arguments = SearchArguments.model_validate({"query": "python"})
    assert arguments.top_k == 3
    for bad in (
        {"query": ""},
        {"query": "x" * 1001},
        {"query": "python", "top_k": 0},
        {"query": "python", "top_k": 21},
        {"query": "python", "k": 3},
    ):
        with pytest.raises(ValidationError):
            SearchArguments.model_validate(bad)
    with pytest.raises(ValidationError):
        Document.model_validate({"id": "", "text": "x"})
    with pytest.raises(ValidationError):
        Document.model_validate({"id": "a", "text": "x", "url": "u"})
    assert "description" in SearchArguments.model_json_schema()["properties"]["query"]

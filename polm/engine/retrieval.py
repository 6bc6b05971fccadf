"""Retrieval: a document store of passages, searched by a registered retriever, and the one prompt format that
puts the passages found in front of a question.

A retriever is a plugin (``polm_register_retrievers``): a factory ``build(texts, **options) -> Retriever``
over the texts of the store's passages, whose ``search(queries, k)`` gives each query's best ``k`` passages as
``(index, score)`` pairs, best first. The engine holds the store and the prompt format, so that the
``rag_sft`` stage that tunes on retrieved passages and ``polm eval --documents`` that answers with them read
the same prompts::

    store = DocumentStore.from_spec("polm:lore-passages", retriever="bm25")
    rows = with_passages(load_rows("polm:lore", "test"), store, k=3)
    store.add(load_rows("polm:lore-passages", "added"))   # found by the next search

A passage is a row ``{"id": ..., "text": ...}`` (``title`` optional: it is written before the text); the id
defaults to the row's ``file:line``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from polm.engine.data import Row, iter_rows
from polm.engine.errors import PolmError

DEFAULT_RETRIEVER = "bm25"
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class Passage:
    """One document of a store: its id, its text, and an optional title written before it."""

    id: str
    text: str
    title: str | None = None

    def render(self) -> str:
        """The passage as a prompt shows it: ``title: text``, or the text."""
        return f"{self.title}: {self.text}" if self.title else self.text


class Retriever(Protocol):
    """What a registered retriever's factory returns, built over the texts of a store's passages."""

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Each query's best ``min(k, passages)`` passages as ``(index into the passages, score)``, best first."""
        ...


#: ``build(texts, **options)``: a :class:`Retriever` over the passages' texts (as :meth:`Passage.render` gives).
RetrieverFactory = Callable[..., Retriever]


def passage_from_row(row: Row, where: str) -> Passage:
    """A :class:`Passage` from a row ``{"id"?, "text", "title"?}`` read at ``where`` (``file:line``).

    Raises:
        PolmError: no non-empty ``text``, naming ``where``.
    """
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PolmError(f"{where}: a passage needs a non-empty 'text' field (and optionally 'id' and 'title'); "
                        f"got the fields {', '.join(row) or 'none'}")
    title = row.get("title")
    return Passage(str(row.get("id", where)), text, str(title) if title else None)


def read_passages(spec: Any, split: str = "train") -> list[Passage]:
    """The passages of ``spec`` (``polm:<name>``, a JSONL/JSON/CSV/parquet file or folder, a list of rows).

    Raises:
        PolmError: a row without text (naming its ``file:line``), or no passages at all.
    """
    passages = [passage_from_row(row, where) for row, where in iter_rows(spec, split)]
    if not passages:
        raise PolmError(f"documents {spec}: no passages; give rows {{\"id\", \"text\"}}")
    return passages


def find_retriever(name: str) -> RetrieverFactory:
    """The registered retriever ``name``.

    Raises:
        PolmError: an unknown name, listing the registered ones.
    """
    from polm.engine.plugins import registry

    return registry("retrievers").get(name)


class DocumentStore:
    """Passages and a retriever over them; :meth:`add` puts new passages in and rebuilds the index.

    Args:
        passages: the store's passages, ids unique.
        retriever: a registered retriever (``bm25``).
        options: the retriever's keyword options.

    Raises:
        PolmError: an unknown retriever, a repeated id, or options the retriever refuses.
    """

    def __init__(self, passages: Sequence[Passage], retriever: str = DEFAULT_RETRIEVER,
                 options: Mapping[str, Any] | None = None) -> None:
        self.retriever_name = retriever
        self.options = dict(options or {})
        self._factory = find_retriever(retriever)
        self.passages: list[Passage] = []
        self.add(passages)

    @classmethod
    def from_spec(cls, spec: Any, split: str = "train", retriever: str = DEFAULT_RETRIEVER,
                  options: Mapping[str, Any] | None = None) -> DocumentStore:
        """A store of the passages :func:`read_passages` reads from ``spec``."""
        return cls(read_passages(spec, split), retriever, options)

    def add(self, passages: Sequence[Passage | Row]) -> None:
        """Put ``passages`` (or passage rows) in the store; the next search finds them.

        Raises:
            PolmError: an id already in the store.
        """
        added = [item if isinstance(item, Passage) else passage_from_row(item, f"added passage {number}")
                 for number, item in enumerate(passages, start=1)]
        seen = {passage.id for passage in self.passages}
        for passage in added:
            if passage.id in seen:
                raise PolmError(f"passage id {passage.id!r} is in the store twice; give each passage its own id")
            seen.add(passage.id)
        self.passages.extend(added)
        try:
            self._index = self._factory([passage.render() for passage in self.passages], **self.options)
        except TypeError as error:
            raise PolmError(f"retriever '{self.retriever_name}': {error}") from None

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, questions: Sequence[str], k: int = DEFAULT_TOP_K) -> list[list[Passage]]:
        """Each question's best ``k`` passages, best first.

        Raises:
            PolmError: ``k`` below 1.
        """
        if k < 1:
            raise PolmError(f"top_k must be at least 1, got {k}")
        if not questions:
            return []
        hits = self._index.search(list(questions), min(k, len(self.passages)))
        return [[self.passages[index] for index, _score in found] for found in hits]


def retrieval_prompt(question: str, passages: Sequence[Passage]) -> str:
    """The question with its passages before it, numbered::

        Passages:
        [1] Velmor: river Ostrak; founded 1432; ...
        [2] ...
        Question: In what year was Velmor founded?
    """
    lines = ["Passages:", *(f"[{number}] {passage.render()}" for number, passage in enumerate(passages, start=1)),
             f"Question: {question}"]
    return "\n".join(lines)


def with_passages(rows: Sequence[Row], store: DocumentStore, k: int = DEFAULT_TOP_K, *,
                  shuffle_seed: int | None = None) -> list[Row]:
    """``rows`` with each ``prompt`` replaced by :func:`retrieval_prompt` over its best ``k`` passages (the
    question kept as ``question``, the passages' ids as ``passages``). ``shuffle_seed`` shuffles each row's
    passages (seeded by the seed and the question), so that a model tuned on them learns to find the passage
    that answers rather than to read the first.

    Raises:
        PolmError: a row without a string ``prompt``.
    """
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str):
            raise PolmError(f"row {number}: answering with retrieval needs a 'prompt' question; got the fields "
                            f"{', '.join(row)}")
    found = store.search([row["prompt"] for row in rows], k)
    augmented = []
    for row, passages in zip(rows, found):
        if shuffle_seed is not None:
            passages = list(passages)
            random.Random(f"{shuffle_seed}:{row['prompt']}").shuffle(passages)
        augmented.append({**row, "prompt": retrieval_prompt(row["prompt"], passages), "question": row["prompt"],
                          "passages": [passage.id for passage in passages]})
    return augmented

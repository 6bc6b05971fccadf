"""The ``rag_sft`` stage: supervised fine-tuning on questions with retrieved passages in their prompts (RA-DIT's
language-model tuning, Lin et al., arXiv 2310.01352).

Each training row's question is searched in the document store, and its prompt becomes the question with its
best ``top_k`` passages before it (:func:`polm.engine.retrieval.retrieval_prompt`), shuffled so that the
model learns to find the passage that answers rather than to read the first; the passages that do not answer
are the distractors RA-DIT trains with. Held-out rows are answered with the passages retrieval finds for them,
in retrieval order, exactly as ``polm eval --documents`` answers::

    stages:
      - name: rag_sft
        data: polm:lore                  # questions with answers
        documents: polm:lore-passages    # passages: a bundled set's train split, or a file of {"id", "text"} rows
        top_k: 3
        max_steps: 1500
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from polm.engine.data import Row, encode_each
from polm.engine.encoding import Encoded, encode_row, keep_rows_that_fit, truncate
from polm.engine.lm import LanguageModellingOptions, LanguageModellingStage
from polm.engine.retrieval import (
    DEFAULT_RETRIEVER,
    DEFAULT_TOP_K,
    DocumentStore,
    find_retriever,
    with_passages,
)


@dataclass
class RagSFTOptions(LanguageModellingOptions):
    """Options of ``rag_sft``: ``data`` rows are ``{prompt, answer}`` (or ``{prompt, completion}``) questions."""

    documents: Any = field(default=None, metadata={
        "help": "the document store's passages: polm:<name> or a file of {id, text} rows"})
    documents_split: str = field(default="train", metadata={"help": "the split of a bundled documents set"})
    retriever: str = field(default=DEFAULT_RETRIEVER, metadata={"help": "a registered retriever (bm25)"})
    retriever_options: dict = field(default_factory=dict, metadata={"help": "the retriever's keyword options"})
    top_k: int = field(default=DEFAULT_TOP_K, metadata={
        "help": "passages put before each question (the answering one and top_k - 1 distractors)", "min": 1})
    shuffle_passages: bool = field(default=True, metadata={
        "help": "shuffle each training row's passages (seeded), so the answer is not always in the first"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.documents is None:
            raise ValueError("rag_sft needs 'documents': polm:<name> or a file of {id, text} passage rows")


class RagSFTStage(LanguageModellingStage):
    """Cross-entropy on the answers of questions asked with their retrieved passages."""

    Options = RagSFTOptions

    def check(self) -> None:
        """The retriever exists; then the base checks (the rows are read by :meth:`check_rows`)."""
        find_retriever(self.options.retriever)
        super().check()

    @cached_property
    def store(self) -> DocumentStore:
        return DocumentStore.from_spec(self.options.documents, self.options.documents_split, self.options.retriever,
                                       self.options.retriever_options)

    def retrieved(self, rows: Sequence[Row], shuffle_seed: int | None) -> list[Row]:
        return with_passages(rows, self.store, self.options.top_k, shuffle_seed=shuffle_seed)

    def encode(self, tokenizer: Any) -> Sequence[Encoded]:
        """The training questions with their passages, encoded in memory (the prompts depend on the store)."""
        rows = self.retrieved(self.rows(), 0 if self.options.shuffle_passages else None)
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, encode_each(rows, lambda row: truncate(encode_row(tokenizer, row),
                                                                                     max_length)), max_length)

    def eval_rows(self) -> list[dict[str, Any]]:
        """The held-out questions with the passages retrieval finds for them, in retrieval order."""
        rows = super().eval_rows()
        return self.retrieved(rows, None) if rows else rows


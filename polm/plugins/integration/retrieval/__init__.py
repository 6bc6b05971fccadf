"""Retrieval-augmented tuning: the ``bm25`` retriever (:mod:`.bm25`) and the ``rag_sft`` stage (:mod:`.stage`).

The document store and the prompt format they share with ``polm eval --documents`` live in the engine
(:mod:`polm.engine.retrieval`).
"""

from polm.plugins.integration.retrieval.bm25 import BM25Retriever
from polm.plugins.integration.retrieval.stage import RagSFTOptions, RagSFTStage

__all__ = ["BM25Retriever", "RagSFTOptions", "RagSFTStage"]

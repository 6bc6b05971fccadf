"""The ``bm25`` retriever: Okapi BM25 over word tokens, by ``bm25s`` (sparse matrices, numpy only).

Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond" (2009); bm25s: Lù,
arXiv 2407.03618.
"""

from __future__ import annotations

from collections.abc import Sequence

from polm.engine.errors import PolmError


class BM25Retriever:
    """BM25 over the lower-cased word tokens (two characters or more) of ``texts``.

    Args:
        texts: the passages' texts.
        k1: term-frequency saturation.
        b: length normalisation (0: none, 1: full).
        stopwords: a language's stop words dropped from passages and queries (``"en"``), or None to keep all.

    Raises:
        PolmError: bm25s is not installed (with the command that installs it).
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en") -> None:
        try:
            import bm25s
        except ImportError:
            raise PolmError("the bm25 retriever needs bm25s: pip install 'polm[rag]'") from None
        self._bm25s = bm25s
        self.stopwords = stopwords
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index(self._tokens(texts), show_progress=False)
        self.size = len(texts)

    def _tokens(self, texts: Sequence[str]):
        return self._bm25s.tokenize(list(texts), stopwords=self.stopwords, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Each query's best ``k`` passages as ``(index, score)``, best first."""
        found, scores = self.index.retrieve(self._tokens(queries), k=min(k, self.size), show_progress=False,
                                            n_threads=1)
        return [[(int(index), float(score)) for index, score in zip(row, row_scores)]
                for row, row_scores in zip(found, scores)]

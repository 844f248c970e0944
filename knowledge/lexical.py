"""BM25 over chunks' terms (``knowledge.terms``), kept by chunk id.

The index lives in memory as a sparse matrix of BM25 term weights, so a query costs one column sum
instead of a Python loop over every chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import sparse

from knowledge.terms import tokenize


class LexicalIndex:
    """Okapi BM25 over a changing set of chunks, kept by chunk id.

    A chunk arrives as its weighted terms (``knowledge.terms.chunk_terms``); ``update`` keeps them as term
    ids and counts and rebuilds the weight matrix from those arrays, which is numpy work, not Python work
    per term.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self._terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # chunk id -> (term ids, weighted counts)
        self.ids: list[str] = []
        self.weights = sparse.csc_matrix((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._terms)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._terms

    def update(self, added: dict[str, dict[str, float]], removed: Iterable[str] = ()) -> None:
        """Add chunks (id -> {term: weighted count}), drop others by id, and rebuild the weights."""
        for chunk_id in removed:
            self._terms.pop(chunk_id, None)
        for chunk_id, terms in added.items():
            ids = [self.vocab.setdefault(t, len(self.vocab)) for t in terms]
            self._terms[chunk_id] = (np.asarray(ids, dtype=np.int32),
                                     np.fromiter(terms.values(), dtype=np.float32, count=len(terms)))
        self._rebuild()

    def _rebuild(self) -> None:
        self.ids = list(self._terms)
        n_docs, n_terms = len(self.ids), len(self.vocab)
        if n_docs == 0 or n_terms == 0:
            self.weights = sparse.csc_matrix((n_docs, n_terms), dtype=np.float32)
            return
        pairs = [self._terms[i] for i in self.ids]
        widths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=n_docs)
        cols = np.concatenate([ids for ids, _ in pairs]) if widths.sum() else np.zeros(0, dtype=np.int32)
        data = np.concatenate([w for _, w in pairs]) if widths.sum() else np.zeros(0, dtype=np.float32)
        rows = np.repeat(np.arange(n_docs), widths)
        counts = sparse.csr_matrix((data, (rows, cols)), shape=(n_docs, n_terms))
        counts.sum_duplicates()
        lengths = np.asarray(counts.sum(axis=1)).ravel()
        doc_freq = np.bincount(counts.indices, minlength=n_terms).astype(np.float32)
        idf = np.log1p((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))
        norm = self.k1 * (1 - self.b + self.b * lengths / max(lengths.mean(), 1e-9))
        row_of = np.repeat(np.arange(n_docs), np.diff(counts.indptr))
        tf = counts.data
        counts.data = (idf[counts.indices] * tf * (self.k1 + 1) / (tf + norm[row_of])).astype(np.float32)
        self.weights = counts.tocsc()

    def containing(self, text: str, n: int) -> list[tuple[str, float]]:
        """The ``n`` chunks holding the largest share of ``text``'s distinct terms, as (chunk id, share).

        Each term counts by its rarity (idf), so a chunk with the quote's rare words outranks one with its
        "the" and "of"; a term no chunk holds still counts in the whole, so the share says how much of the
        text a chunk could contain. Reads only the weight matrix's columns of those terms.
        """
        terms = set(tokenize(text))
        if not terms or not self.ids:
            return []
        n_docs = len(self.ids)
        columns = [self.vocab[t] for t in terms if t in self.vocab]
        present = self.weights[:, columns]
        doc_freq = np.diff(present.indptr)
        idf = np.log1p((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))
        total = idf.sum() + (len(terms) - len(columns)) * np.log1p((n_docs + 0.5) / 0.5)
        present.data = np.ones_like(present.data)
        return self._best(np.asarray(present @ idf).ravel() / total, n)

    def search(self, query: str, n: int, allowed: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The ``n`` best (chunk id, score) pairs with a score above zero; ``allowed`` masks rows."""
        columns = [self.vocab[t] for t in tokenize(query) if t in self.vocab]
        if not columns or not self.ids:
            return []
        # A query term that occurs twice counts twice, as in BM25's sum over query terms.
        scores = np.asarray(self.weights[:, columns].sum(axis=1)).ravel()
        if allowed is not None:
            scores = np.where(allowed, scores, 0.0)
        return self._best(scores, n)

    def _best(self, scores: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The ``n`` highest (chunk id, score) pairs with a score above zero, best first."""
        n = min(n, int((scores > 0).sum()))
        if n == 0:
            return []
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.ids[i], float(scores[i])) for i in top]

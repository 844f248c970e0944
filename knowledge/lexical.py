"""BM25 over chunk texts, with a tokenizer that works for Japanese as well as English.

Why not whitespace tokens: a Japanese sentence has no spaces, so it would be one token and never match.
Japanese runs (kanji, hiragana, katakana) become overlapping character bigrams, which need no dictionary
and match any word of two or more characters. Latin words and codes are lower-cased; a code such as
``ZX-4471-B`` is kept whole and also split into its parts, so both ``zx-4471-b`` and ``4471`` find it.

The index lives in memory as a sparse matrix of BM25 term weights, so a query costs one column sum
instead of a Python loop over every chunk.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import numpy as np
from scipy import sparse

_TOKEN = re.compile(
    r"[a-z0-9]+(?:[-_./:][a-z0-9]+)*"  # words, numbers and codes
    r"|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u30fc々〆ヶ]+"  # Japanese runs
)
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u30fc々〆ヶ]")


def tokenize(text: str) -> list[str]:
    tokens = []
    for match in _TOKEN.finditer(unicodedata.normalize("NFKC", text).lower()):
        token = match.group()
        if _JAPANESE.match(token):
            if len(token) == 1:
                tokens.append(token)
            else:
                tokens += [token[i : i + 2] for i in range(len(token) - 1)]
        else:
            tokens.append(token)
            parts = re.split(r"[-_./:]", token)
            if len(parts) > 1:
                tokens += [p for p in parts if p]
    return tokens


class LexicalIndex:
    """Okapi BM25 over a changing set of chunks, kept by chunk id.

    Chunks are tokenized once, when they arrive; ``update`` only tokenizes new chunks and rebuilds the
    weight matrix from cached token ids, which is numpy work, not Python work per token.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self._tokens: dict[str, np.ndarray] = {}  # chunk id -> token ids
        self.ids: list[str] = []
        self.weights = sparse.csc_matrix((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._tokens

    def update(self, added: dict[str, str], removed: Iterable[str] = ()) -> None:
        """Add chunks (id -> text), drop others by id, and rebuild the weights."""
        for chunk_id in removed:
            self._tokens.pop(chunk_id, None)
        for chunk_id, text in added.items():
            ids = [self.vocab.setdefault(t, len(self.vocab)) for t in tokenize(text)]
            self._tokens[chunk_id] = np.asarray(ids, dtype=np.int32)
        self._rebuild()

    def _rebuild(self) -> None:
        self.ids = list(self._tokens)
        n_docs, n_terms = len(self.ids), len(self.vocab)
        if n_docs == 0 or n_terms == 0:
            self.weights = sparse.csc_matrix((n_docs, n_terms), dtype=np.float32)
            return
        arrays = [self._tokens[i] for i in self.ids]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=n_docs)
        cols = np.concatenate(arrays) if lengths.sum() else np.zeros(0, dtype=np.int32)
        rows = np.repeat(np.arange(n_docs), lengths)
        counts = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(n_docs, n_terms)
        )
        counts.sum_duplicates()
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

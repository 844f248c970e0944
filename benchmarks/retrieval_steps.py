"""Each ranking step's gain, measured on the store the benchmark built: what was kept, what was dropped.

The steps re-rank the built store's own chunks and vectors (read back from Chroma) with one change at a time
to the lexical leg or the fusion, from the store as it was on 2026-11-25 to the store as it is now (the
product's own ``knowledge.terms`` and ``knowledge.fusion``; the benchmark checks that this row ranks like the
store searched through its front door), then the alternatives that were dropped, each as the product with one
thing changed. Earlier variants (character bigrams, no stemming, ...) are spelled out here.

The questions are split in two: a step is kept when it helps on the *tune* half (odd-numbered questions) and
the figures that count are the *report* half's (even-numbered ones), which chose nothing.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from knowledge import fusion, terms

Tokenize = Callable[[str], list[str]]
CANDIDATES = 40  # each leg's candidates, as the store takes them for k=5


def tune_half(question_id: str) -> bool:
    """True for the questions the steps were chosen on (odd-numbered), False for the report half."""
    return int(question_id.rsplit("-", 1)[1]) % 2 == 1


# -- the variants ---------------------------------------------------------------------------------------------


def _tokenizer(japanese: str, stem: bool, nfkc: bool = True) -> Tokenize:
    """A tokenizer like ``knowledge.terms.tokenize``, with its Japanese words ("bigrams", "words", "both") and
    English stemming chosen."""
    def bigrams(run: str) -> list[str]:
        return [run] if len(run) == 1 else ["b:" + run[i:i + 2] for i in range(len(run) - 1)]

    def tokenize(text: str) -> list[str]:
        tokens: list[str] = []
        text = unicodedata.normalize("NFKC", text) if nfkc else text
        for match in terms._TOKEN.finditer(text.lower()):
            token = match.group()
            if terms._JAPANESE.match(token):
                tokens += (terms._japanese_words(token) if japanese in ("words", "both") else [])
                tokens += (bigrams(token) if japanese in ("bigrams", "both") else [])
            elif terms._CODE_SEPARATORS.search(token):
                tokens += [token] + [p for p in terms._CODE_SEPARATORS.split(token) if p]
            else:
                tokens.append(terms._stem(token) if stem else token)
        return tokens

    return tokenize


def _chunk_terms(tokenize: Tokenize, title_weight: float | None) -> Callable[[str, str], dict[str, float]]:
    """``title_weight`` None: the title prepended to the text (one field); else counted apart, weighted."""
    def chunk_terms(title: str, text: str) -> dict[str, float]:
        if title_weight is None:
            return dict(Counter(tokenize(f"{title}\n{text}" if title else text)))
        counts: Counter[str] = Counter(tokenize(text))
        for term, n in Counter(tokenize(title)).items():
            counts[term] += title_weight * n
        return dict(counts)

    return chunk_terms


def _minmax_fuse(vector_weight: float):
    """The fusion as it was: each leg stretched to 0..1, equal scores in the order the legs gave them (the vector
    leg's best and the lexical leg's best tie whenever they differ, and the vector's then came first)."""
    def fuse(vector: dict[str, float], lexical: dict[str, float]) -> list[tuple[str, float]]:
        fused: dict[str, float] = {}
        for scores, weight in ((vector, vector_weight), (lexical, 1.0 - vector_weight)):
            if not scores:
                continue
            low, high = min(scores.values()), max(scores.values())
            for cid, score in scores.items():
                fused[cid] = fused.get(cid, 0.0) + weight * ((score - low) / (high - low) if high > low else 1.0)
        return sorted(fused.items(), key=lambda item: -item[1])

    return fuse


def _scaled_fuse(vector_weight: float):
    """``knowledge.fusion.fuse`` with another vector weight."""
    def fuse(vector: dict[str, float], lexical: dict[str, float]) -> list[tuple[str, float]]:
        saved, fusion.VECTOR_WEIGHT = fusion.VECTOR_WEIGHT, vector_weight
        try:
            return fusion.fuse(vector, lexical)
        finally:
            fusion.VECTOR_WEIGHT = saved

    return fuse


@dataclass
class Step:
    name: str
    chunk_terms: Callable[[str, str], dict[str, float]]
    tokenize: Tokenize
    k1: float
    fuse: Callable
    kept: bool | None  # None: the starting point


def steps() -> list[Step]:
    bigrams, words = _tokenizer("bigrams", stem=False), _tokenizer("words", stem=False)
    stemmed = _tokenizer("words", stem=True)
    old_fuse = _minmax_fuse(0.5)
    best_fuse = fusion.fuse
    product = (terms.chunk_terms, terms.tokenize, terms.BM25_K1)
    both, raw = _tokenizer("both", stem=True), _tokenizer("words", stem=True, nfkc=False)
    return [
        Step("before (2026-11-25): Japanese character bigrams, title prepended, BM25 k1 1.5, min-max fusion "
             "0.5/0.5", _chunk_terms(bigrams, None), bigrams, 1.5, old_fuse, None),
        Step("Japanese words (SudachiPy, dictionary forms) instead of bigrams", _chunk_terms(words, None), words,
             1.5, old_fuse, True),
        Step("fusion: vector weight 0.3, each leg divided by its best score, ties by chunk id",
             _chunk_terms(words, None), words, 1.5, best_fuse, True),
        Step("BM25 k1 0.9 (less reward for a repeated term)", _chunk_terms(words, None), words, 0.9, best_fuse,
             True),
        Step("English words stemmed (Snowball)", _chunk_terms(stemmed, None), stemmed, 0.9, best_fuse, True),
        Step("title as its own field, weighted 2 (BM25F): **the product**", *product, best_fuse, True),
        Step("the product with min-max scaling in the fusion", *product, _minmax_fuse(0.3), False),
        Step("the product with vector weight 0.5", *product, _scaled_fuse(0.5), False),
        Step("the product with character bigrams beside the words", _chunk_terms(both, terms.TITLE_WEIGHT), both,
             terms.BM25_K1, best_fuse, False),
        Step("the product without NFKC width folding", _chunk_terms(raw, terms.TITLE_WEIGHT), raw, terms.BM25_K1,
             best_fuse, False),
    ]


# -- the measurement ------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    titles: list[str]
    sources: list[str]
    vectors: np.ndarray  # unit rows, as stored


def read_store(path, collection: str) -> Corpus:
    """Every chunk of a store's collection, with its vector, through Chroma's public client."""
    import chromadb

    chunks = chromadb.PersistentClient(path=str(path)).get_collection(collection)
    ids, texts, titles, sources, vectors, offset = [], [], [], [], [], 0
    while True:
        got = chunks.get(limit=2000, offset=offset, include=["documents", "metadatas", "embeddings"])
        if not got["ids"]:
            break
        ids += got["ids"]
        texts += got["documents"]
        titles += [m.get("title", "") for m in got["metadatas"]]
        sources += [m["source"] for m in got["metadatas"]]
        vectors.append(np.asarray(got["embeddings"], dtype=np.float32))
        offset += len(got["ids"])
    return Corpus(ids, texts, titles, sources, np.concatenate(vectors))


class BM25:
    """Okapi BM25 over weighted term counts, in memory (the store's index keeps the same sums on disk)."""

    def __init__(self, chunk_terms: list[dict[str, float]], k1: float, b: float = terms.BM25_B):
        self.vocab: dict[str, int] = {}
        rows, cols, data = [], [], []
        for row, counts in enumerate(chunk_terms):
            for term, n in counts.items():
                rows.append(row)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                data.append(n)
        tf = sparse.csr_matrix((np.asarray(data, dtype=np.float32), (rows, cols)),
                               shape=(len(chunk_terms), len(self.vocab)))
        lengths = np.asarray(tf.sum(axis=1)).ravel()
        doc_freq = np.bincount(tf.indices, minlength=len(self.vocab))
        idf = np.log1p((len(chunk_terms) - doc_freq + 0.5) / (doc_freq + 0.5))
        norm = k1 * (1 - b + b * lengths / lengths.mean())
        row_of = np.repeat(np.arange(len(chunk_terms)), np.diff(tf.indptr))
        tf.data = idf[tf.indices] * tf.data * (k1 + 1) / (tf.data + norm[row_of])
        self.weights = tf.tocsc()

    def scores(self, query_terms: list[str]) -> np.ndarray:
        columns = [self.vocab[t] for t in query_terms if t in self.vocab]
        return np.asarray(self.weights[:, columns].sum(axis=1)).ravel()


def ranked(step: Step, corpus: Corpus, bm25: BM25, question: str, query_vector: np.ndarray, k: int) -> list[int]:
    """The top ``k`` chunks (positions in ``corpus``) for a question under ``step``."""
    cosine = corpus.vectors @ query_vector
    vector_top = np.argsort(-cosine, kind="stable")[:CANDIDATES]
    lexical = bm25.scores(step.tokenize(question))
    matching = np.flatnonzero(lexical > 0)
    lexical_top = matching[np.argsort(-lexical[matching], kind="stable")][:CANDIDATES]
    fused = step.fuse({corpus.ids[i]: float(cosine[i]) for i in vector_top},
                      {corpus.ids[i]: float(lexical[i]) for i in lexical_top})
    position = {cid: i for i, cid in enumerate(corpus.ids)}
    return [position[cid] for cid, _ in fused[:k]]


def measure(corpus: Corpus, questions, query_vectors: np.ndarray, is_hit, k: int) -> list[dict]:
    """Per step: its name, kept or not, and each question's rank of the first hit (None: not in the top k)."""
    rows = []
    for step in steps():
        bm25 = BM25([step.chunk_terms(title, text) for title, text in zip(corpus.titles, corpus.texts, strict=True)],
                    k1=step.k1)
        ranks = {}
        for question, vector in zip(questions, query_vectors, strict=True):
            top = ranked(step, corpus, bm25, question.question, vector, k)
            hit = next((rank for rank, i in enumerate(top, start=1)
                        if is_hit(question, corpus.sources[i], corpus.texts[i])), None)
            ranks[question.id] = hit
        rows.append({"name": step.name, "kept": step.kept, "ranks": ranks})
    return rows

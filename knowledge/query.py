"""What a search looks for: the question, and the conversation's earlier questions weighted below it.

A follow-up ("how much does it cost?") needs the earlier turns to know what "it" is, but when the person
changes the subject the earlier turns must not outvote the question. Both legs weigh them down: their terms
count ``EARLIER_WEIGHT`` times a term of the question in BM25, and their embedding is added to the question's
at that weight before normalising.

``translations`` are the question in the store's other language (``QUERY_TRANSLATION``: the chat model writes
them), counted as the question itself: the lexical leg can only match a Japanese passage with Japanese words,
and an English-only encoder places a question and its translation far apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from knowledge.terms import tokenize

EARLIER_WEIGHT = 0.3  # an earlier question's share against the one asked now


@dataclass(frozen=True)
class Query:
    text: str
    earlier: tuple[str, ...] = ()  # the conversation's earlier questions, most recent first
    translations: tuple[str, ...] = ()  # the question in other languages

    def terms(self) -> dict[str, float]:
        """Query terms and their weights: a term asked twice counts twice, as in BM25's sum over the query."""
        weights: Counter[str] = Counter(tokenize(self.text))
        for translation in self.translations:
            weights.update(tokenize(translation))
        for question in self.earlier:
            for term, n in Counter(tokenize(question)).items():
                weights[term] += EARLIER_WEIGHT * n
        return {term: float(w) for term, w in weights.items()}

    def vector(self, embed) -> np.ndarray:
        """The query's unit vector from ``embed(texts) -> unit rows``: the question's (the mean of its and its
        translations'), leaning toward the earlier questions' (embedded as one text) by ``EARLIER_WEIGHT``."""
        if not self.earlier and not self.translations:
            return embed([self.text])[0]
        vectors = embed([self.text, *self.translations, *(["\n".join(self.earlier)] if self.earlier else [])])
        vector = vectors[:1 + len(self.translations)].mean(axis=0)
        if self.earlier:
            vector = vector + EARLIER_WEIGHT * vectors[-1]
        return (vector / np.linalg.norm(vector)).astype(np.float32)

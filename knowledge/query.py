"""What a search looks for: the question, and the conversation's earlier questions weighted below it.

A follow-up ("how much does it cost?") needs the earlier turns to know what "it" is, but when the person
changes the subject the earlier turns must not outvote the question. Both legs weigh them down: their terms
count ``EARLIER_WEIGHT`` times a term of the question in BM25, and their embedding is added to the question's
at that weight before normalising.
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

    def terms(self) -> dict[str, float]:
        """Query terms and their weights: a term asked twice counts twice, as in BM25's sum over the query."""
        weights: Counter[str] = Counter(tokenize(self.text))
        for question in self.earlier:
            for term, n in Counter(tokenize(question)).items():
                weights[term] += EARLIER_WEIGHT * n
        return {term: float(w) for term, w in weights.items()}

    def vector(self, embed) -> np.ndarray:
        """The query's unit vector from ``embed(texts) -> unit rows``: the question's, leaning toward the earlier
        questions' (embedded as one text) by ``EARLIER_WEIGHT``."""
        if not self.earlier:
            return embed([self.text])[0]
        question, earlier = embed([self.text, "\n".join(self.earlier)])
        vector = question + EARLIER_WEIGHT * earlier
        return (vector / np.linalg.norm(vector)).astype(np.float32)

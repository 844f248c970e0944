"""The hybrid search's two legs, vector and lexical, fused into one ranking."""

from __future__ import annotations

VECTOR_WEIGHT = 0.3  # share of the vector leg in the fused score; the lexical leg has the rest (benchmark-chosen)


def fuse(vector: dict[str, float], lexical: dict[str, float]) -> list[tuple[str, float]]:
    """Relative score fusion: each leg's scores divided by its best candidate's, then weighted and summed.

    Unlike reciprocal-rank fusion, this keeps how far ahead a result is: a chunk that alone holds an
    exact code from the query leads BM25 by a wide margin, and that margin survives the fusion. Dividing
    by the best (rather than stretching the candidates to 0..1) keeps a flat leg flat: an encoder that
    cannot tell the candidates apart (an English one on a Japanese question) gives them nearly equal
    shares instead of a spread made of noise. Equal scores are ordered by chunk id, so the same query on
    the same store gives the same order every run.
    """
    fused: dict[str, float] = {}
    for scores, weight in ((vector, VECTOR_WEIGHT), (lexical, 1.0 - VECTOR_WEIGHT)):
        best = max(scores.values(), default=0.0)
        for cid, score in scores.items():
            fused[cid] = fused.get(cid, 0.0) + (weight * score / best if best > 0 else 0.0)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))

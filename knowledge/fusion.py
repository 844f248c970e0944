"""The hybrid search's two legs, vector and lexical, fused into one ranking."""

from __future__ import annotations

VECTOR_WEIGHT = 0.5  # share of the vector leg in the fused score; the lexical leg has the rest


def fuse(vector: dict[str, float], lexical: dict[str, float]) -> list[tuple[str, float]]:
    """Relative score fusion: each leg's scores scaled to 0..1 over its candidates, then weighted.

    Unlike reciprocal-rank fusion, this keeps how far ahead a result is: a chunk that alone holds an
    exact code from the query leads BM25 by a wide margin, and that margin survives the fusion.
    """
    fused: dict[str, float] = {}
    for scores, weight in ((vector, VECTOR_WEIGHT), (lexical, 1.0 - VECTOR_WEIGHT)):
        if not scores:
            continue
        low, high = min(scores.values()), max(scores.values())
        for cid, score in scores.items():
            scaled = (score - low) / (high - low) if high > low else 1.0
            fused[cid] = fused.get(cid, 0.0) + weight * scaled
    return sorted(fused.items(), key=lambda item: -item[1])

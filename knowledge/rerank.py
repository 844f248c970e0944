"""Rescoring of a search's fused candidates by a cross-encoder, which reads the query and a passage together.

The store's search hands it its best ``RERANK_CANDIDATES`` fused candidates and keeps them in the order of the
scores it returns. Off unless ``RERANK_MODEL`` names a model: none ships offline, and each query costs a
cross-encoder pass over every candidate (docs/benchmarks.md, "Reranking cost").
"""

from __future__ import annotations

from pathlib import Path

from errors import UserError
from settings import Settings


class RerankModelError(UserError):
    """The reranking model cannot be loaded; the message says what to set or fetch."""


class Reranker:
    """``RERANK_MODEL`` (a hub name or a local sentence-transformers CrossEncoder folder) on torch, in the dtype
    that ``EMBEDDING_DTYPE`` gives the embedding model."""

    def __init__(self, settings: Settings):
        from sentence_transformers import CrossEncoder

        from knowledge.embeddings import _cuda, resolve_dtype

        self.model_name = settings.rerank_model
        if not self.model_name:
            raise RerankModelError("RERANK_MODEL is unset: set it to a cross-encoder, e.g. "
                                   "RERANK_MODEL=BAAI/bge-reranker-v2-m3, or leave reranking off")
        self.candidates = settings.rerank_candidates
        self.batch_size = settings.embedding_batch_size
        try:
            self.model = CrossEncoder(self.model_name, device="cuda" if _cuda() else "cpu",
                                      model_kwargs={"dtype": resolve_dtype(settings.embedding_dtype)})
        except OSError as e:
            raise RerankModelError(_load_failure(self.model_name, e)) from None

    def rerank(self, query: str, passages: list[str]) -> list[float]:
        """One score per passage, in the passages' order; a higher score means a more relevant passage."""
        if not passages:
            return []
        scores = self.model.predict([(query, p) for p in passages], batch_size=self.batch_size,
                                    show_progress_bar=False, convert_to_numpy=True)
        return [float(s) for s in scores.reshape(len(passages), -1)[:, 0]]

    def order(self, query: str, passages: list[str]) -> list[int]:
        """Indices of ``passages``, best first by ``rerank``'s scores; ties keep the given (fused) order."""
        scores = self.rerank(query, passages)
        return sorted(range(len(passages)), key=lambda i: -scores[i])


def _load_failure(name: str, error: OSError) -> str:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):  # meant as a folder, not a hub name
        what = "no such folder" if not Path(name).expanduser().exists() else str(error).splitlines()[0]
        return (f"cannot load RERANK_MODEL={name!r}: {what}. Set RERANK_MODEL to a sentence-transformers "
                "CrossEncoder folder or a hub name such as BAAI/bge-reranker-v2-m3, or unset it to search "
                "without reranking.")
    return (f"cannot load RERANK_MODEL={name!r} ({str(error).splitlines()[0]}). If it is a hub name, check its "
            "spelling and connect to the internet once so the hub can download it; or set RERANK_MODEL to a "
            "local CrossEncoder folder; or unset it to search without reranking.")

"""The pipeline a user would build instead in ten lines, to measure our store against.

LangChain's ``RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200)``, ``langchain_chroma.Chroma``
with ``HuggingFaceEmbeddings`` and ``similarity_search``; the hybrid variant adds ``rank_bm25.BM25Okapi`` over
whitespace tokens (LangChain's ``BM25Retriever`` default ``str.split``) fused with the vector results by
reciprocal rank fusion (k=60), as LangChain's ``EnsembleRetriever`` does.

It takes already-extracted text per file, ``(source, text)`` pairs, so that only chunking and retrieval differ
from the store it is compared with.
"""

from __future__ import annotations

import uuid
from pathlib import Path

CHUNK_SIZE = 1000
CHUNK_OVERLAP = 200
RRF_K = 60


class LangChainBaseline:
    """One index, searched by vector only or by vector + whitespace BM25 (``hybrid``)."""

    def __init__(self, texts: list[tuple[str, str]], model_path: str | Path, hybrid: bool = False,
                 candidates: int = 20, batch_size: int = 500):
        import chromadb
        from langchain_chroma import Chroma
        from langchain_core.documents import Document
        from langchain_huggingface import HuggingFaceEmbeddings
        from langchain_text_splitters import RecursiveCharacterTextSplitter
        from rank_bm25 import BM25Okapi

        self.hybrid = hybrid
        self.candidates = candidates  # results taken from each leg before fusion
        splitter = RecursiveCharacterTextSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
        self.chunks: list[tuple[str, str]] = [
            (source, chunk) for source, text in texts for chunk in splitter.split_text(text)]
        self._client = chromadb.EphemeralClient(settings=chromadb.config.Settings(anonymized_telemetry=False))
        self._name = "baseline-" + uuid.uuid4().hex[:12]
        self.db = Chroma(collection_name=self._name, client=self._client,
                         embedding_function=HuggingFaceEmbeddings(model_name=str(model_path)))
        docs = [Document(page_content=text, metadata={"source": source, "idx": i})
                for i, (source, text) in enumerate(self.chunks)]
        for start in range(0, len(docs), batch_size):
            batch = docs[start:start + batch_size]
            self.db.add_documents(batch, ids=[str(d.metadata["idx"]) for d in batch])
        self.bm25 = BM25Okapi([text.split() for _, text in self.chunks]) if self.chunks else None

    def _vector(self, query: str, n: int) -> list[int]:
        return [d.metadata["idx"] for d in self.db.similarity_search(query, k=n)]

    def _lexical(self, query: str, n: int) -> list[int]:
        if self.bm25 is None:
            return []
        scores = self.bm25.get_scores(query.split())
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        return [i for i in ranked[:n] if scores[i] > 0]

    def search(self, query: str, k: int = 5, hybrid: bool | None = None) -> list[tuple[str, str]]:
        """The top ``k`` chunks as ``(source, text)``; ``hybrid`` overrides the constructor's choice."""
        hybrid = self.hybrid if hybrid is None else hybrid
        if not self.chunks:
            return []
        if not hybrid:
            ids = self._vector(query, k)
        else:
            n = max(k, self.candidates)
            fused: dict[int, float] = {}
            for ranking in (self._vector(query, n), self._lexical(query, n)):
                for rank, idx in enumerate(ranking, start=1):
                    fused[idx] = fused.get(idx, 0.0) + 1.0 / (RRF_K + rank)
            ids = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [self.chunks[i] for i in ids]

    def close(self) -> None:
        try:
            self._client.delete_collection(self._name)
        except Exception:  # noqa: BLE001 - best effort cleanup of an in-memory collection
            pass

"""The hybrid search: the vector leg (Chroma) and the lexical leg (BM25) over current versions, fused.

A search keeps only chunks of current versions (the manifest) and reads the store revision before and
after; if a write happened in between, it searches again, so it never sees both versions of a document,
or neither. Equal scores are ordered by chunk id in both legs, so the same query on the same store gives
the same order in every run and every process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from knowledge.connection import Connection, get_all
from knowledge.fusion import fuse
from knowledge.lexical import LexicalIndex
from knowledge.lexical_cache import LexicalCache
from knowledge.phrases import PhraseMatch, join_chunks, match_in
from knowledge.query import Query
from knowledge.records import Hit, chunk_id
from knowledge.versions import Versions

MODES = ("hybrid", "vector", "lexical")
# A chunk is read for a phrase when it holds at least this share of the phrase's terms (idf-weighted): low
# enough for a half of words split across two chunks, or for words with a few changed.
MIN_PHRASE_SHARE = 0.3


def chroma_where(where: dict | None) -> dict | None:
    if not where:
        return None
    clauses = [{k: {"$in": list(v)} if isinstance(v, list | tuple | set) else v} for k, v in where.items()]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class HybridSearch:
    def __init__(self, connection: Connection, versions: Versions, lexical: LexicalCache,
                 embedder: Callable[[], object], reranker: Callable[[], object | None] = lambda: None):
        self.connection, self.versions, self.lexical, self._embedder = connection, versions, lexical, embedder
        self._reranker = reranker

    def search(self, query: str | Query, k: int, where: dict | None, mode: str,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"search mode {mode!r}: use 'hybrid', 'vector' or 'lexical'")
        query = Query(query) if isinstance(query, str) else query
        if not query.text.strip() or k <= 0:
            return []
        if query_vector is None and mode != "lexical":
            embedder = self._embedder()
            query_vector = query.vector(lambda texts: np.stack([embedder.embed_query(t) for t in texts]))
        reranker = self._reranker() if mode == "hybrid" else None
        depth = max(k, reranker.candidates) if reranker is not None else k
        hits: list[Hit] = []
        for _ in range(5):  # a write between the two revision reads means: look again
            revision = self.connection.refresh()
            hits = self._search_once(query, query_vector, depth, where, mode, revision)
            if self.connection.revision() == revision:
                break
        if reranker is None or not hits:
            return hits
        # After the fusion, on current chunks only; equal scores keep the fused order.
        scores = reranker.rerank(query.text, [hit.text for hit in hits])
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
        return [replace(hits[i], score=scores[i]) for i in order[:k]]

    def _search_once(self, query, query_vector, k, where, mode, revision) -> list[Hit]:
        n = max(4 * k, 40)
        candidates: dict[str, dict] = {}  # chunk id -> {"text", "meta", "vector", "lexical"}
        vector_rank: list[str] = []
        if mode != "lexical":
            got = self.connection.chunks.query(query_embeddings=[query_vector], n_results=n,
                                               where=chroma_where(where),
                                               include=["documents", "metadatas", "distances"])
            found = sorted(zip(got["distances"][0], got["ids"][0], got["documents"][0], got["metadatas"][0],
                               strict=True), key=lambda hit: (hit[0], hit[1]))  # equal distances by chunk id
            for dist, cid, text, meta in found:
                if meta is None:  # deleted as we read it: the revision check below looks again
                    continue
                candidates[cid] = {"text": text, "meta": meta, "vector": 1.0 - dist}
                vector_rank.append(cid)
        lexical: list[tuple[str, float]] = []
        if mode != "vector":
            index = self.lexical.current(self.connection, revision)
            lexical = index.search(query.terms(), n, self._allowed(index, where))
            missing = [cid for cid, _ in lexical if cid not in candidates]
            if missing:
                got = self.connection.chunks.get(ids=missing, include=["documents", "metadatas"])
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                    if meta is not None:
                        candidates[cid] = {"text": text, "meta": meta}
            for cid, score in lexical:
                if cid in candidates:
                    candidates[cid]["lexical"] = score

        current = self.versions.current(c["meta"]["source"] for c in candidates.values())
        live = {cid for cid, c in candidates.items() if current.get(c["meta"]["source"]) == c["meta"]["version"]}
        if mode == "vector":
            ranked = [(cid, candidates[cid]["vector"]) for cid in vector_rank if cid in live]
        elif mode == "lexical":
            ranked = [(cid, score) for cid, score in lexical if cid in live]
        else:
            ranked = fuse({cid: candidates[cid]["vector"] for cid in vector_rank if cid in live},
                          {cid: score for cid, score in lexical if cid in live})
        hits = []
        for cid, score in ranked[:k]:
            meta = candidates[cid]["meta"]
            hits.append(Hit(meta["source"], meta.get("page"), cid, float(score), candidates[cid]["text"]))
        return hits

    def _allowed(self, index: LexicalIndex, where: dict | None) -> np.ndarray | None:
        """The rows ``where`` accepts: by the index's own documents for sources, else as Chroma filters them."""
        if not where:
            return None
        if set(where) == {"source"}:
            value = where["source"]
            return index.mask_of_sources(value if isinstance(value, list | tuple | set) else [value])
        got = get_all(self.connection.chunks, where=chroma_where(where), include=["metadatas"])
        return index.rows_of((m["source"], m["version"], m["position"]) for m in got["metadatas"])

    def find_phrase(self, phrase: str, candidates: int = 20) -> PhraseMatch | None:
        if not phrase.strip():
            return None
        match = None
        for _ in range(5):  # a write between the two revision reads means: look again
            revision = self.connection.refresh()
            match = self._find_phrase_once(phrase, candidates, revision)
            if self.connection.revision() == revision:
                break
        return match

    def _find_phrase_once(self, phrase: str, candidates: int, revision: str) -> PhraseMatch | None:
        index = self.lexical.current(self.connection, revision)
        chunks = {index.chunk_id(row): index.chunk(row)[:3] for row, share in index.containing(phrase, 4 * candidates)
                  if share >= MIN_PHRASE_SHARE}  # chunk id -> (source, version, position), best first
        current = self.versions.current(source for source, _, _ in chunks.values())
        live = [cid for cid, (source, version, _) in chunks.items() if current.get(source) == version]
        # Each candidate with the chunk before and after it, runs of one document merged into one window.
        windows: dict[tuple[str, str], set[int]] = {}
        for cid in live[:candidates]:
            source, version, position = chunks[cid]
            windows.setdefault((source, version), set()).update(range(max(0, position - 1), position + 2))
        ids = [chunk_id(source, version, p) for (source, version), positions in windows.items()
               for p in sorted(positions)]
        if not ids:
            return None
        got = self.connection.chunks.get(ids=ids, include=["documents", "metadatas"])
        stored = {cid: (text, meta) for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"],
                                                                strict=True)}
        best: tuple[tuple, PhraseMatch] | None = None
        rank = {cid: i for i, cid in enumerate(live)}
        for run in _runs([cid for cid in ids if cid in stored]):
            text, starts = join_chunks([stored[cid] for cid in run])
            match = match_in(phrase, text, starts, run)
            if match is None:
                continue
            order = (match.distance, min(rank.get(cid, len(rank)) for cid in run))
            if best is None or order < best[0]:
                best = (order, match)
        return best[1] if best else None


def _runs(chunk_ids: list[str]) -> list[list[str]]:
    """Chunk ids (``key:version:position``, in order) cut into runs of consecutive positions of one version."""
    runs: list[list[str]] = []
    for cid in chunk_ids:
        prefix, _, position = cid.rpartition(":")
        if runs:
            last_prefix, _, last_position = runs[-1][-1].rpartition(":")
            if last_prefix == prefix and int(last_position) + 1 == int(position):
                runs[-1].append(cid)
                continue
        runs.append([cid])
    return runs

"""The knowledge store: documents in, cited passages out, on Chroma (embedded on disk, or a server).

We use Chroma's own client rather than LangChain's wrapper because the store needs what the wrapper
hides: a second collection (the manifest), ids and filters that make a replace atomic, and numpy batches
straight from the encoder to Chroma.

``KnowledgeStore`` only puts the parts together; each job is a module of its own, and imports point down:

    records        Hit, DocumentInfo, IngestReport, StoreError, chunk ids
    connection     the Chroma client (reopened when another process wrote), retried calls, the revision
    versions       the manifest of current versions, the atomic replace, remove
    lexical        BM25 over immutable segments of numpy arrays
    lexical_cache  those segments on disk, brought up to date from the manifest
    ingest         add: read, chunk, embed a group at a time, write
    search         the hybrid search and the phrase look-up

Several processes: writes take a file lock in the store folder (``.write.lock``); every process notices
another's writes through the store's revision (``knowledge.connection``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from filelock import FileLock

from knowledge.connection import Connection
from knowledge.lexical_cache import LexicalCache, cache_folder
from knowledge.phrases import PhraseMatch
from knowledge.query import Query
from knowledge.records import DocumentInfo, Hit, IngestReport, StoreError
from knowledge.search import HybridSearch
from knowledge.versions import Versions
from settings import Settings

__all__ = ["DocumentInfo", "Hit", "IngestReport", "KnowledgeStore", "StoreError"]



class KnowledgeStore:
    """A Chroma collection of chunks, a manifest of documents, and a lexical index beside them."""

    def __init__(self, settings: Settings | None = None, embedder=None):
        self.settings = settings or Settings.from_env()
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._reranker = None
        self._lock = None
        if self.settings.chroma_host is None:
            self.settings.knowledge_dir.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.settings.knowledge_dir / ".write.lock"))
        with self._write_lock():  # the first client on a new folder creates its tables: one process at a time
            self.connection = Connection(self.settings)
        self.versions = Versions(self.connection)
        self.lexical = LexicalCache(cache_folder(self.settings))
        self._search = HybridSearch(self.connection, self.versions, self.lexical, lambda: self.embedder,
                                    lambda: self.reranker)

    @property
    def chunks(self):
        return self.connection.chunks

    @property
    def manifest(self):
        return self.connection.manifest

    @property
    def client(self):
        return self.connection.client

    @property
    def embedder(self):
        with self._embedder_lock:
            if self._embedder is None:
                from knowledge.embeddings import Embedder  # torch: only for what embeds

                self._embedder = Embedder(self.settings)
            return self._embedder

    @property
    def reranker(self):
        """The cross-encoder that rescores a hybrid search's fused candidates; None unless RERANK_MODEL is set."""
        if not self.settings.rerank_model:
            return None
        with self._embedder_lock:
            if self._reranker is None:
                from knowledge.rerank import Reranker  # torch: only when reranking

                self._reranker = Reranker(self.settings)
            return self._reranker

    def _write_lock(self):
        return self._lock if self._lock is not None else nullcontext()

    # -- documents ----------------------------------------------------------------------------------

    def documents(self) -> list[DocumentInfo]:
        return self.versions.documents()

    def sample(self, n: int, seed: int = 0) -> list[Hit]:
        """``n`` passages drawn at random from the current documents (all of them when the store holds fewer)."""
        return self.versions.sample(n, seed)

    def add(self, paths: list[str | Path], progress: Callable[[str, int], None] | None = None) -> IngestReport:
        """Add files and folders. Unchanged files are skipped; changed ones replace their old chunks.

        ``progress(source, total)`` is called once per file found, when its outcome is known.

        A failure that belongs to one file, at any stage (reading, parsing, chunking, embedding, writing),
        fails that file alone, with its reason, and the rest go on. Files are parsed and chunked in a
        worker process bounded in time and memory (``knowledge.reader``). Errors of the whole store (the
        embedding model cannot load, the store cannot be opened) still end the add.

        Chunks of several files are embedded together (``EMBED_GROUP`` at a time): the encoder sorts a
        call's texts by length, so large mixed calls waste less on padding than one call per file.
        """
        from knowledge.ingest import Ingest  # the file readers: only for what adds

        return Ingest(self.settings, self.versions, lambda: self.embedder, self._write_lock).add(paths, progress)

    def remove(self, source: str | Path) -> int:
        """Delete a document's chunks; returns how many. ``source`` is as listed, or a path to it."""
        source = self.versions.resolve_source(source)
        with self._write_lock():
            self.connection.refresh()
            return self.versions.remove(source)

    # -- search -------------------------------------------------------------------------------------

    def search(self, query: str | Query, k: int = 5, where: dict | None = None, mode: str = "hybrid",
               query_vector: np.ndarray | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` (text, or a ``Query`` with earlier turns), best first.

        ``mode``: "hybrid" fuses vector and BM25 scores (``knowledge.fusion``); "vector" and "lexical" use
        one leg. ``where`` filters on chunk metadata by equality (a list value means any of), e.g.
        ``{"source": "/docs/a.pdf"}``. The score is the fused score (0..1) in hybrid mode (the reranker's
        score when ``RERANK_MODEL`` is set: it reorders the ``RERANK_CANDIDATES`` best fused chunks), the
        cosine similarity in vector mode and the BM25 score in lexical mode. ``query_vector``, when given,
        is used instead of embedding ``query`` (benchmarks time the store apart from the encoder).
        """
        return self._search.search(query, k, where, mode, query_vector)

    def find_phrase(self, phrase: str, candidates: int = 20) -> PhraseMatch | None:
        """Where the store's current documents hold ``phrase``, exactly or nearly (``knowledge.phrases``).

        Every chunk is considered, not only a search's top k, and none is read as text to choose: the
        lexical index ranks chunks by the share of the phrase's terms they hold (``LexicalIndex.containing``);
        the ``candidates`` best of the current versions are read with their neighbours on either side, so
        words split across two chunks (or a PDF page break) are whole in one window. The best match wins:
        exact before near-exact, then the fewest differences, then the higher share.
        """
        return self._search.find_phrase(phrase, candidates)

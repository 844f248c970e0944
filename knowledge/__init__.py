"""Documents in, cited passages out: a Chroma store with hybrid (BM25 + vector) search."""

from knowledge.loaders import LoadError
from knowledge.store import DocumentInfo, Hit, IngestReport, KnowledgeStore, StoreError

__all__ = ["DocumentInfo", "Hit", "IngestReport", "KnowledgeStore", "LoadError", "StoreError"]

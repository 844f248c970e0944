"""What the store hands out: hits, documents, an add's report, and the store's own error.

Each is one named type that crosses the store's boundary (to the app, the CLI and the benchmarks), so it
lives here, beneath every module of the store, and ``knowledge`` and ``knowledge.store`` re-export it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from errors import UserError


class StoreError(UserError):
    """The store cannot do what was asked; the message says why and what to do."""


@dataclass
class Hit:
    source: str
    page: int | None
    chunk_id: str
    score: float
    text: str

    def to_dict(self) -> dict:
        return {"source": self.source, "page": self.page, "chunk_id": self.chunk_id, "score": self.score,
                "text": self.text}


@dataclass
class DocumentInfo:
    source: str
    chunks: int
    version: str
    title: str
    added_at: float

    def to_dict(self) -> dict:
        return {"source": self.source, "chunks": self.chunks, "title": self.title,
                "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.added_at))}


@dataclass
class IngestReport:
    added: list[dict] = field(default_factory=list)  # {"source", "chunks"} (+ "warnings")
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}
    failed: list[dict] = field(default_factory=list)  # {"source", "error"}

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"added": self.added, "skipped": self.skipped, "failed": self.failed}


def source_key(source: str) -> str:
    """The short key of a source inside its chunks' ids."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:12]


def chunk_id(source: str, version: str, position: int) -> str:
    """A chunk's id: ``key:version:position``, so one version's chunks are found without a query."""
    return f"{source_key(source)}:{version}:{position}"

"""Documents as versions: the manifest of which version of each file is current, and the atomic replace.

Chunks are stored under ids derived from the file's content hash (its *version*), and the manifest records
which version of each source is current. Making a new version current writes its chunks (invisible: not
current yet), then flips the manifest records in one write, then deletes the old versions' chunks. Every
write moves the store's revision (``knowledge.connection``), which is how searches and other processes
notice it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knowledge.chunking import Chunk
from knowledge.connection import Connection, get_all
from knowledge.records import DocumentInfo, Hit, StoreError, chunk_id


@dataclass
class LoadedFile:
    """A file read and chunked, ready to become the current version of its source."""

    source: str
    version: str  # content hash of the file
    title: str
    chunks: list[Chunk]
    warnings: list[str]


class Versions:
    def __init__(self, connection: Connection):
        self.connection = connection

    def documents(self) -> list[DocumentInfo]:
        got = get_all(self.connection.manifest, where={"kind": "document"}, include=["metadatas"])
        docs = [DocumentInfo(m["source"], m["chunks"], m["version"], m.get("title", ""), m["added_at"])
                for m in got["metadatas"]]
        return sorted(docs, key=lambda d: d.source)

    def current(self, sources: Iterable[str]) -> dict[str, str]:
        """source -> current version, for those of ``sources`` in the store."""
        sources = list(set(sources))
        if not sources:
            return {}
        got = self.connection.manifest.get(ids=["doc:" + s for s in sources], include=["metadatas"])
        return {m["source"]: m["version"] for m in got["metadatas"]}

    def all_current(self) -> dict[str, str]:
        return {d.source: d.version for d in self.documents()}

    def sample(self, n: int, seed: int = 0) -> list[Hit]:
        """``n`` passages drawn at random from the current documents (all of them when the store holds fewer)."""
        slots = [(d, position) for d in self.documents() for position in range(d.chunks)]
        picked = random.Random(seed).sample(slots, min(n, len(slots)))
        ids = [chunk_id(d.source, d.version, position) for d, position in picked]
        got = self.connection.chunks.get(ids=ids, include=["documents", "metadatas"]) if ids else {"ids": []}
        found = {cid: Hit(meta["source"], meta.get("page"), cid, 0.0, text)
                 for cid, text, meta in zip(got["ids"], got.get("documents") or [], got.get("metadatas") or [],
                                            strict=True)}
        return [found[cid] for cid in ids if cid in found]

    def replace(self, items: list[LoadedFile], embeddings: np.ndarray) -> None:
        """Make ``items`` the current version of their files, all in a few writes (under the write lock).

        The new chunks go in first, invisible because the manifest still names the old versions; one
        manifest write then switches every file over; the old versions' chunks go last. Chroma spends
        tens of milliseconds on each write whatever its size, so writing per flush, not per file,
        keeps an ingest of many small files at the encoder's pace.
        """
        ids, texts, metadatas, new_version = [], [], [], {}
        for item in items:
            new_version[item.source] = item.version
            for c in item.chunks:
                ids.append(chunk_id(item.source, item.version, c.position))
                texts.append(c.text)
                meta = {"source": item.source, "version": item.version, "position": c.position, "start": c.start,
                        "content_hash": c.content_hash, "title": item.title}
                if c.page is not None:
                    meta["page"] = c.page
                metadatas.append(meta)
        batch = self.connection.max_batch()
        chunks = self.connection.chunks
        try:
            for i in range(0, len(ids), batch):
                chunks.upsert(ids=ids[i:i + batch], embeddings=embeddings[i:i + batch],
                              documents=texts[i:i + batch], metadatas=metadatas[i:i + batch])
        except BaseException:
            # Not yet current, so never seen by a search; leave nothing behind either.
            self.delete_chunks(lambda meta: new_version.get(meta["source"]) == meta["version"], list(new_version))
            raise
        now = time.time()
        self.connection.bump_revision([("doc:" + item.source, {
            "kind": "document", "source": item.source, "version": item.version, "chunks": len(item.chunks),
            "title": item.title, "added_at": now}) for item in items])
        # Older versions, and any a crashed add left behind, are no longer current: drop them.
        if self.delete_chunks(lambda meta: new_version[meta["source"]] != meta["version"], list(new_version)):
            self.connection.bump_revision()

    def delete_chunks(self, stale: Callable[[dict], bool], sources: list[str], group: int = 500) -> int:
        """Delete the chunks of ``sources`` whose metadata ``stale`` accepts; returns how many."""
        doomed = []
        for i in range(0, len(sources), group):
            got = get_all(self.connection.chunks, where={"source": {"$in": sources[i:i + group]}},
                          include=["metadatas"])
            doomed += [cid for cid, meta in zip(got["ids"], got["metadatas"], strict=True) if stale(meta)]
        batch = self.connection.max_batch()
        for i in range(0, len(doomed), batch):
            self.connection.chunks.delete(ids=doomed[i:i + batch])
        return len(doomed)

    def remove(self, source: str) -> int:
        """Delete a document (under the write lock): the manifest record first, then its chunks."""
        current = self.connection.manifest.get(ids=["doc:" + source], include=["metadatas"])
        if not current["ids"]:
            raise StoreError(f"no document {source!r} in the store; `python -m knowledge list` shows them")
        self.connection.manifest.delete(ids=["doc:" + source])
        self.connection.bump_revision()
        self.connection.chunks.delete(where={"source": source})
        self.connection.bump_revision()
        return current["metadatas"][0]["chunks"]

    def resolve_source(self, source: str | Path) -> str:
        """``source`` as the store names it: as given, or as an absolute path."""
        text = str(source)
        if self.current([text]):
            return text
        resolved = str(Path(text).expanduser().resolve())
        return resolved if self.current([resolved]) else text

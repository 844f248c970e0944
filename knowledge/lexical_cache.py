"""The lexical index on disk beside the store: a derived cache, kept up to date from the manifest.

Layout of the cache folder (one per store; a replica on a Chroma server keeps its own, locally)::

    state.json            which segments and which live mask make the index, and of what
    seg-<id>/             an immutable segment (``knowledge.lexical``)
    live-<id>.npy         which rows of the segments, in order, are live

``state.json`` names the store revision it matches and records, through its segments, which version of
each document it indexed. A process whose store revision differs compares those versions with the
manifest's and reads from Chroma only the chunks of documents whose versions changed; a removed or replaced
document's rows are only marked dead. Every change is written to new files first, then ``state.json`` is
replaced in one rename, so a crash at any point leaves the previous state whole (the new files are
orphans, swept by the next writer). A state of another ``TERMS_VERSION`` or format is ignored and rebuilt.
Writers take a file lock; readers need none, they memory-map what ``state.json`` names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from knowledge.connection import Connection, get_all
from knowledge.lexical import LexicalIndex, Segment, SegmentBuilder, SegmentRow, merge_segments
from knowledge.records import chunk_id
from knowledge.terms import BM25_B, BM25_K1, TERMS_VERSION, chunk_terms
from settings import Settings

log = logging.getLogger(__name__)

FORMAT = 1
# Rows of a new segment (a little more: the document that crosses the mark goes whole) and of a merged one at
# most. It bounds the memory of building or merging one, whatever the size of the store: what is held is that
# segment's postings, 8 bytes each (about 100-130 a chunk of 1,000 characters: 70-90 MB at 65,536 rows), and
# about 3 times that while it is sorted and written. A million chunks make 16 segments, searched one by one.
SEGMENT_ROWS = 1 << 16
MERGE_AT = 4  # this many small segments (under a quarter of SEGMENT_ROWS live rows) are merged into one
READ_CHUNKS = 1000  # chunks read from Chroma in one call at most, several documents' at a time


def cache_folder(settings: Settings) -> Path:
    """Beside the embedded store; for a Chroma server, a local folder named after it."""
    if settings.chroma_host:
        name = f"{settings.chroma_host}_{settings.chroma_port}_{settings.collection}"
        return Path(settings.knowledge_dir) / "lexical-cache" / name
    return Path(settings.knowledge_dir) / "lexical" / settings.collection


class LexicalCache:
    """This process's view of the cache: the current ``LexicalIndex`` snapshot, and bringing it up to date."""

    def __init__(self, folder: Path, k1: float = BM25_K1, b: float = BM25_B):
        self.folder, self.k1, self.b = Path(folder), k1, b
        self.index = LexicalIndex([], np.zeros(0, dtype=bool), k1, b)
        self.revision: str | None = None  # the store revision self.index matches
        self._generation: str | None = None
        self._lock = threading.Lock()
        self.reads: list[str] = []  # sources whose chunks this process read from Chroma (for tests and benchmarks)

    def current(self, connection: Connection, revision: str) -> LexicalIndex:
        """The index at store ``revision``: loaded from disk if the cache has it, else brought up to date."""
        with self._lock:
            if self.revision == revision:
                return self.index
            state = self._read_state()
            if state is not None and state["revision"] == revision:
                try:
                    self._load(state)
                    return self.index
                except FileNotFoundError:  # a writer swept that state's files after we read it: look again
                    pass
            self.folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.folder / ".lock")):
                state = self._read_state()  # another process may have brought it up to date meanwhile
                if state is not None and state["revision"] == revision:
                    self._load(state)
                else:
                    self._catch_up(connection, revision, state)
            return self.index

    # -- reading ------------------------------------------------------------------------------------

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        if state.get("format") != FORMAT or state.get("terms_version") != TERMS_VERSION:
            return None  # indexed with other terms: rebuilt from the store
        return state

    def _load(self, state: dict) -> None:
        if state["generation"] != self._generation:
            by_name = {s.name: s for s in self.index.segments}
            segments = [by_name.get(name) or Segment(self.folder / name) for name in state["segments"]]
            live = np.load(self.folder / state["live"])
            self.index = LexicalIndex(segments, live, self.k1, self.b)
            self._generation = state["generation"]
        self.revision = state["revision"]

    # -- writing (under the file lock) --------------------------------------------------------------

    def _catch_up(self, connection: Connection, revision: str, state: dict | None) -> None:
        if state is None:
            self.index = LexicalIndex([], np.zeros(0, dtype=bool), self.k1, self.b)
            self._generation = None
        else:
            self._load(state)
        manifest = get_all(connection.manifest, where={"kind": "document"}, include=["metadatas"])["metadatas"]
        wanted = {m["source"]: m for m in manifest}
        index = self.index
        gone = [s for s in index.docs if s not in wanted or wanted[s]["version"] != index.version(s)]
        new = sorted(s for s, m in wanted.items() if index.version(s) != m["version"])
        live = index.live.copy()
        for source in gone:
            start, end = index.document_rows(source)
            live[start:end] = False
        segments, complete = list(index.segments), True
        builder = SegmentBuilder()
        for meta, rows in self._read_documents(connection, [wanted[source] for source in new]):
            if rows is None:  # replaced or removed while we read: the next look catches it
                complete = False
                continue
            builder.add_document(meta["source"], meta["version"], rows)
            if len(builder) >= SEGMENT_ROWS:
                segments, live = self._add_segment(segments, live, builder)
                self._commit(segments, live, "")  # a partial catch-up is kept: a crash does not redo it
                builder = SegmentBuilder()
        if builder.docs:
            segments, live = self._add_segment(segments, live, builder)
        del builder
        segments, live = self._merge_small(segments, live)
        self._commit(segments, live, revision if complete else "")
        self.revision = revision  # this process's index matches it either way, for this revision's searches

    def _read_documents(self, connection: Connection, metas: list[dict]) -> Iterator[tuple[dict, list | None]]:
        """(meta, its rows) of each document in order; rows None when its chunks are not all in the store.

        Reads several documents' chunks in one Chroma call, up to ``READ_CHUNKS`` (a document's own may be more).
        """
        group: list[dict] = []
        for meta in metas:
            if group and sum(m["chunks"] for m in group) + meta["chunks"] > READ_CHUNKS:
                yield from self._read_group(connection, group)
                group = []
            group.append(meta)
        if group:
            yield from self._read_group(connection, group)

    def _read_group(self, connection: Connection, metas: list[dict]) -> Iterator[tuple[dict, list | None]]:
        ids = [chunk_id(m["source"], m["version"], p) for m in metas for p in range(m["chunks"])]
        got = {}
        step = min(connection.max_batch(), READ_CHUNKS)
        for i in range(0, len(ids), step):
            part = connection.chunks.get(ids=ids[i:i + step], include=["documents", "metadatas"])
            got.update(zip(part["ids"], zip(part["documents"], part["metadatas"], strict=True), strict=True))
        del ids
        for meta in metas:
            mine = [got.pop(chunk_id(meta["source"], meta["version"], p), None) for p in range(meta["chunks"])]
            if any(m is None for m in mine):
                yield meta, None
                continue
            self.reads.append(meta["source"])
            yield meta, [SegmentRow(0, m["position"], m.get("page"), chunk_terms(m.get("title", ""), text))
                         for text, m in mine]

    def _add_segment(self, segments, live, builder: SegmentBuilder) -> tuple[list, np.ndarray]:
        name = f"seg-{uuid.uuid4().hex[:16]}"
        builder.write(self.folder / f"tmp-{name}")
        os.rename(self.folder / f"tmp-{name}", self.folder / name)
        segment = Segment(self.folder / name)
        return segments + [segment], np.concatenate([live, np.ones(segment.n_rows, dtype=bool)])

    def _merge_small(self, segments, live) -> tuple[list, np.ndarray]:
        """Merge segments under a quarter full or over half dead, once there are enough of them."""
        starts = np.cumsum([0] + [s.n_rows for s in segments])
        parts = [(s, live[starts[i]:starts[i + 1]]) for i, s in enumerate(segments)]
        small = [(s, mask) for s, mask in parts
                 if mask.sum() < SEGMENT_ROWS // 4 or mask.sum() < s.n_rows // 2]
        if len(small) < MERGE_AT and not any(not mask.any() for _, mask in small):
            return segments, live
        chosen, total = [], 0
        for s, mask in sorted(small, key=lambda p: p[1].sum()):
            if total + mask.sum() > SEGMENT_ROWS:
                break
            chosen.append((s, mask))
            total += int(mask.sum())
        kept = [(s, mask) for s, mask in parts if all(s is not c for c, _ in chosen)]
        if total:
            name = f"seg-{uuid.uuid4().hex[:16]}"
            merge_segments(self.folder / f"tmp-{name}", chosen)
            os.rename(self.folder / f"tmp-{name}", self.folder / name)
            merged = Segment(self.folder / name)
            kept.append((merged, np.ones(merged.n_rows, dtype=bool)))
        return [s for s, _ in kept], np.concatenate([m for _, m in kept]) if kept else np.zeros(0, dtype=bool)

    def _commit(self, segments: list[Segment], live: np.ndarray, revision: str) -> None:
        """Point ``state.json`` at ``segments`` and ``live``: one rename, then sweep what nothing names."""
        generation = uuid.uuid4().hex[:16]
        live_name = f"live-{generation}.npy"
        with open(self.folder / f"tmp-{live_name}", "wb") as f:
            np.save(f, live)
            f.flush()
            os.fsync(f.fileno())
        os.rename(self.folder / f"tmp-{live_name}", self.folder / live_name)
        state = {"format": FORMAT, "terms_version": TERMS_VERSION, "generation": generation, "revision": revision,
                 "segments": [s.name for s in segments], "live": live_name}
        with open(self.folder / "state.json.tmp", "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.folder / "state.json.tmp", self.folder / "state.json")
        self.index = LexicalIndex(segments, live, self.k1, self.b)
        self._generation, self.revision = generation, revision
        keep = set(state["segments"]) | {live_name, "state.json", ".lock"}
        for path in self.folder.iterdir():
            if path.name not in keep:  # older states' files and a crashed writer's (only writers hold the lock)
                shutil.rmtree(path) if path.is_dir() else path.unlink()

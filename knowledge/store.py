"""The knowledge store: documents in, cited passages out, on Chroma (embedded on disk, or a server).

We use Chroma's own client rather than LangChain's wrapper because the store needs what the wrapper
hides: a second collection (the manifest), ids and filters that make a replace atomic, and numpy batches
straight from the encoder to Chroma.

How a replace stays atomic. Chunks are stored under ids derived from the file's content hash (its
*version*), and the manifest records which version of each source is current. Adding a changed file
writes the new version's chunks (invisible: not current yet), then flips the manifest record in one
write, then deletes the old version's chunks. A search keeps only chunks of current versions and reads
a store-wide *revision* before and after; if a write happened in between, it searches again, so it never
sees both versions, or neither.

Several processes. Writes take a file lock in the store folder. An embedded Chroma client keeps its
vector index in memory and does not see what another process wrote, so when the revision moves under us
we reopen the client.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from errors import UserError
from knowledge.chunking import Chunk
from knowledge.embeddings import Embedder, EmbeddingModelError
from knowledge.files import discover, not_a_regular_file
from knowledge.fusion import fuse
from knowledge.lexical import LexicalIndex
from knowledge.loaders import LoadError
from knowledge.phrases import PhraseMatch, join_chunks, match_in
from knowledge.reader import FileReader
from knowledge.terms import chunk_terms, indexed_text
from settings import Settings

_REVISION_ID = "__revision__"
EMBED_GROUP = 1024  # chunks embedded in one call when adding many files
# A chunk is read for a phrase when it holds at least this share of the phrase's terms (idf-weighted): low
# enough for a half of words split across two chunks, or for words with a few changed.
MIN_PHRASE_SHARE = 0.3


class StoreError(UserError):
    """The store cannot do what was asked; the message says why and what to do."""


class _StageError(Exception):
    """One file (or group of files) could not be embedded or written; the message says at which stage."""


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


@dataclass
class _LoadedFile:
    source: str
    version: str  # content hash of the file
    title: str
    chunks: list[Chunk]
    warnings: list[str]


def _source_key(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:12]


def _chroma_where(where: dict | None) -> dict | None:
    if not where:
        return None
    clauses = [{k: {"$in": list(v)} if isinstance(v, list | tuple | set) else v} for k, v in where.items()]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _matches(metadata: dict, where: dict | None) -> bool:
    for key, value in (where or {}).items():
        if isinstance(value, list | tuple | set):
            if metadata.get(key) not in value:
                return False
        elif metadata.get(key) != value:
            return False
    return True


class KnowledgeStore:
    """A Chroma collection of chunks, a manifest of documents, and a lexical index beside them."""

    def __init__(self, settings: Settings | None = None, embedder: Embedder | None = None):
        self.settings = settings or Settings.from_env()
        self._embedder = embedder
        self._lock = None
        # Threads of this process share one client: reopening it, and writing the revision together with
        # remembering it, happen one thread at a time (else a search may take this process's own write for
        # another's and reopen the client under the writer).
        self._revision_lock = threading.Lock()
        if self.settings.chroma_host is None:
            self.settings.knowledge_dir.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.settings.knowledge_dir / ".write.lock"))
        with self._write_lock():  # the first client on a new folder creates its tables: one process at a time
            self._open()
        self._lexical = LexicalIndex()
        self._lexical_meta: dict[str, dict] = {}
        self._lexical_revision: str | None = None
        self._lexical_lock = threading.Lock()  # the app searches and adds from several threads

    # -- connection ---------------------------------------------------------------------------------

    def _open(self) -> None:
        import chromadb

        s = self.settings
        if s.chroma_host:
            try:
                self.client = chromadb.HttpClient(host=s.chroma_host, port=s.chroma_port)
                self.client.heartbeat()
            except Exception as e:  # noqa: BLE001 - connection errors come in many types
                raise StoreError(
                    f"cannot reach the Chroma server at {s.chroma_host}:{s.chroma_port} ({e}); start it "
                    "(`chroma run --path DIR --port PORT`) or unset CHROMA_HOST to use the store on disk"
                ) from None
        else:
            self.client = _persistent_client(s.knowledge_dir)
        self.chunks = _Retrying(self.client.get_or_create_collection(
            s.collection, configuration={"hnsw": {"space": "cosine"}},
            metadata={"embedding_model": s.embedding_model}, embedding_function=None))
        built_with = (self.chunks.metadata or {}).get("embedding_model")
        if built_with and built_with != s.embedding_model:
            raise StoreError(
                f"the store {s.collection!r} was built with embedding model {built_with!r}, not "
                f"{s.embedding_model!r}; set EMBEDDING_MODEL={built_with} or choose another "
                "KNOWLEDGE_COLLECTION (or KNOWLEDGE_DIR) to build a new store")
        self.manifest = _Retrying(self.client.get_or_create_collection(
            s.collection + "-manifest", embedding_function=None))
        self._seen_revision = self._revision()

    def _reopen_if_changed_elsewhere(self) -> str:
        with self._revision_lock:
            revision = self._revision()
            if revision != self._seen_revision and self.settings.chroma_host is None:
                self.client = _persistent_client(self.settings.knowledge_dir, fresh=True)
                self.chunks = _Retrying(self.client.get_collection(self.settings.collection))
                self.manifest = _Retrying(self.client.get_collection(self.settings.collection + "-manifest"))
            self._seen_revision = revision
            return revision

    def _revision(self) -> str:
        got = self.manifest.get(ids=[_REVISION_ID], include=["metadatas"])
        return got["metadatas"][0]["revision"] if got["ids"] else ""

    def _bump_revision(self, records: list[tuple[str, dict]] = ()) -> None:
        revision = uuid.uuid4().hex
        ids = [_REVISION_ID] + [r[0] for r in records]
        metadatas = [{"revision": revision, "kind": "revision"}] + [r[1] for r in records]
        with self._revision_lock:
            self.manifest.upsert(ids=ids, embeddings=np.ones((len(ids), 1), dtype=np.float32),
                                 metadatas=metadatas)
            self._seen_revision = revision

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.settings)
        return self._embedder

    def _write_lock(self):
        from contextlib import nullcontext

        return self._lock if self._lock is not None else nullcontext()

    # -- documents ----------------------------------------------------------------------------------

    def documents(self) -> list[DocumentInfo]:
        got = _get_all(self.manifest, where={"kind": "document"}, include=["metadatas"])
        docs = [DocumentInfo(m["source"], m["chunks"], m["version"], m.get("title", ""), m["added_at"])
                for m in got["metadatas"]]
        return sorted(docs, key=lambda d: d.source)

    def sample(self, n: int, seed: int = 0) -> list[Hit]:
        """``n`` passages drawn at random from the current documents (all of them when the store holds fewer)."""
        import random

        slots = [(d, position) for d in self.documents() for position in range(d.chunks)]
        picked = random.Random(seed).sample(slots, min(n, len(slots)))
        ids = [f"{_source_key(d.source)}:{d.version}:{position}" for d, position in picked]
        got = self.chunks.get(ids=ids, include=["documents", "metadatas"]) if ids else {"ids": []}
        found = {cid: Hit(meta["source"], meta.get("page"), cid, 0.0, text)
                 for cid, text, meta in zip(got["ids"], got.get("documents") or [], got.get("metadatas") or [],
                                            strict=True)}
        return [found[cid] for cid in ids if cid in found]

    def _current(self, sources: Iterable[str]) -> dict[str, str]:
        sources = list(set(sources))
        if not sources:
            return {}
        got = self.manifest.get(ids=["doc:" + s for s in sources], include=["metadatas"])
        return {m["source"]: m["version"] for m in got["metadatas"]}

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
        found = discover(paths)
        report = IngestReport(
            skipped=[{"source": p, "reason": r} for p, r in found.skipped],
            failed=[{"source": p, "error": e} for p, e in found.failed],
        )
        pending: list[_LoadedFile] = []

        def done(source: str) -> None:
            if progress:
                progress(source, len(found.files))

        def flush() -> None:
            for item, error in self._store(pending):
                if error:
                    report.failed.append({"source": item.source, "error": error})
                else:
                    added = {"source": item.source, "chunks": len(item.chunks)}
                    report.added.append(added | ({"warnings": item.warnings} if item.warnings else {}))
                done(item.source)
            pending.clear()

        with FileReader(self.settings) as reader:
            for path in found.files:
                try:
                    loaded = self._load(path, reader)
                except LoadError as e:
                    report.failed.append({"source": str(path), "error": str(e)})
                else:
                    if loaded is not None:
                        pending.append(loaded)
                        if sum(len(item.chunks) for item in pending) >= EMBED_GROUP:
                            flush()
                        continue
                    report.skipped.append({"source": str(path), "reason": "unchanged since it was added"})
                done(str(path))
        flush()
        return report

    def _load(self, path: Path, reader: FileReader) -> _LoadedFile | None:
        """The file's chunks, or None when the store already holds this very version of it."""
        source = str(path)
        data = self._read_bytes(path)
        version = hashlib.sha256(data).hexdigest()[:16]
        if self._current([source]).get(source) == version:
            return None
        read = reader.read(path, data)
        return _LoadedFile(source, version, read.title, read.chunks, read.warnings)

    def _read_bytes(self, path: Path) -> bytes:
        """The content of a regular file of at most MAX_FILE_MB; the bytes that are hashed are the ones parsed."""
        limit = int(self.settings.max_file_mb * 1024 * 1024)
        too_big = (f"over the {self.settings.max_file_mb:g} MB limit (raise MAX_FILE_MB to add it)")
        try:
            # Non-blocking, so that opening a named pipe that took the file's place returns at once.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                status = os.fstat(f.fileno())
                if reason := not_a_regular_file(status.st_mode):
                    raise LoadError(reason)
                if status.st_size > limit:
                    raise LoadError(f"the file is {status.st_size / 1048576:.1f} MB, {too_big}")
                data = f.read(limit + 1)  # it may have grown since
        except PermissionError:
            raise LoadError("permission denied; make the file readable") from None
        except OSError as e:
            raise LoadError(f"cannot be read ({e.strerror or e})") from None
        if len(data) > limit:
            raise LoadError(f"the file is {too_big}")
        return data

    def _store(self, items: list[_LoadedFile]) -> list[tuple[_LoadedFile, str | None]]:
        """Embed and write ``items`` together; (item, None) for each stored, (item, reason) for each not.

        When the group fails, its files are tried one at a time, so that only the file that fails is
        reported, with the stage and the error; ``_replace`` leaves nothing of a failed write behind.
        """
        if not items:
            return []
        try:
            self._embed_and_write(items)
            return [(item, None) for item in items]
        except _StageError as e:
            if len(items) == 1:
                return [(items[0], str(e))]
        outcomes = []
        for item in items:
            try:
                self._embed_and_write([item])
            except _StageError as e:
                outcomes.append((item, str(e)))
            else:
                outcomes.append((item, None))
        return outcomes

    def _embed_and_write(self, items: list[_LoadedFile]) -> None:
        try:
            vectors = self.embedder.embed_passages([indexed_text(item.title, c.text)
                                                    for item in items for c in item.chunks])
        except EmbeddingModelError:
            raise
        except Exception as e:  # noqa: BLE001 - the reason names the error's type and message
            raise _StageError(f"could not be embedded ({type(e).__name__}: {e})") from e
        try:
            with self._write_lock():
                self._reopen_if_changed_elsewhere()
                self._replace(items, vectors)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _StageError(f"could not be written to the store ({type(e).__name__}: {e})") from e

    def _replace(self, items: list[_LoadedFile], embeddings: np.ndarray) -> None:
        """Make ``items`` the current version of their files, all in a few writes.

        The new chunks go in first, invisible because the manifest still names the old versions; one
        manifest write then switches every file over; the old versions' chunks go last. Chroma spends
        tens of milliseconds on each write whatever its size, so writing per flush, not per file,
        keeps an ingest of many small files at the encoder's pace.
        """
        ids, texts, metadatas, new_version = [], [], [], {}
        for item in items:
            new_version[item.source] = item.version
            key = _source_key(item.source)
            for c in item.chunks:
                ids.append(f"{key}:{item.version}:{c.position}")
                texts.append(c.text)
                meta = {"source": item.source, "version": item.version, "position": c.position, "start": c.start,
                        "content_hash": c.content_hash, "title": item.title}
                if c.page is not None:
                    meta["page"] = c.page
                metadatas.append(meta)
        batch = self.client.get_max_batch_size()
        try:
            for i in range(0, len(ids), batch):
                self.chunks.upsert(ids=ids[i:i + batch], embeddings=embeddings[i:i + batch],
                                   documents=texts[i:i + batch], metadatas=metadatas[i:i + batch])
        except BaseException:
            # Not yet current, so never seen by a search; leave nothing behind either.
            self._delete_chunks(lambda meta: new_version.get(meta["source"]) == meta["version"], list(new_version))
            raise
        now = time.time()
        self._bump_revision([("doc:" + item.source, {
            "kind": "document", "source": item.source, "version": item.version, "chunks": len(item.chunks),
            "title": item.title, "added_at": now}) for item in items])
        # Older versions, and any a crashed add left behind, are no longer current: drop them.
        if self._delete_chunks(lambda meta: new_version[meta["source"]] != meta["version"], list(new_version)):
            self._bump_revision()

    def _delete_chunks(self, stale: Callable[[dict], bool], sources: list[str], group: int = 500) -> int:
        """Delete the chunks of ``sources`` whose metadata ``stale`` accepts; returns how many."""
        doomed = []
        for i in range(0, len(sources), group):
            got = _get_all(self.chunks, where={"source": {"$in": sources[i:i + group]}}, include=["metadatas"])
            doomed += [cid for cid, meta in zip(got["ids"], got["metadatas"], strict=True) if stale(meta)]
        batch = self.client.get_max_batch_size()
        for i in range(0, len(doomed), batch):
            self.chunks.delete(ids=doomed[i:i + batch])
        return len(doomed)

    def remove(self, source: str | Path) -> int:
        """Delete a document's chunks; returns how many. ``source`` is as listed, or a path to it."""
        source = self._resolve_source(source)
        with self._write_lock():
            self._reopen_if_changed_elsewhere()
            current = self.manifest.get(ids=["doc:" + source], include=["metadatas"])
            if not current["ids"]:
                raise StoreError(f"no document {source!r} in the store; `python -m knowledge list` shows them")
            self.manifest.delete(ids=["doc:" + source])
            self._bump_revision()
            self.chunks.delete(where={"source": source})
            self._bump_revision()
        return current["metadatas"][0]["chunks"]

    def _resolve_source(self, source: str | Path) -> str:
        text = str(source)
        if self._current([text]):
            return text
        resolved = str(Path(text).expanduser().resolve())
        return resolved if self._current([resolved]) else text

    # -- search -------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, where: dict | None = None, mode: str = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``query``, best first.

        ``mode``: "hybrid" fuses vector and BM25 scores (``fuse``); "vector" and "lexical" use
        one leg. ``where`` filters on chunk metadata by equality (a list value means any of), e.g.
        ``{"source": "/docs/a.pdf"}``. The score is the fused score (0..1) in hybrid mode, the
        cosine similarity in vector mode and the BM25 score in lexical mode.
        """
        if mode not in ("hybrid", "vector", "lexical"):
            raise ValueError(f"search mode {mode!r}: use 'hybrid', 'vector' or 'lexical'")
        if not query.strip() or k <= 0:
            return []
        query_vector = self.embedder.embed_query(query) if mode != "lexical" else None
        hits: list[Hit] = []
        for _ in range(5):  # a write between the two revision reads means: look again
            revision = self._reopen_if_changed_elsewhere()
            hits = self._search_once(query, query_vector, k, where, mode, revision)
            if self._revision() == revision:
                break
        return hits

    def _search_once(self, query, query_vector, k, where, mode, revision) -> list[Hit]:
        n = max(4 * k, 40)
        candidates: dict[str, dict] = {}  # chunk id -> {"text", "meta", "vector", "lexical"}
        vector_rank: list[str] = []
        if mode != "lexical":
            got = self.chunks.query(query_embeddings=[query_vector], n_results=n, where=_chroma_where(where),
                                    include=["documents", "metadatas", "distances"])
            for cid, text, meta, dist in zip(got["ids"][0], got["documents"][0], got["metadatas"][0],
                                             got["distances"][0], strict=True):
                candidates[cid] = {"text": text, "meta": meta, "vector": 1.0 - dist}
                vector_rank.append(cid)
        lexical_rank: list[str] = []
        if mode != "vector":
            with self._lexical_lock:
                self._sync_lexical(revision)
                allowed = None
                if where:
                    allowed = np.fromiter((_matches(self._lexical_meta[i], where) for i in self._lexical.ids),
                                          dtype=bool, count=len(self._lexical.ids))
                lexical = self._lexical.search(query, n, allowed)
            lexical_rank = [cid for cid, _ in lexical]
            missing = [cid for cid in lexical_rank if cid not in candidates]
            if missing:
                got = self.chunks.get(ids=missing, include=["documents", "metadatas"])
                for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                    candidates[cid] = {"text": text, "meta": meta}
            for cid, score in lexical:
                if cid in candidates:
                    candidates[cid]["lexical"] = score

        current = self._current(c["meta"]["source"] for c in candidates.values())
        live = {cid for cid, c in candidates.items() if current.get(c["meta"]["source"]) == c["meta"]["version"]}
        if mode == "vector":
            ranked = [(cid, candidates[cid]["vector"]) for cid in vector_rank if cid in live]
        elif mode == "lexical":
            ranked = [(cid, candidates[cid]["lexical"]) for cid in lexical_rank if cid in live]
        else:
            ranked = fuse({cid: candidates[cid]["vector"] for cid in vector_rank if cid in live},
                          {cid: candidates[cid]["lexical"] for cid in lexical_rank if cid in live})
        hits = []
        for cid, score in ranked[:k]:
            meta = candidates[cid]["meta"]
            hits.append(Hit(meta["source"], meta.get("page"), cid, float(score), candidates[cid]["text"]))
        return hits

    def find_phrase(self, phrase: str, candidates: int = 20) -> PhraseMatch | None:
        """Where the store's current documents hold ``phrase``, exactly or nearly (``knowledge.phrases``).

        Every chunk is considered, not only a search's top k, and none is read as text to choose: the
        lexical index ranks chunks by the share of the phrase's terms they hold (``LexicalIndex.containing``);
        the ``candidates`` best of the current versions are read with their neighbours on either side, so
        words split across two chunks (or a PDF page break) are whole in one window. The best match wins:
        exact before near-exact, then the fewest differences, then the higher share.
        """
        if not phrase.strip():
            return None
        match = None
        for _ in range(5):  # a write between the two revision reads means: look again
            revision = self._reopen_if_changed_elsewhere()
            match = self._find_phrase_once(phrase, candidates, revision)
            if self._revision() == revision:
                break
        return match

    def _find_phrase_once(self, phrase: str, candidates: int, revision: str) -> PhraseMatch | None:
        with self._lexical_lock:
            self._sync_lexical(revision)
            ranked = [(cid, share) for cid, share in self._lexical.containing(phrase, 4 * candidates)
                      if share >= MIN_PHRASE_SHARE]
            metas = {cid: self._lexical_meta[cid] for cid, _ in ranked}
        current = self._current(m["source"] for m in metas.values())
        live = [cid for cid, _ in ranked if current.get(metas[cid]["source"]) == metas[cid]["version"]]
        # Each candidate with the chunk before and after it, runs of one document merged into one window.
        windows: dict[tuple[str, str], set[int]] = {}
        for cid in live[:candidates]:
            meta = metas[cid]
            position = int(meta["position"])
            windows.setdefault((meta["source"], meta["version"]), set()).update(
                range(max(0, position - 1), position + 2))
        ids = [f"{_source_key(source)}:{version}:{p}" for (source, version), positions in windows.items()
               for p in sorted(positions)]
        if not ids:
            return None
        got = self.chunks.get(ids=ids, include=["documents", "metadatas"])
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

    def _sync_lexical(self, revision: str) -> None:
        """Bring the BM25 index up to the store's revision, tokenizing only chunks it has not seen."""
        if revision == self._lexical_revision:
            return
        stored = _get_all(self.chunks, include=["metadatas"])
        stored_ids = set(stored["ids"])
        removed = [cid for cid in self._lexical_meta if cid not in stored_ids]
        new = [cid for cid in stored["ids"] if cid not in self._lexical]
        added = {}
        batch = self.client.get_max_batch_size()
        for i in range(0, len(new), batch):
            got = self.chunks.get(ids=new[i:i + batch], include=["documents", "metadatas"])
            for cid, text, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                added[cid] = chunk_terms(meta.get("title", ""), text)
        self._lexical.update(added, removed)
        self._lexical_meta = dict(zip(stored["ids"], stored["metadatas"], strict=True))
        self._lexical_revision = revision


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


def _get_all(collection, page: int = 5000, **kwargs) -> dict:
    """``collection.get`` in pages: one call for the whole of a large store runs out of SQL variables."""
    ids, metadatas, offset = [], [], 0
    while True:
        got = collection.get(limit=page, offset=offset, **kwargs)
        ids += got["ids"]
        metadatas += got["metadatas"] or []
        if len(got["ids"]) < page:
            return {"ids": ids, "metadatas": metadatas}
        offset += page


class _Retrying:
    """A Chroma collection whose calls wait out another process's write instead of failing.

    Embedded Chroma answers "database is locked" when SQLite is busy with another process's write, even
    for reads; the write finishes in milliseconds, so a short wait is the right answer.
    """

    def __init__(self, collection, attempts: int = 60):
        self._collection, self._attempts = collection, attempts

    def __getattr__(self, name):
        attribute = getattr(self._collection, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                try:
                    return attribute(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - chromadb raises InternalError for this
                    if "database is locked" not in str(e) or attempt == self._attempts - 1:
                        raise
                    time.sleep(min(0.05 * (attempt + 1), 0.5))

        return call


def _persistent_client(path: Path, fresh: bool = False):
    """An embedded Chroma client on ``path``; ``fresh`` forgets the one this process already had.

    Chroma shares one client system per path in a process and keeps its vector index in memory, so a
    client never sees vectors another process added. Dropping the shared system (a private registry
    of chromadb 1.x) makes the next client load the index from disk.
    """
    import chromadb
    from chromadb.api.shared_system_client import SharedSystemClient

    path = Path(path).resolve()
    if fresh:
        SharedSystemClient._identifier_to_system.pop(str(path), None)
        SharedSystemClient._identifier_to_refcount.pop(str(path), None)
    return chromadb.PersistentClient(path=str(path))

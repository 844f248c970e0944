"""The connection to Chroma: an embedded client on disk or a server's, reopened when another process wrote.

Why reopen. The embedded (Rust) client of Chroma 1.5.9 reads metadata and documents from SQLite, which
every process shares, but queries a vector index it loaded into memory when it opened the collection: it
never sees vectors another process added, nor forgets ones it deleted (chroma-core/chroma#3792). The
supported way to reload is public: ``Client.close()`` stops the client's system once its last client
closes, and the next ``PersistentClient`` on the folder loads the index from disk. So this process keeps
exactly one client per folder (``_shared``), and a reopen closes it while no call is using it.

When. Every write of the store moves a store-wide *revision* (a record in the manifest collection).
``Connection.refresh`` reads it; a revision this process did not write means another process wrote, so the
client is reopened. A server's client always sees every write and is never reopened.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np

from knowledge.records import StoreError
from locks import SharedExclusive
from settings import Settings

REVISION_ID = "__revision__"


class Chroma:
    """One Chroma client (per folder, or per server) for the whole process, and its reopening."""

    def __init__(self, settings: Settings):
        self.path = None if settings.chroma_host else Path(settings.knowledge_dir).resolve()
        self.host, self.port = settings.chroma_host, settings.chroma_port
        self.client = self._connect()
        self.handles: dict[str, object] = {}  # collection name -> chromadb Collection of this client
        self.seen: dict[str, str] = {}  # manifest name -> the revision this process last read or wrote
        self.revision_lock = threading.Lock()  # reading the revision and reopening, or writing and remembering it
        self.in_use = SharedExclusive()  # calls hold it shared; a reopen holds it alone

    def _connect(self):
        import chromadb

        if self.path is not None:
            return chromadb.PersistentClient(path=str(self.path))
        try:
            client = chromadb.HttpClient(host=self.host, port=self.port)
            client.heartbeat()
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            raise StoreError(
                f"cannot reach the Chroma server at {self.host}:{self.port} ({e}); start it "
                "(`chroma run --path DIR --port PORT`) or unset CHROMA_HOST to use the store on disk"
            ) from None
        return client

    def handle(self, name: str):
        if name not in self.handles:
            self.handles[name] = self.client.get_collection(name)
        return self.handles[name]

    def reopen(self) -> None:
        """Load the vector index from disk again: close this process's client, open a new one."""
        if self.path is None:
            return
        with self.in_use.exclusive():
            self.client.close()
            self.client = self._connect()
            self.handles = {}


_shared: dict[tuple, Chroma] = {}
_shared_lock = threading.Lock()


def shared_chroma(settings: Settings) -> Chroma:
    """This process's client for the store's folder (or server): one, so that closing it reloads."""
    key = (settings.chroma_host, settings.chroma_port) if settings.chroma_host else \
        str(Path(settings.knowledge_dir).resolve())
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Chroma(settings)
        return _shared[key]


class Collection:
    """A Chroma collection whose calls wait out another process's write and a reopen of the client.

    Embedded Chroma answers "database is locked" when SQLite is busy with another process's write, even
    for reads; the write finishes in milliseconds, so a short wait is the right answer. Each call looks
    up the collection on the client of the moment, so a reopen never leaves a stale handle behind.
    """

    def __init__(self, chroma: Chroma, name: str, attempts: int = 60):
        self._chroma, self.name, self._attempts = chroma, name, attempts

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        with self._chroma.in_use.shared():
            value = getattr(self._chroma.handle(self.name), attribute)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                try:
                    with self._chroma.in_use.shared():
                        return getattr(self._chroma.handle(self.name), attribute)(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - chromadb raises InternalError for this
                    if "database is locked" not in str(e) or attempt == self._attempts - 1:
                        raise
                    time.sleep(min(0.05 * (attempt + 1), 0.5))

        return call


class Connection:
    """A store's two collections (chunks, manifest) on the shared client, and the store's revision."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.chroma = shared_chroma(settings)
        with self.chroma.in_use.shared():
            created = self.chroma.client.get_or_create_collection(
                settings.collection, configuration={"hnsw": {"space": "cosine"}},
                metadata={"embedding_model": settings.embedding_model}, embedding_function=None)
            self.chroma.client.get_or_create_collection(settings.collection + "-manifest", embedding_function=None)
        built_with = (created.metadata or {}).get("embedding_model")
        if built_with and built_with != settings.embedding_model:
            raise StoreError(
                f"the store {settings.collection!r} was built with embedding model {built_with!r}, not "
                f"{settings.embedding_model!r}; set EMBEDDING_MODEL={built_with} or choose another "
                "KNOWLEDGE_COLLECTION (or KNOWLEDGE_DIR) to build a new store")
        self.chunks = Collection(self.chroma, settings.collection)
        self.manifest = Collection(self.chroma, settings.collection + "-manifest")
        with self.chroma.revision_lock:
            self.chroma.seen.setdefault(self.manifest.name, self.revision())

    @property
    def client(self):
        return self.chroma.client

    @property
    def seen_revision(self) -> str:
        return self.chroma.seen[self.manifest.name]

    def max_batch(self) -> int:
        with self.chroma.in_use.shared():
            return self.chroma.client.get_max_batch_size()

    def revision(self) -> str:
        got = self.manifest.get(ids=[REVISION_ID], include=["metadatas"])
        return got["metadatas"][0]["revision"] if got["ids"] else ""

    def refresh(self) -> str:
        """The store's revision now, after reopening the client if another process moved it."""
        with self.chroma.revision_lock:
            revision = self.revision()
            if revision != self.chroma.seen[self.manifest.name]:
                self.chroma.reopen()
            self.chroma.seen[self.manifest.name] = revision
            return revision

    def bump_revision(self, records: list[tuple[str, dict]] = ()) -> None:
        """Write manifest ``records`` (id, metadata) and a new revision in one write."""
        revision = uuid.uuid4().hex
        ids = [REVISION_ID] + [r[0] for r in records]
        metadatas = [{"revision": revision, "kind": "revision"}] + [r[1] for r in records]
        with self.chroma.revision_lock:
            self.manifest.upsert(ids=ids, embeddings=np.ones((len(ids), 1), dtype=np.float32), metadatas=metadatas)
            self.chroma.seen[self.manifest.name] = revision


def get_all(collection, page: int = 5000, **kwargs) -> dict:
    """``collection.get`` in pages: one call for the whole of a large store runs out of SQL variables."""
    ids, metadatas, offset = [], [], 0
    while True:
        got = collection.get(limit=page, offset=offset, **kwargs)
        ids += got["ids"]
        metadatas += got["metadatas"] or []
        if len(got["ids"]) < page:
            return {"ids": ids, "metadatas": metadatas}
        offset += page

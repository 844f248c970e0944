"""Adding files: read and chunk each in a bounded worker, embed a group at a time, write as new versions.

Memory stays bounded whatever the size of the add: at most ``EMBED_GROUP`` chunks (plus the one file
that crossed the mark, itself at most ``MAX_FILE_MB``) are held, embedded and written before the next
file is read. An interrupted add, run again, redoes nothing already stored: the manifest's versions are
read once at the start, and a file whose content hash is already current is skipped without being parsed
or embedded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from knowledge.embeddings import EmbeddingModelError
from knowledge.files import discover, not_a_regular_file
from knowledge.loaders import LoadError
from knowledge.reader import FileReader
from knowledge.records import IngestReport, StoreError
from knowledge.terms import indexed_text
from knowledge.versions import LoadedFile, Versions
from settings import Settings

EMBED_GROUP = 1024  # chunks embedded in one call when adding many files


class _StageError(Exception):
    """One file (or group of files) could not be embedded or written; the message says at which stage."""


class Ingest:
    def __init__(self, settings: Settings, versions: Versions, embedder: Callable[[], object],
                 write_lock: Callable[[], AbstractContextManager]):
        self.settings, self.versions, self._embedder, self._write_lock = settings, versions, embedder, write_lock

    def add(self, paths: list[str | Path], progress: Callable[[str, int], None] | None = None) -> IngestReport:
        found = discover(paths)
        report = IngestReport(
            skipped=[{"source": p, "reason": r} for p, r in found.skipped],
            failed=[{"source": p, "error": e} for p, e in found.failed],
        )
        stored = self.versions.all_current()
        pending: list[LoadedFile] = []

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
                    loaded = self._load(path, reader, stored)
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

    def _load(self, path: Path, reader: FileReader, stored: dict[str, str]) -> LoadedFile | None:
        """The file's chunks, or None when the store already holds this very version of it."""
        source = str(path)
        data = self._read_bytes(path)
        version = hashlib.sha256(data).hexdigest()[:16]
        if stored.get(source) == version:
            return None
        read = reader.read(path, data)
        return LoadedFile(source, version, read.title, read.chunks, read.warnings)

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

    def _store(self, items: list[LoadedFile]) -> list[tuple[LoadedFile, str | None]]:
        """Embed and write ``items`` together; (item, None) for each stored, (item, reason) for each not.

        When the group fails, its files are tried one at a time, so that only the file that fails is
        reported, with the stage and the error; ``Versions.replace`` leaves nothing of a failed write behind.
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

    def _embed_and_write(self, items: list[LoadedFile]) -> None:
        try:
            vectors = self._embedder().embed_passages([indexed_text(item.title, c.text)
                                                       for item in items for c in item.chunks])
        except EmbeddingModelError:
            raise
        except Exception as e:  # noqa: BLE001 - the reason names the error's type and message
            raise _StageError(f"could not be embedded ({type(e).__name__}: {e})") from e
        try:
            with self._write_lock():
                self.versions.connection.refresh()
                self.versions.replace(items, vectors)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _StageError(f"could not be written to the store ({type(e).__name__}: {e})") from e

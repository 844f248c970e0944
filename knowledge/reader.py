"""Files are parsed and chunked in a separate process, bounded in time and memory: a hostile file costs itself.

Parsing runs third-party code (pypdf, python-docx, lxml, the csv and json modules) over bytes nobody has
checked: a crafted PDF can loop for ever, a small file can expand to gigabytes, a C extension can crash. So
the store hands each file's bytes to a worker process with an address-space limit (``READ_MEMORY_MB``) and
waits at most ``READ_TIMEOUT_S`` for its chunks. A worker that runs out of time or memory, or dies, fails
that one file with the reason, and a fresh worker reads the next.

The worker is a plain ``python -c`` child of its own rather than a multiprocessing one: spawn and
forkserver children import the parent's ``__main__`` (the whole app), and fork is unsafe in a process with
threads and torch loaded. It lives for one ``KnowledgeStore.add``, so it is started once per batch, not per
file, and never outlives its parent (Linux kills it when the parent dies).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from knowledge.chunking import Chunk, chunk_document
from knowledge.loaders import LoadError, load_file
from settings import Settings

_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the knowledge package
_START_TIMEOUT_S = 120.0  # importing the worker's modules on a busy machine


@dataclass
class ReadFile:
    """What reading one file gives: its title, chunks and the warnings about parts left out."""

    title: str
    chunks: list[Chunk]
    warnings: list[str]


class FileReader:
    """Reads files one at a time in a worker process; ``read`` raises ``LoadError`` for anything per file."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, path: Path, data: bytes) -> ReadFile:
        """Parse and chunk ``data``, the content of ``path``."""
        s = self.settings
        request = (str(path), data, s.chunk_size, s.chunk_overlap, s.max_unzipped_mb)
        for attempt in (1, 2):  # a worker that died between files gets one successor
            connection = self._worker()
            try:
                connection.send(request)
                break
            except OSError:
                how = self._end()
                if attempt == 2:
                    raise LoadError(f"the process reading it {how}") from None
        if not connection.poll(s.read_timeout_s):
            self.close()
            raise LoadError(f"took longer than {s.read_timeout_s:g} s to read, and was stopped "
                            "(raise READ_TIMEOUT_S if the file is genuine)")
        try:
            outcome, value = connection.recv()
        except (EOFError, OSError):
            raise LoadError(f"the process reading it {self._end()}") from None
        if outcome == "memory":
            self.close()  # a worker that ran out of memory may be left in any state: start afresh
            raise LoadError(f"needed more than {s.read_memory_mb:g} MB of memory to read "
                            "(raise READ_MEMORY_MB if the file is genuine)")
        if outcome == "refused":
            raise LoadError(value)
        return value

    def close(self) -> None:
        if self._process is not None:
            self._end()

    def _worker(self) -> Connection:
        if self._process is None:
            ours, theirs = socket.socketpair()
            limits = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            code = (f"import sys; sys.path.insert(0, {str(_ROOT)!r}); from knowledge.reader import serve; "
                    f"serve({theirs.fileno()}, {os.getpid()}, {self.settings.read_memory_mb!r})")
            with theirs:
                # Its stdout is not ours: the CLI's --json output must stay clean. Warnings go to stderr.
                self._process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 env={**os.environ, **limits})
            self._connection = Connection(ours.detach())
            try:
                if not self._connection.poll(_START_TIMEOUT_S):
                    raise EOFError
                self._connection.recv()  # "ready"
            except (EOFError, OSError):
                raise LoadError(f"the process that reads files did not start: it {self._end()} (is "
                                f"READ_MEMORY_MB={self.settings.read_memory_mb:g} too small?)") from None
        return self._connection

    def _end(self) -> str:
        """Stop the worker (if it still runs) and say how it ended."""
        process, self._process = self._process, None
        self._connection.close()
        self._connection = None
        if process.poll() is None:
            process.kill()
        code = process.wait()
        if code == -signal.SIGKILL:
            return "was killed (SIGKILL; the system may have run out of memory)"
        if code < 0:
            return f"crashed (signal {-code}, {signal.strsignal(-code)})"
        return f"ended unexpectedly (exit status {code})"


# -- the worker's side ------------------------------------------------------------------------------


def serve(fd: int, parent: int, memory_mb: float) -> None:
    """The worker's loop: requests in, ("read", ReadFile) | ("refused", reason) | ("memory", None) out."""
    _die_with(parent)
    limit = int(memory_mb * 1024 * 1024)
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    connection = Connection(fd)
    connection.send(("ready", None))
    while True:
        try:
            path, data, size, overlap, max_unzipped_mb = connection.recv()
        except EOFError:  # the store is done with us
            return
        reply = _read(Path(path), data, size, overlap, max_unzipped_mb)
        del data
        try:
            connection.send(reply)
        except MemoryError:  # the chunks did not fit in memory a second time, as a message
            connection.send(("memory", None))


def _read(path: Path, data: bytes, size: int, overlap: int, max_unzipped_mb: float) -> tuple[str, object]:
    stage = "parsed"
    try:
        document = load_file(path, data, max_unzipped_mb)
        stage = "chunked"
        chunks = chunk_document(document, size, overlap)
    except LoadError as e:
        return "refused", str(e)
    except MemoryError:
        return "memory", None
    except Exception as e:  # noqa: BLE001 - any failure here belongs to this file alone; its type names a bug
        return "refused", f"could not be {stage} ({type(e).__name__}: {e})"
    if not chunks:
        return "refused", "no text found: the file is empty"
    return "read", ReadFile(document.title, chunks, document.warnings)


def _die_with(parent: int) -> None:
    """Have Linux kill this process when its parent dies (even by SIGKILL), so no worker is left behind."""
    # Linux sends the signal when the thread that started us ends; that thread is inside the store's ``add``
    # until it has stopped us.
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)

"""One bad file never stops a batch: it fails alone, by name, with its reason, at whatever stage it fails.

Each test puts a good file beside a bad one and checks that the good one is stored and searchable and the bad
one is named. Limits (time, memory, unpacked size) are set small in the test's settings and met by real
pathological files, not by test-only code paths.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import zipfile

import numpy as np
import pytest

from knowledge import KnowledgeStore
from tests.documents import write_docx

GOOD = "The ferry to Varna leaves at noon from pier 7."


def outcome(report) -> dict[str, str]:
    """name -> "added" or the reason it failed, for every file in the report."""
    named = {os.path.basename(a["source"]): "added" for a in report.added}
    named |= {os.path.basename(f["source"]): f["error"] for f in report.failed}
    return named


def with_good_file(folder):
    folder.mkdir(exist_ok=True)
    (folder / "good.txt").write_text(GOOD)
    return folder


def assert_good_file_found(store, folder):
    hits = store.search("ferry to Varna", k=1, where={"source": str(folder / "good.txt")})
    assert hits and hits[0].text == GOOD


def store_with(settings, embedder, **overrides) -> KnowledgeStore:
    return KnowledgeStore(settings.__class__.from_env(knowledge_dir=settings.knowledge_dir,
                                                      embedding_model=settings.embedding_model, **overrides),
                          embedder=embedder)


def add_within(store, paths, seconds=120):
    """store.add on a thread, so that a test of a hang fails instead of hanging."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=store.add(paths)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"store.add did not return within {seconds} s"
    return result["report"]


def test_a_docx_with_broken_xml_fails_alone(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    whole = write_docx(tmp_path / "whole.docx", ["some paragraph"])
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(folder / "broken.docx", "w") as broken:
        for item in source.infolist():
            broken.writestr(item, b"garbage<<" if item.filename == "word/document.xml" else source.read(item))
    got = outcome(store.add([folder]))
    assert got["good.txt"] == "added"
    assert "the DOCX is damaged or truncated" in got["broken.docx"]
    assert_good_file_found(store, folder)


def test_a_deeply_nested_json_fails_alone(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    got = outcome(store.add([folder]))
    assert got == {"good.txt": "added", "deep.json": got["deep.json"]}
    assert "nested more deeply than" in got["deep.json"]
    assert_good_file_found(store, folder)


def test_a_csv_with_a_field_over_128_kb_is_added(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    (folder / "wide.csv").write_text("name,notes\nlong," + "lantern " * 30_000 + "\ncompass,brass\n")
    report = store.add([folder])
    assert outcome(report) == {"good.txt": "added", "wide.csv": "added"}
    hits = store.search("compass brass", k=1, mode="lexical", where={"source": str(folder / "wide.csv")})
    assert hits[0].text.endswith("name: compass; notes: brass")


@pytest.fixture
def fifo(tmp_path):
    """A named pipe called x.txt inside a folder; opened for writing afterwards, so a reader stuck on it ends."""
    folder = with_good_file(tmp_path / "docs")
    path = folder / "x.txt"
    os.mkfifo(path)
    yield path
    try:  # a writer that comes and goes ends the wait of anyone reading it
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody is reading it
        pass


def test_a_named_pipe_in_a_folder_fails_alone(store, fifo):
    report = add_within(store, [fifo.parent])
    assert outcome(report) == {
        "good.txt": "added", "x.txt": "is a named pipe (FIFO), not a regular file; only regular files are read"}
    assert_good_file_found(store, fifo.parent)


def test_a_named_pipe_given_by_name_fails_alone(store, fifo):
    report = add_within(store, [fifo, fifo.parent / "good.txt"])
    assert outcome(report) == {
        "good.txt": "added", "x.txt": "is a named pipe (FIFO), not a regular file; only regular files are read"}


def test_a_socket_fails_alone(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(folder / "app.sock"))
        report = add_within(store, [folder])
    assert outcome(report) == {"good.txt": "added",
                               "app.sock": "is a socket, not a regular file; only regular files are read"}


def test_a_zip_bomb_is_refused_before_it_is_opened(settings, embedder, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    with zipfile.ZipFile(folder / "bomb.docx", "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("[Content_Types].xml", b"<Types/>")
        bomb.writestr("word/document.xml", b" " * (5 * 1024 * 1024))
    store = store_with(settings, embedder, max_unzipped_mb=4)
    got = outcome(store.add([folder]))
    assert got["good.txt"] == "added"
    assert got["bomb.docx"].startswith("it expands to 5.0 MB, over the 4 MB limit for unpacked files")
    assert_good_file_found(store, folder)


def test_a_file_that_takes_too_long_to_read_fails_alone(settings, embedder, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a-slow.html").write_text("<p>word " * 300_000)  # html.parser nests each open <p>: seconds
    (folder / "b-good.txt").write_text(GOOD)  # read after the slow one, by a fresh worker
    store = store_with(settings, embedder, read_timeout_s=1.5)
    got = outcome(store.add([folder]))
    assert got == {"a-slow.html": "took longer than 1.5 s to read, and was stopped (raise READ_TIMEOUT_S if "
                                  "the file is genuine)", "b-good.txt": "added"}


def test_a_file_that_needs_too_much_memory_fails_alone(settings, embedder, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a-lists.json").write_text("[" + "[]," * 8_000_000 + "[]]")  # 24 MB of text, ~600 MB of lists
    (folder / "b-good.txt").write_text(GOOD)
    store = store_with(settings, embedder, read_memory_mb=400)
    got = outcome(store.add([folder]))
    assert got == {"a-lists.json": "needed more than 400 MB of memory to read (raise READ_MEMORY_MB if the file "
                                   "is genuine)", "b-good.txt": "added"}


def test_a_json_with_lone_surrogates_is_added_with_a_warning(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    (folder / "odd.json").write_text('{"name": "half \\ud800 a character"}')
    report = store.add([folder])
    assert outcome(report) == {"good.txt": "added", "odd.json": "added"}
    assert [a.get("warnings") for a in report.added if a["source"].endswith("odd.json")] == [
        ["1 invalid characters (lone UTF-16 surrogates) replaced with U+FFFD"]]
    assert store.search("character", k=1, where={"source": str(folder / "odd.json")})[0].text == (
        "name: half \ufffd a character")


def test_a_file_the_encoder_fails_on_fails_alone(store, tmp_path, monkeypatch):
    folder = with_good_file(tmp_path / "docs")
    (folder / "poison.txt").write_text("This text trips the encoder.")
    embed = store.embedder.embed_passages

    def embed_unless_poisoned(texts):
        if any("trips the encoder" in t for t in texts):
            raise ValueError("the encoder tripped")
        return embed(texts)

    monkeypatch.setattr(store.embedder, "embed_passages", embed_unless_poisoned)
    got = outcome(store.add([folder]))
    assert got == {"good.txt": "added", "poison.txt": "could not be embedded (ValueError: the encoder tripped)"}
    assert_good_file_found(store, folder)


def test_a_file_chroma_refuses_fails_alone_and_leaves_nothing_behind(store, tmp_path, monkeypatch):
    (tmp_path / "first.txt").write_text("The lighthouse keeper is Ingrid Holm.")
    store.add([tmp_path / "first.txt"])  # Chroma takes the first vectors' size as the collection's
    folder = with_good_file(tmp_path / "docs")
    (folder / "odd.txt").write_text("This text gets vectors of the wrong size.")
    embed = store.embedder.embed_passages

    def wrong_size_for_odd(texts):
        vectors = embed(texts)
        if any("wrong size" in t for t in texts):
            return np.ones((len(texts), 3), dtype=np.float32)  # Chroma refuses the write: the wrong dimension
        return vectors

    monkeypatch.setattr(store.embedder, "embed_passages", wrong_size_for_odd)
    report = store.add([folder])
    got = outcome(report)
    assert got["good.txt"] == "added"
    assert got["odd.txt"].startswith("could not be written to the store (") and "dimension" in got["odd.txt"]
    assert store.chunks.count() == 2
    assert [d.source for d in store.documents()] == [str(folder / "good.txt"), str(tmp_path / "first.txt")]
    assert_good_file_found(store, folder)


def test_the_reading_process_ends_with_the_add(store, tmp_path):
    folder = with_good_file(tmp_path / "docs")
    before = _children()
    store.add([folder])
    assert _children() == before


def _children() -> set[int]:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(c) for c in f.read().split()}


def test_a_good_file_among_many_bad_ones_is_stored_once(store, tmp_path):
    """Bad files of every kind in one batch: the good file is stored, each bad one named, nothing unreported."""
    folder = with_good_file(tmp_path / "docs")
    (folder / "empty.txt").write_text("")
    (folder / "deep.json").write_text("[" * 5000)
    (folder / "noise.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8)
    (folder / "png.docx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("hello.txt", "not a docx")
    (folder / "plain.docx").write_bytes(zipped.getvalue())
    report = store.add([folder])
    got = outcome(report)
    assert set(got) == {p.name for p in folder.iterdir()} and got["good.txt"] == "added"
    assert all(reason != "added" for name, reason in got.items() if name != "good.txt"), got
    assert store.chunks.count() == 1

